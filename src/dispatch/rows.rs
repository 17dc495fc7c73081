//! Adding gradient rows into a tensor shaped like `hidden`, in place.
//!
//! This is how the alignment gradient reaches `hidden` without a pass over all of it: the
//! rows are added into the gradient `hidden` already receives (or into zeros when nothing
//! else feeds it).

use super::{Backend, select};
use crate::cpu;
use crate::cuda;
use crate::error::{Error, Result};
use crate::op::anchor_plan::RowSpace;
use crate::tensor::{DType, TensorRef};

/// `dst[rows[j]] += vals[j]` for every `j` with `rows[j] >= 0`, in order of `j` (repeated rows
/// accumulate). `dst` is `[B, T, H]` or `[N, H]` with any strides, `rows` int64 `[k]` flat
/// rows, `vals` `[k, H]` contiguous in the accumulator type of `dst` (float64 for float64,
/// float32 otherwise). Each sum is formed in that type and rounded once. The kernel backend
/// needs `links`, int32 `[4 k]` scratch.
pub fn scatter_add(
    dst: &mut TensorRef,
    rows: &TensorRef,
    vals: &TensorRef,
    links: Option<&TensorRef>,
    stream: Option<usize>,
) -> Result<()> {
    let space = RowSpace::of(dst)?;
    let expanded = (space.hidden_size > 1 && space.feature_stride == 0)
        || (space.inner > 1 && space.inner_stride == 0)
        || (!space.packed && space.rows > space.inner && space.outer_stride == 0);
    if expanded {
        return Err(Error::value(
            "dst",
            "a tensor without overlapping elements",
            "an expanded view",
        ));
    }
    if let Backend::Kernels(exec) = select(dst, &[Some(rows), Some(vals), links], stream)? {
        // Row values are checked by the kernel (out-of-range rows are skipped).
        cuda::expect_kernel_float(dst)?;
        let k = rows.numel();
        cuda::expect_buffer(rows, &[k], DType::I64)?;
        cuda::expect_buffer(vals, &[k, space.hidden_size], DType::F32)?;
        let links = cuda::expect_scratch(links, "links", &[4 * k], DType::I32)?;
        return cuda::rows::scatter_add(&exec, dst, &space, rows, vals, links);
    }
    let rows = rows.to_i64_vec()?;
    if vals.shape() != [rows.len(), space.hidden_size] {
        return Err(Error::shape(
            "vals",
            format!("[{}, {}]", rows.len(), space.hidden_size),
            vals.shape(),
        ));
    }
    if let Some((j, r)) = rows
        .iter()
        .enumerate()
        .find(|(_, r)| **r < -1 || **r >= space.rows as i64)
    {
        return Err(Error::value(
            "rows",
            format!("-1 or a row below {}", space.rows),
            format!("{r} at {j}"),
        ));
    }
    let acc = if dst.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    vals.expect_dtype(&[acc])?;
    crate::dispatch_float!(dst.dtype(), T => {
        let vals = vals.as_slice::<<T as cpu::float::Elem>::Acc>()?;
        cpu::rows::scatter_add::<T>(dst, &space, &rows, vals)
    });
    Ok(())
}
