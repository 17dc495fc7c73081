//! Launch code of `kernels/logprobs.cu`.

use super::{Executor, Family, Grid, expect_kernel_float, ptr, stride, suffix};
use crate::error::Result;
use crate::op::logprobs::{LogprobBackward, LogprobForward, LogprobOutputs};
use crate::tensor::TensorRef;

/// `struct LogprobParams` of `kernels/logprobs.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LogprobParams {
    logits: u64,
    row_stride: i64,
    rows: i64,
    cols: i64,
    targets: u64,
    target_stride: i64,
    ignore_index: i64,
    inv_temperature: f32,
    logprob: u64,
    entropy: u64,
    stats: u64,
    grad_logprob: u64,
    grad_logprob_stride: i64,
    grad_entropy: u64,
    grad_entropy_stride: i64,
}

fn base(logits: &TensorRef, targets: &TensorRef, (n, v): (usize, usize)) -> LogprobParams {
    LogprobParams {
        logits: ptr(logits),
        row_stride: stride(logits, 0),
        rows: n as i64,
        cols: v as i64,
        targets: ptr(targets),
        target_stride: stride(targets, 0),
        ignore_index: 0,
        inv_temperature: 0.0,
        logprob: 0,
        entropy: 0,
        stats: 0,
        grad_logprob: 0,
        grad_logprob_stride: 0,
        grad_entropy: 0,
        grad_entropy_stride: 0,
    }
}

fn opt_ptr(t: Option<&TensorRef>) -> (u64, i64) {
    t.map_or((0, 0), |t| (ptr(t), stride(t, 0)))
}

/// The forward pass: one block per row. Targets are read on the device; one out of range
/// makes its row NaN.
pub fn forward(
    exec: &Executor,
    inp: &LogprobForward,
    out: &LogprobOutputs,
    shape: (usize, usize),
) -> Result<()> {
    expect_kernel_float(&inp.logits)?;
    let mut p = base(&inp.logits, &inp.targets, shape);
    p.ignore_index = inp.options.ignore_index;
    p.inv_temperature = (1.0 / inp.options.temperature) as f32;
    p.logprob = ptr(&out.logprob);
    p.stats = ptr(&out.stats);
    p.entropy = opt_ptr(out.entropy.as_ref()).0;
    let kernel = format!("logprob_forward_{}", suffix(inp.logits.dtype()));
    exec.launch(Family::Logprobs, &kernel, Grid::blocks(shape.0)?, &p)
}

/// The backward pass, in place: one block per row.
pub fn backward(exec: &Executor, inp: &LogprobBackward, shape: (usize, usize)) -> Result<()> {
    expect_kernel_float(&inp.logits)?;
    let mut p = base(&inp.logits, &inp.targets, shape);
    p.ignore_index = inp.options.ignore_index;
    p.inv_temperature = (1.0 / inp.options.temperature) as f32;
    p.stats = ptr(&inp.stats);
    p.entropy = opt_ptr(inp.entropy.as_ref()).0;
    (p.grad_logprob, p.grad_logprob_stride) = opt_ptr(inp.grad_logprob.as_ref());
    (p.grad_entropy, p.grad_entropy_stride) = opt_ptr(inp.grad_entropy.as_ref());
    let kernel = format!("logprob_backward_{}", suffix(inp.logits.dtype()));
    exec.launch(Family::Logprobs, &kernel, Grid::blocks(shape.0)?, &p)
}
