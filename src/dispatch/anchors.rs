//! `find_anchors` dispatched to a backend.

use super::{Backend, select};
use crate::cpu;
use crate::cuda;
use crate::error::{Error, Result};
use crate::op::anchors::FindAnchors;
use crate::tensor::{DType, TensorRef};

/// Writes each row's anchor into `out` (int64 `[B]`, contiguous): the position `offset` away
/// from the start of the chosen occurrence of any spelling lying wholly inside the response;
/// -1 when there is none or the position is outside `0..T`. On the kernel backend the marker
/// tensors are read on the device and trusted to be well formed (the Python API builds them);
/// the CPU backend checks them.
pub fn find_anchors(inp: &FindAnchors, out: &mut TensorRef, stream: Option<usize>) -> Result<()> {
    let backend = select(&inp.token_ids, &inp.others(), stream)?;
    let (b, t) = inp.check()?;
    cuda::expect_buffer(out, &[b], DType::I64)?;
    if let Backend::Kernels(exec) = backend {
        return cuda::anchors::find_anchors(&exec, inp, (b, t), out);
    }
    let spellings = inp.spellings()?;
    // SAFETY: out is a fresh output owned by this call.
    let dst = unsafe { out.as_mut_slice::<i64>()? };
    macro_rules! run {
        ($id:ty) => {
            crate::dispatch_any!(inp.response_mask.dtype(), M => {
                cpu::anchors::find_anchors::<$id, M>(inp, (b, t), &spellings, dst);
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
