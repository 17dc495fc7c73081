//! Launch code of `kernels/rows.cu`.

use super::{BLOCK, Executor, Family, Grid, ptr, suffix};
use crate::error::Result;
use crate::op::anchor_plan::RowSpace;
use crate::tensor::TensorRef;

/// `struct ScatterRowsParams` of `kernels/rows.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct ScatterRowsParams {
    dst: u64,
    rows: u64,
    vals: u64,
    k: i64,
    num_rows: i64,
    hidden_size: i64,
    inner: i64,
    outer_stride: i64,
    inner_stride: i64,
    feature_stride: i64,
    links: u64,
}

/// `dst[rows[j]] += vals[j]` (see `dispatch::rows::scatter_add`); `rows` is a contiguous int64
/// `[k]`, `vals` a contiguous float32 `[k, H]`, `links` int32 `[4 k]` scratch, all checked by
/// the caller. Rows outside `0..rows` are skipped by the kernel (they cannot be checked
/// without reading them). Two launches: `scatter_resolve_rows` (one block) finds repeated
/// rows, then `scatter_add_rows`.
pub fn scatter_add(
    exec: &Executor,
    dst: &TensorRef,
    space: &RowSpace,
    rows: &TensorRef,
    vals: &TensorRef,
    links: &TensorRef,
) -> Result<()> {
    let k = rows.numel();
    if k == 0 {
        return Ok(());
    }
    let params = ScatterRowsParams {
        dst: ptr(dst),
        rows: ptr(rows),
        vals: ptr(vals),
        k: k as i64,
        num_rows: space.rows as i64,
        hidden_size: space.hidden_size as i64,
        inner: space.inner.max(1) as i64,
        outer_stride: space.outer_stride as i64,
        inner_stride: space.inner_stride as i64,
        feature_stride: space.feature_stride as i64,
        links: ptr(links),
    };
    exec.launch(
        Family::Rows,
        "scatter_resolve_rows",
        Grid::blocks(1)?,
        &params,
    )?;
    let grid = Grid::blocks_2d(k, space.hidden_size.div_ceil(BLOCK as usize))?;
    let kernel = format!("scatter_add_rows_{}", suffix(dst.dtype()));
    exec.launch(Family::Rows, &kernel, grid, &params)
}
