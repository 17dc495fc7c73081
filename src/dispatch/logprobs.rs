//! Token log-probs and entropies of a chunk of logits, dispatched to a backend.

use super::{Backend, select};
use crate::cpu;
use crate::cpu::float::Elem;
use crate::cpu::logprobs::{RowGrad, Rows};
use crate::cuda;
use crate::error::{Error, Result};
use crate::op::logprobs::{LogprobBackward, LogprobForward, LogprobOutputs, check_targets};
use crate::tensor::{DType, TensorRef};

fn rows_of(logits: &TensorRef, v: usize) -> Rows {
    Rows {
        base: logits.data_ptr() as usize,
        row_stride: logits.strides()[0],
        cols: v,
    }
}

/// Fills the outputs of one chunk. On the CPU a target outside `0..V` that is not the ignore
/// index is an error; on the kernel backend it makes its row NaN.
pub fn forward(
    inp: &LogprobForward,
    out: &mut LogprobOutputs,
    stream: Option<usize>,
) -> Result<()> {
    let backend = select(&inp.logits, &inp.others(out), stream)?;
    let shape = inp.check(out)?;
    if let Backend::Kernels(exec) = backend {
        return cuda::logprobs::forward(&exec, inp, out, shape);
    }
    let (n, v) = shape;
    check_targets(&inp.targets, v, inp.options.ignore_index)?;
    if n == 0 {
        return Ok(());
    }
    let targets = inp.targets.to_i64_vec()?;
    let rows = rows_of(&inp.logits, v);
    crate::dispatch_float!(inp.logits.dtype(), E => {
        type A = <E as Elem>::Acc;
        // SAFETY: the outputs are fresh tensors owned by this call, distinct from each other.
        let logprob = unsafe { out.logprob.as_mut_slice::<A>()? };
        let stats = unsafe { out.stats.as_mut_slice::<A>()? };
        let entropy = match out.entropy.as_mut() {
            Some(e) => Some(unsafe { e.as_mut_slice::<A>()? }),
            None => None,
        };
        // SAFETY: rows describe the checked [n, V] logits of element type E.
        unsafe { cpu::logprobs::forward::<E>(rows, &targets, inp.options, logprob, stats, entropy) };
        Ok(())
    })
}

/// `acc += x` on the CPU: `acc` float32, `x` float32, bfloat16 or float16 of its shape, both
/// contiguous (the weight gradient's float32 sum of per-chunk products; torch's mixed-dtype
/// add converts `x` into a temporary first, which made it the largest cost of a bfloat16
/// backward after the matmuls).
pub fn accumulate_f32(acc: &mut TensorRef, x: &TensorRef) -> Result<()> {
    acc.expect_dtype(&[DType::F32])?;
    x.expect_buffer(acc.shape(), x.dtype())?;
    // SAFETY: acc is the accumulator the caller allocated, distinct from x.
    let dst = unsafe { acc.as_mut_slice::<f32>()? };
    match x.dtype() {
        DType::BF16 => cpu::logprobs::accumulate(dst, x.as_slice::<half::bf16>()?),
        DType::F16 => cpu::logprobs::accumulate(dst, x.as_slice::<half::f16>()?),
        DType::F32 => cpu::logprobs::accumulate(dst, x.as_slice::<f32>()?),
        other => {
            return Err(Error::Dtype {
                arg: x.name(),
                expected: "float32, bfloat16 or float16".into(),
                got: other.to_string(),
            });
        }
    }
    Ok(())
}

/// Turns the chunk of logits into its gradient, in place.
pub fn backward(inp: &LogprobBackward, stream: Option<usize>) -> Result<()> {
    let backend = select(&inp.logits, &inp.others(), stream)?;
    let shape = inp.check()?;
    if let Backend::Kernels(exec) = backend {
        return cuda::logprobs::backward(&exec, inp, shape);
    }
    // The forward pass checked the targets; here a target only selects the column that gains
    // its `hit` (compared, never used as an index), so no value can reach memory it should not.
    let (n, v) = shape;
    if n == 0 {
        return Ok(());
    }
    let targets = inp.targets.to_i64_vec()?;
    let read = |t: &Option<TensorRef>| -> Result<Vec<f64>> {
        t.as_ref().map_or(Ok(vec![0.0; n]), |t| t.to_f64_vec())
    };
    let (g_lp, g_ent) = (read(&inp.grad_logprob)?, read(&inp.grad_entropy)?);
    let entropy = read(&inp.entropy)?;
    let rows = rows_of(&inp.logits, v);
    crate::dispatch_float!(inp.logits.dtype(), E => {
        use crate::cpu::float::Acc;
        type A = <E as Elem>::Acc;
        let stats = inp.stats.as_slice::<A>()?;
        let grads = |r: usize| RowGrad {
            grad_logprob: A::of(g_lp[r]),
            grad_entropy: A::of(g_ent[r]),
            max: stats[2 * r],
            log_sum: stats[2 * r + 1],
            entropy: A::of(entropy[r]),
        };
        // SAFETY: the logits are the caller's scratch chunk, rows of V contiguous columns
        // that do not overlap (checked: stride 1 along V; row stride from a [n, V] tensor).
        unsafe { cpu::logprobs::backward::<E>(rows, &targets, inp.options, grads) };
        Ok(())
    })
}
