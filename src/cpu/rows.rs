//! CPU kernel of the in-place row scatter-add.

use super::float::Elem;
use super::{Bound, map_range};
use crate::op::anchor_plan::RowSpace;
use crate::tensor::TensorRef;

/// Columns per parallel task: each task owns a disjoint column range of every row, so
/// repeated rows never race and their order of accumulation is fixed.
const COLUMNS_PER_TASK: usize = 256;

/// `dst[rows[j]] += vals[j]`, formed in the accumulator type and rounded once; see
/// [`crate::dispatch::rows::scatter_add`].
pub fn scatter_add<T: Elem>(dst: &mut TensorRef, space: &RowSpace, rows: &[i64], vals: &[T::Acc]) {
    let hs = space.hidden_size;
    let base = dst.data_ptr() as usize;
    let chunks = hs.div_ceil(COLUMNS_PER_TASK);
    map_range(chunks, rows.len() * hs, Bound::Memory, |c| {
        let (lo, hi) = (c * COLUMNS_PER_TASK, ((c + 1) * COLUMNS_PER_TASK).min(hs));
        let p = base as *mut T;
        for (j, &r) in rows.iter().enumerate() {
            if r < 0 {
                continue;
            }
            let off = space.offset(r as usize);
            let src = &vals[j * hs + lo..j * hs + hi];
            if space.feature_stride == 1 {
                // SAFETY: rows were checked against the row space of dst and lo..hi lies in
                // 0..H with unit stride; tasks own disjoint columns, so no other task touches
                // these elements.
                let d =
                    unsafe { std::slice::from_raw_parts_mut(p.offset(off + lo as isize), hi - lo) };
                d.iter_mut()
                    .zip(src)
                    .for_each(|(e, &v)| *e = T::store(e.load() + v));
                continue;
            }
            for (k, &v) in (lo..hi).zip(src) {
                // SAFETY: as above, with dst free of overlapping elements (checked), each
                // (row, column) element is distinct.
                unsafe {
                    let e = p.offset(off + k as isize * space.feature_stride);
                    *e = T::store((*e).load() + v);
                }
            }
        }
    });
}
