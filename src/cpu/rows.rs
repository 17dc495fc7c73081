//! CPU kernel of the in-place row scatter-add.

use super::float::{Acc, Elem};
use super::map_range;
use crate::ops::anchors::RowSpace;
use crate::tensor::TensorRef;

/// Columns per parallel task: each task owns a disjoint column range of every row, so
/// repeated rows never race and their order of accumulation is fixed.
const COLUMNS_PER_TASK: usize = 256;

/// `dst[rows[j]] += vals[j]`; see [`crate::ops::rows::scatter_add`].
pub fn scatter_add<T: Elem, V: Acc>(
    dst: &mut TensorRef,
    space: &RowSpace,
    rows: &[i64],
    vals: &[V],
) {
    let hs = space.hidden_size;
    let base = dst.data_ptr() as usize;
    let chunks = hs.div_ceil(COLUMNS_PER_TASK);
    map_range(chunks, rows.len() * hs, |c| {
        let (lo, hi) = (c * COLUMNS_PER_TASK, ((c + 1) * COLUMNS_PER_TASK).min(hs));
        let p = base as *mut T;
        for (j, &r) in rows.iter().enumerate() {
            if r < 0 {
                continue;
            }
            let off = space.offset(r as usize);
            for k in lo..hi {
                // SAFETY: rows were checked against the row space of dst, k < H, and dst has
                // no overlapping elements (checked), so tasks with disjoint columns write
                // disjoint elements.
                unsafe {
                    let e = p.offset(off + k as isize * space.feature_stride);
                    let sum = (*e).load().f64() + vals[j * hs + k].f64();
                    *e = T::store(<T::Acc as Acc>::of(sum));
                }
            }
        }
    });
}
