//! `find_anchors` dispatched to a backend, and the per-token filter of marker texts.

use super::{Backend, select};
use crate::cpu;
use crate::cuda;
use crate::error::{Error, Result};
use crate::op::anchors::{FindAnchors, Markers, pieces};
use crate::tensor::{DType, TensorRef};

/// Writes each row's anchor into `out` (int64 `[B]`, contiguous): the position `offset` away
/// from the start of the chosen occurrence of any spelling (or marker text) lying wholly inside
/// the response; -1 when there is none or the position is outside `0..T`. On the kernel
/// backend the marker and vocabulary tensors are read on the device and trusted to be well
/// formed (the Python API builds them); the CPU backend checks them where it reads them.
pub fn find_anchors(inp: &FindAnchors, out: &mut TensorRef, stream: Option<usize>) -> Result<()> {
    let backend = select(&inp.token_ids, &inp.others(), stream)?;
    let (b, t) = inp.check()?;
    cuda::expect_buffer(out, &[b], DType::I64)?;
    if let Backend::Kernels(exec) = backend {
        return cuda::anchors::find_anchors(&exec, inp, (b, t), out);
    }
    // SAFETY: out is a fresh output owned by this call.
    let dst = unsafe { out.as_mut_slice::<i64>()? };
    macro_rules! run {
        ($id:ty) => {
            crate::dispatch_any!(inp.response_mask.dtype(), M => {
                match &inp.markers {
                    Markers::Tokens { tokens, offsets } => {
                        let spellings = pieces("markers", tokens, offsets, true)?;
                        cpu::anchors::find_anchors::<$id, M>(inp, (b, t), &spellings, dst);
                    }
                    Markers::Text(text) => {
                        let search = cpu::anchors::TextSearch::new(text)?;
                        cpu::anchors::find_text_anchors::<$id, M>(inp, (b, t), &search, dst);
                    }
                }
                Ok(())
            })
        };
    }
    match inp.token_ids.dtype() {
        DType::I32 => run!(i32),
        DType::I64 => run!(i64),
        other => Err(Error::Dtype {
            arg: "token_ids",
            expected: "int64 or int32".into(),
            got: other.to_string(),
        }),
    }
}

/// Fills `out` (uint8 `[V]`, CPU) with 1 where a match of one of the marker texts can start
/// inside token v of the vocabulary, 0 elsewhere (see [`crate::op::anchors::can_start`]).
/// Every input is a contiguous 1-d CPU tensor: the vocabulary's bytes (uint8) cut by its
/// offsets (int64 `[V + 1]`), the markers' bytes cut by theirs (`[M + 1]`, each non-empty).
pub fn text_marker_starts(
    vocab_bytes: &TensorRef,
    vocab_offsets: &TensorRef,
    marker_bytes: &TensorRef,
    marker_offsets: &TensorRef,
    out: &mut TensorRef,
) -> Result<()> {
    let vocab = pieces::<u8>("vocab", vocab_bytes, vocab_offsets, false)?;
    let markers = pieces::<u8>("markers", marker_bytes, marker_offsets, true)?;
    if markers.is_empty() {
        return Err(Error::value("markers", "at least one marker text", "none"));
    }
    cuda::expect_buffer(out, &[vocab.len()], DType::U8)?;
    // SAFETY: out is a fresh output owned by this call.
    let dst = unsafe { out.as_mut_slice::<u8>()? };
    cpu::anchors::text_marker_starts(&vocab, &markers, dst);
    Ok(())
}
