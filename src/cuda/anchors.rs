//! Launch code of `kernels/anchors.cu`.

use super::{Executor, Family, Grid, Side, ptr, stride};
use crate::error::{Error, Result};
use crate::op::anchors::{FindAnchors, Occurrence};
use crate::tensor::TensorRef;

/// The longest rows the kernel ranks exactly.
const MAX_COLS: usize = (1 << 31) - 1;

/// `struct FindAnchorsParams` of `kernels/anchors.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct FindAnchorsParams {
    tokens: u64,
    token_code: i64,
    token_s0: i64,
    token_s1: i64,
    mask: u64,
    mask_code: i64,
    mask_s0: i64,
    mask_s1: i64,
    marker_tokens: u64,
    marker_offsets: u64,
    num_markers: i64,
    rows: i64,
    cols: i64,
    last: i64,
    offset: i64,
    out: u64,
}

/// One launch of `find_anchors`, a block per row. Shapes and dtypes were checked by the
/// caller; the marker tensors are read on the device as they are.
pub fn find_anchors(
    exec: &Executor,
    inp: &FindAnchors,
    (b, t): (usize, usize),
    out: &TensorRef,
) -> Result<()> {
    // The kernel ranks matches by the key start (T + 1) + length in an int64: exact for any T
    // up to 2^31 - 1 (T^2 + 2T < 2^63).
    if t > MAX_COLS {
        return Err(Error::shape(
            "token_ids",
            format!("[B, T] with T <= {MAX_COLS} on the CUDA kernels"),
            &[b, t],
        ));
    }
    let params = FindAnchorsParams {
        tokens: ptr(&inp.token_ids),
        token_code: Side::of(&inp.token_ids).code,
        token_s0: stride(&inp.token_ids, 0),
        token_s1: stride(&inp.token_ids, 1),
        mask: ptr(&inp.response_mask),
        mask_code: Side::of(&inp.response_mask).code,
        mask_s0: stride(&inp.response_mask, 0),
        mask_s1: stride(&inp.response_mask, 1),
        marker_tokens: ptr(&inp.marker_tokens),
        marker_offsets: ptr(&inp.marker_offsets),
        num_markers: inp.marker_offsets.numel() as i64 - 1,
        rows: b as i64,
        cols: t as i64,
        last: (inp.occurrence == Occurrence::Last) as i64,
        offset: inp.offset,
        out: ptr(out),
    };
    exec.launch(Family::Anchors, "find_anchors", Grid::blocks(b)?, &params)
}
