//! Python entry points of the DAPO ops. Outputs are allocated by the caller (torch).

use pyo3::prelude::*;

use super::errors::run;
use super::tensor::{Borrowed, import_on, import_opt_on, view_opt, write_floats};
use crate::dispatch::dapo;
use crate::error::Result;
use crate::op::dapo::{AggConfig, ClipConfig, NormaliserTensors, PolicyInputs, PolicyKernelArgs};
use crate::op::groups::Grouping;

/// Group-normalised advantages into `out` (float32 `[B]`).
#[pyfunction]
#[pyo3(signature = (scores, group_ids, group_size, eps, norm_by_std, out, totals=None,
                    order=None, stream=None))]
#[allow(clippy::too_many_arguments)]
pub fn group_advantages(
    py: Python<'_>,
    scores: &Bound<'_, PyAny>,
    group_ids: Option<&Bound<'_, PyAny>>,
    group_size: Option<i64>,
    eps: f64,
    norm_by_std: bool,
    out: &Bound<'_, PyAny>,
    totals: Option<&Bound<'_, PyAny>>,
    order: Option<&Bound<'_, PyAny>>,
    stream: Option<usize>,
) -> PyResult<()> {
    let scores = import_on(scores, "scores", stream)?;
    let group_ids = import_opt_on(group_ids, "group_ids", stream)?;
    let out = import_on(out, "out", stream)?;
    let totals = import_opt_on(totals, "totals", stream)?;
    let order = import_opt_on(order, "order", stream)?;
    run(py, "hidden_align.dapo.group_advantages", move || {
        let grouping = Grouping::from_args(view_opt(&group_ids)?, group_size)?;
        dapo::group_advantages(
            &scores.view()?,
            &grouping,
            eps,
            norm_by_std,
            &mut out.view()?,
            view_opt(&totals)?.as_ref(),
            view_opt(&order)?.as_ref(),
            stream,
        )
    })
}

/// Dynamic-sampling keep mask into `out` (bool `[B]`).
#[pyfunction]
#[pyo3(signature = (metric, group_ids, group_size, out, order=None, stream=None))]
#[allow(clippy::too_many_arguments)]
pub fn dynamic_sampling_mask(
    py: Python<'_>,
    metric: &Bound<'_, PyAny>,
    group_ids: Option<&Bound<'_, PyAny>>,
    group_size: Option<i64>,
    out: &Bound<'_, PyAny>,
    order: Option<&Bound<'_, PyAny>>,
    stream: Option<usize>,
) -> PyResult<()> {
    let metric = import_on(metric, "metric", stream)?;
    let group_ids = import_opt_on(group_ids, "group_ids", stream)?;
    let out = import_on(out, "out", stream)?;
    let order = import_opt_on(order, "order", stream)?;
    run(py, "hidden_align.dapo.dynamic_sampling_mask", move || {
        let grouping = Grouping::from_args(view_opt(&group_ids)?, group_size)?;
        dapo::dynamic_sampling_mask(
            &metric.view()?,
            &grouping,
            &mut out.view()?,
            view_opt(&order)?.as_ref(),
            stream,
        )
    })
}

/// Overlong penalty into `out` (float32 `[B]`).
#[pyfunction]
#[pyo3(signature = (response_lengths, max_response_length, buffer_length, penalty_factor, out,
                    stream=None))]
pub fn overlong_penalty(
    py: Python<'_>,
    response_lengths: &Bound<'_, PyAny>,
    max_response_length: f64,
    buffer_length: f64,
    penalty_factor: f64,
    out: &Bound<'_, PyAny>,
    stream: Option<usize>,
) -> PyResult<()> {
    let lengths = import_on(response_lengths, "response_lengths", stream)?;
    let out = import_on(out, "out", stream)?;
    run(py, "hidden_align.dapo.overlong_penalty", move || {
        dapo::overlong_penalty(
            &lengths.view()?,
            max_response_length,
            buffer_length,
            penalty_factor,
            &mut out.view()?,
            stream,
        )
    })
}

/// The tensors of the policy loss as the Python side passes them: `(log_prob, old_log_prob,
/// advantages, response_mask, rollout_is_weights or None)`.
type PolicyTensors<'py> = (
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Option<Bound<'py, PyAny>>,
);

/// The clip options: `(clip_ratio_low, clip_ratio_high, clip_ratio_c, log_ratio_clamp or None)`.
type ClipArgs = (f64, f64, f64, Option<f64>);

struct PolicyArgs {
    log_prob: Borrowed,
    old_log_prob: Borrowed,
    advantages: Borrowed,
    response_mask: Borrowed,
    rollout_is_weights: Option<Borrowed>,
}

impl PolicyArgs {
    fn import(
        (log_prob, old_log_prob, advantages, response_mask, weights): &PolicyTensors<'_>,
        on: Option<usize>,
    ) -> PyResult<Self> {
        Ok(PolicyArgs {
            log_prob: import_on(log_prob, "log_prob", on)?,
            old_log_prob: import_on(old_log_prob, "old_log_prob", on)?,
            advantages: import_on(advantages, "advantages", on)?,
            response_mask: import_on(response_mask, "response_mask", on)?,
            rollout_is_weights: import_opt_on(weights.as_ref(), "rollout_is_weights", on)?,
        })
    }

    fn views(&self) -> Result<PolicyInputs<'_>> {
        Ok(PolicyInputs {
            log_prob: self.log_prob.view()?,
            old_log_prob: self.old_log_prob.view()?,
            advantages: self.advantages.view()?,
            response_mask: self.response_mask.view()?,
            rollout_is_weights: view_opt(&self.rollout_is_weights)?,
        })
    }
}

fn clip_config((low, high, c, clamp): ClipArgs) -> Result<ClipConfig> {
    ClipConfig::new(low, high, c, clamp)
}

/// Normalisers given as tensors: `(batch_num_tokens, global_batch_size, loss_scale_factor)`,
/// each a one-element tensor or None.
type NormaliserArgs<'py> = (
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
);

/// A normaliser given as a number, or as a one-element tensor, which replaces the number:
/// the kernels read it where it lives (no host read of device memory), the CPU backend on the
/// host. A placeholder number marks it as given for the dp_size > 1 checks.
fn normaliser(
    value: Option<f64>,
    tensor: &Option<Borrowed>,
) -> Result<(Option<f64>, Option<crate::tensor::TensorRef<'_>>)> {
    match tensor {
        Some(t) => Ok((Some(1.0), Some(t.view()?))),
        None => Ok((value, None)),
    }
}

/// Forward of the clipped policy loss. Fills `out_loss` (0-d), `out_metrics` (`[3]`:
/// pg_clipfrac, ppo_kl, pg_clipfrac_lower), `out_row_scale` (`[B]`, read by the backward) and, when given,
/// `out_factor` (`[B, T]`: the per-token derivative the backward scales in place).
/// `norm_tensors` overrides the numbers of the same names; `partials` is the kernel
/// backend's scratch (`[B, policy_chunks(T), 5]` float64).
#[pyfunction]
#[pyo3(signature = (inputs, clip, loss_agg_mode, batch_num_tokens, dp_size, global_batch_size,
                    loss_scale_factor, out_loss, out_metrics, out_row_scale, out_factor,
                    norm_tensors=(None, None, None), partials=None, stream=None))]
#[allow(clippy::too_many_arguments)]
pub fn policy_loss_forward(
    py: Python<'_>,
    inputs: PolicyTensors<'_>,
    clip: ClipArgs,
    loss_agg_mode: &str,
    batch_num_tokens: Option<f64>,
    dp_size: i64,
    global_batch_size: Option<f64>,
    loss_scale_factor: Option<f64>,
    out_loss: &Bound<'_, PyAny>,
    out_metrics: &Bound<'_, PyAny>,
    out_row_scale: &Bound<'_, PyAny>,
    out_factor: Option<&Bound<'_, PyAny>>,
    norm_tensors: NormaliserArgs<'_>,
    partials: Option<&Bound<'_, PyAny>>,
    stream: Option<usize>,
) -> PyResult<()> {
    let args = PolicyArgs::import(&inputs, stream)?;
    let out = import_on(out_row_scale, "out_row_scale", stream)?;
    let loss = import_on(out_loss, "out_loss", stream)?;
    let metrics = import_on(out_metrics, "out_metrics", stream)?;
    let factor = import_opt_on(out_factor, "out_factor", stream)?;
    let partials = import_opt_on(partials, "partials", stream)?;
    let bnt = import_opt_on(norm_tensors.0.as_ref(), "batch_num_tokens", stream)?;
    let gbs = import_opt_on(norm_tensors.1.as_ref(), "global_batch_size", stream)?;
    let lsf = import_opt_on(norm_tensors.2.as_ref(), "loss_scale_factor", stream)?;
    let mode = loss_agg_mode.to_owned();
    run(py, "hidden_align.dapo.policy_loss", move || {
        let clip = clip_config(clip)?;
        let (batch_num_tokens, bnt) = normaliser(batch_num_tokens, &bnt)?;
        let (global_batch_size, gbs) = normaliser(global_batch_size, &gbs)?;
        let (loss_scale_factor, lsf) = normaliser(loss_scale_factor, &lsf)?;
        let agg = AggConfig::new(
            &mode,
            batch_num_tokens,
            dp_size,
            global_batch_size,
            loss_scale_factor,
        )?;
        let norms = NormaliserTensors {
            batch_num_tokens: bnt,
            global_batch_size: gbs,
            loss_scale_factor: lsf,
        };
        let mut factor = view_opt(&factor)?;
        let (mut loss, mut metrics) = (loss.view()?, metrics.view()?);
        let partials = view_opt(&partials)?;
        let kernel = PolicyKernelArgs {
            loss: Some(&loss),
            metrics: Some(&metrics),
            partials: partials.as_ref(),
            norms: &norms,
            stream,
        };
        let host = dapo::policy_loss_forward(
            &args.views()?,
            &clip,
            &agg,
            &mut out.view()?,
            factor.as_mut(),
            kernel,
        )?;
        match host {
            Some(f) => {
                write_floats(&mut loss, [f.loss].into_iter())?;
                let values = [f.pg_clipfrac, f.ppo_kl, f.pg_clipfrac_lower];
                write_floats(&mut metrics, values.into_iter())
            }
            None => Ok(()),
        }
    })
}

/// Backward of the clipped policy loss into `out_grad` (`[B, T]`, the dtype of log_prob);
/// with `saved_factor`, `out_grad` holds the forward's `out_factor` and is scaled in place.
/// `grad_output` is the one-element upstream gradient (read on the device for CUDA tensors).
#[pyfunction]
#[pyo3(signature = (inputs, clip, row_scale, grad_output, out_grad, saved_factor, stream=None))]
#[allow(clippy::too_many_arguments)]
pub fn policy_loss_backward(
    py: Python<'_>,
    inputs: PolicyTensors<'_>,
    clip: ClipArgs,
    row_scale: &Bound<'_, PyAny>,
    grad_output: &Bound<'_, PyAny>,
    out_grad: &Bound<'_, PyAny>,
    saved_factor: bool,
    stream: Option<usize>,
) -> PyResult<()> {
    let args = PolicyArgs::import(&inputs, stream)?;
    let grad_output = import_on(grad_output, "grad_output", stream)?;
    let row_scale = import_on(row_scale, "row_scale", stream)?;
    let out = import_on(out_grad, "out_grad", stream)?;
    run(py, "hidden_align.dapo.policy_loss backward", move || {
        let clip = clip_config(clip)?;
        let grad = &mut out.view()?;
        dapo::policy_loss_backward(
            &args.views()?,
            &clip,
            &row_scale.view()?,
            &grad_output.view()?,
            grad,
            saved_factor,
            stream,
        )
    })
}
