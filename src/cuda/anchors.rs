//! Launch code of `kernels/anchors.cu`.

use super::{Executor, Family, Grid, Side, ptr, stride};
use crate::error::{Error, Result};
use crate::op::anchors::{FindAnchors, Markers, Occurrence};
use crate::tensor::TensorRef;

/// The longest rows the kernel ranks exactly.
const MAX_COLS: usize = (1 << 31) - 1;

/// `struct TokenRows` of `kernels/anchors.cu`: the token ids and the response mask.
#[repr(C)]
#[derive(Clone, Copy)]
struct TokenRows {
    tokens: u64,
    token_code: i64,
    token_s0: i64,
    token_s1: i64,
    mask: u64,
    mask_code: i64,
    mask_s0: i64,
    mask_s1: i64,
}

impl TokenRows {
    fn of(ids: &TensorRef, mask: &TensorRef) -> Self {
        TokenRows {
            tokens: ptr(ids),
            token_code: Side::of(ids).code,
            token_s0: stride(ids, 0),
            token_s1: stride(ids, 1),
            mask: ptr(mask),
            mask_code: Side::of(mask).code,
            mask_s0: stride(mask, 0),
            mask_s1: stride(mask, 1),
        }
    }
}

/// `struct FindAnchorsParams` of `kernels/anchors.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct FindAnchorsParams {
    rows_in: TokenRows,
    marker_tokens: u64,
    marker_offsets: u64,
    num_markers: i64,
    rows: i64,
    cols: i64,
    last: i64,
    offset: i64,
    out: u64,
}

/// `struct FindTextAnchorsParams` of `kernels/anchors.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct FindTextAnchorsParams {
    rows_in: TokenRows,
    vocab_bytes: u64,
    vocab_offsets: u64,
    vocab_size: i64,
    token_starts: u64,
    marker_bytes: u64,
    marker_offsets: u64,
    num_markers: i64,
    rows: i64,
    cols: i64,
    last: i64,
    offset: i64,
    out: u64,
}

/// One launch of `find_anchors` (token-id spellings) or `find_text_anchors` (marker texts), a
/// block per row. Shapes and dtypes were checked by the
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
    let last = (inp.occurrence == Occurrence::Last) as i64;
    let rows_in = TokenRows::of(&inp.token_ids, &inp.response_mask);
    let grid = Grid::blocks(b)?;
    match &inp.markers {
        Markers::Tokens { tokens, offsets } => {
            let params = FindAnchorsParams {
                rows_in,
                marker_tokens: ptr(tokens),
                marker_offsets: ptr(offsets),
                num_markers: offsets.numel() as i64 - 1,
                rows: b as i64,
                cols: t as i64,
                last,
                offset: inp.offset,
                out: ptr(out),
            };
            exec.launch(Family::Anchors, "find_anchors", grid, &params)
        }
        Markers::Text(m) => {
            let params = FindTextAnchorsParams {
                rows_in,
                vocab_bytes: ptr(&m.vocab_bytes),
                vocab_offsets: ptr(&m.vocab_offsets),
                vocab_size: m.token_starts.numel() as i64,
                token_starts: ptr(&m.token_starts),
                marker_bytes: ptr(&m.marker_bytes),
                marker_offsets: ptr(&m.marker_offsets),
                num_markers: m.marker_offsets.numel() as i64 - 1,
                rows: b as i64,
                cols: t as i64,
                last,
                offset: inp.offset,
                out: ptr(out),
            };
            exec.launch(Family::Anchors, "find_text_anchors", grid, &params)
        }
    }
}
