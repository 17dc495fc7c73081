//! Python entry points of the token log-prob passes over one chunk of logits. The chunk
//! loop, the matmuls and autograd are in `python/hidden_align/logprobs.py`.

use pyo3::prelude::*;

use super::errors::run;
use super::tensor::{import_on, import_opt_on, view_opt};
use crate::dispatch::logprobs;
use crate::op::logprobs::{LogprobBackward, LogprobForward, LogprobOptions, LogprobOutputs};

/// Fills `out_logprob` and (when given) `out_entropy` (each `[n]`, float32; float64 for
/// float64 logits) and `out_stats` (`[n, 2]`: each row's max and log-sum, for the backward
/// pass) from `logits` `[n, V]` and `targets` int64 `[n]`.
#[pyfunction]
#[pyo3(signature = (logits, targets, temperature, ignore_index, out_logprob, out_stats,
                    out_entropy=None, stream=None))]
#[allow(clippy::too_many_arguments)]
pub fn token_logprobs_forward(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    targets: &Bound<'_, PyAny>,
    temperature: f64,
    ignore_index: i64,
    out_logprob: &Bound<'_, PyAny>,
    out_stats: &Bound<'_, PyAny>,
    out_entropy: Option<&Bound<'_, PyAny>>,
    stream: Option<usize>,
) -> PyResult<()> {
    let logits = import_on(logits, "logits", stream)?;
    let targets = import_on(targets, "targets", stream)?;
    let out_logprob = import_on(out_logprob, "out_logprob", stream)?;
    let out_stats = import_on(out_stats, "out_stats", stream)?;
    let out_entropy = import_opt_on(out_entropy, "out_entropy", stream)?;
    run(py, "hidden_align.token_logprobs", move || {
        let inputs = LogprobForward {
            logits: logits.view()?,
            targets: targets.view()?,
            options: LogprobOptions::new(temperature, ignore_index)?,
        };
        let mut out = LogprobOutputs {
            logprob: out_logprob.view()?,
            entropy: view_opt(&out_entropy)?,
            stats: out_stats.view()?,
        };
        logprobs::forward(&inputs, &mut out, stream)
    })
}

/// `grad_weight += partial` (float32; `partial` float32, bfloat16 or float16 of its shape),
/// both contiguous CPU tensors: the weight gradient's per-chunk sums.
#[pyfunction]
pub fn accumulate_f32(
    py: Python<'_>,
    grad_weight: &Bound<'_, PyAny>,
    partial: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let acc = import_on(grad_weight, "grad_weight", None)?;
    let x = import_on(partial, "partial", None)?;
    run(py, "hidden_align.token_logprobs", move || {
        logprobs::accumulate_f32(&mut acc.view()?, &x.view()?)
    })
}

/// Overwrites `logits` (the chunk recomputed) with the gradient of
/// `sum(grad_logprob * logprob + grad_entropy * entropy)` w.r.t. it.
#[pyfunction]
#[pyo3(signature = (logits, targets, temperature, ignore_index, stats, entropy=None,
                    grad_logprob=None, grad_entropy=None, stream=None))]
#[allow(clippy::too_many_arguments)]
pub fn token_logprobs_backward(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    targets: &Bound<'_, PyAny>,
    temperature: f64,
    ignore_index: i64,
    stats: &Bound<'_, PyAny>,
    entropy: Option<&Bound<'_, PyAny>>,
    grad_logprob: Option<&Bound<'_, PyAny>>,
    grad_entropy: Option<&Bound<'_, PyAny>>,
    stream: Option<usize>,
) -> PyResult<()> {
    let logits = import_on(logits, "logits", stream)?;
    let targets = import_on(targets, "targets", stream)?;
    let stats = import_on(stats, "stats", stream)?;
    let entropy = import_opt_on(entropy, "entropy", stream)?;
    let grad_logprob = import_opt_on(grad_logprob, "grad_logprob", stream)?;
    let grad_entropy = import_opt_on(grad_entropy, "grad_entropy", stream)?;
    run(py, "hidden_align.token_logprobs", move || {
        let inputs = LogprobBackward {
            logits: logits.view()?,
            targets: targets.view()?,
            options: LogprobOptions::new(temperature, ignore_index)?,
            stats: stats.view()?,
            entropy: view_opt(&entropy)?,
            grad_logprob: view_opt(&grad_logprob)?,
            grad_entropy: view_opt(&grad_entropy)?,
        };
        logprobs::backward(&inputs, stream)
    })
}
