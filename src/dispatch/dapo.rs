//! DAPO token-level computations with verl's semantics (docs/design.md section 5): group
//! advantages, the dynamic-sampling filter, overlong shaping, and the clipped policy loss with
//! its aggregation modes, fused forward and backward.

use super::{Backend, select};
use crate::cpu;
use crate::cuda;
use crate::error::{Error, Result};
use crate::op::dapo::{
    AggConfig, ClipConfig, FLOATS, PolicyForward, PolicyForwardBuffers, PolicyInputs,
    PolicyKernelArgs,
};
use crate::op::groups::{Grouping, dense_groups};
use crate::tensor::{DType, TensorRef};

/// Picks the backend of the policy loss and checks its inputs.
fn validate(inputs: &PolicyInputs, stream: Option<usize>) -> Result<((usize, usize), Backend)> {
    let backend = select(&inputs.log_prob, &inputs.others(), stream)?;
    if let Backend::Kernels(_) = backend {
        cuda::expect_kernel_float(&inputs.log_prob)?;
    }
    Ok((inputs.check()?, backend))
}

/// Group-normalised outcome advantages (verl `compute_grpo_outcome_advantage`): per group the
/// mean and unbiased std of the scores, `A = (r - mean) / (std + eps)` or `r - mean`; a
/// singleton group has mean 0 and std 1. `scores` is `[B]` or token-level `[B, T]` (summed
/// over T); `out` is float32 `[B]`. The kernel backend needs `totals`, float64 `[B]`, and
/// `order`, int32 `[2 B]`, as scratch.
#[allow(clippy::too_many_arguments)]
pub fn group_advantages(
    scores: &TensorRef,
    grouping: &Grouping,
    eps: f64,
    norm_by_std: bool,
    out: &mut TensorRef,
    totals: Option<&TensorRef>,
    order: Option<&TensorRef>,
    stream: Option<usize>,
) -> Result<()> {
    scores.expect_dtype(&FLOATS)?;
    let backend = select(scores, &[grouping.tensor(), totals, order], stream)?;
    if scores.ndim() != 1 && scores.ndim() != 2 {
        return Err(Error::shape(
            "scores",
            "[B] or token-level [B, T]",
            scores.shape(),
        ));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::value("eps", "a finite number >= 0", eps));
    }
    let batch = scores.shape()[0];
    if let Backend::Kernels(exec) = backend {
        grouping.check_metadata(batch)?;
        cuda::expect_buffer(out, &[batch], DType::F32)?;
        let totals = cuda::expect_scratch(totals, "totals", &[batch], DType::F64)?;
        let order = cuda::expect_scratch(order, "order", &[2 * batch], DType::I32)?;
        return cuda::dapo::group_advantages(
            &exec,
            scores,
            grouping,
            eps,
            norm_by_std,
            totals,
            order,
            out,
        );
    }
    let (group, num_groups) = dense_groups(grouping, batch)?;
    expect_out(out, &[batch], DType::F32)?;
    let totals = crate::dispatch_float!(scores.dtype(), T => cpu::dapo::row_sums::<T>(scores));
    // SAFETY: out is a fresh output owned by this call.
    let out = unsafe { out.as_mut_slice::<f32>()? };
    cpu::dapo::group_advantages(&totals, &group, num_groups, eps, norm_by_std, out);
    Ok(())
}

/// DAPO dynamic sampling: `out[b]` is true when rollout b's group has a metric with nonzero
/// spread or a single member. A NaN metric counts as no spread. The kernel backend needs
/// `order`, int32 `[2 B]` scratch.
pub fn dynamic_sampling_mask(
    metric: &TensorRef,
    grouping: &Grouping,
    out: &mut TensorRef,
    order: Option<&TensorRef>,
    stream: Option<usize>,
) -> Result<()> {
    let backend = select(metric, &[grouping.tensor(), order], stream)?;
    metric.expect_ndim(1, "[B]")?;
    let batch = metric.shape()[0];
    if let Backend::Kernels(exec) = backend {
        grouping.check_metadata(batch)?;
        cuda::expect_buffer(out, &[batch], DType::Bool)?;
        let order = cuda::expect_scratch(order, "order", &[2 * batch], DType::I32)?;
        return cuda::dapo::dynamic_sampling_mask(&exec, metric, grouping, order, out);
    }
    let (group, num_groups) = dense_groups(grouping, batch)?;
    expect_out(out, &[batch], DType::Bool)?;
    let values = metric.to_f64_vec()?;
    // SAFETY: out is a fresh output owned by this call.
    let out = unsafe { out.as_mut_slice::<bool>()? };
    cpu::dapo::dynamic_sampling(&values, &group, num_groups, out);
    Ok(())
}

/// DAPO overlong reward shaping: `min(-(L - (max_len - buffer)) / buffer * factor, 0)` per
/// rollout; `out` is float32 `[B]`.
pub fn overlong_penalty(
    lengths: &TensorRef,
    max_response_length: f64,
    buffer_length: f64,
    penalty_factor: f64,
    out: &mut TensorRef,
    stream: Option<usize>,
) -> Result<()> {
    let backend = select(lengths, &[], stream)?;
    lengths.expect_ndim(1, "[B]")?;
    if !(buffer_length.is_finite() && buffer_length > 0.0) {
        return Err(Error::value(
            "buffer_length",
            "a finite number > 0",
            buffer_length,
        ));
    }
    if !(max_response_length.is_finite() && max_response_length >= buffer_length) {
        return Err(Error::value(
            "max_response_length",
            format!("a finite number >= buffer_length = {buffer_length}"),
            max_response_length,
        ));
    }
    if !penalty_factor.is_finite() {
        return Err(Error::value(
            "penalty_factor",
            "a finite number",
            penalty_factor,
        ));
    }
    if let Backend::Kernels(exec) = backend {
        cuda::expect_buffer(out, &[lengths.shape()[0]], DType::F32)?;
        return cuda::dapo::overlong_penalty(
            &exec,
            lengths,
            max_response_length,
            buffer_length,
            penalty_factor,
            out,
        );
    }
    let values = lengths.to_f64_vec()?;
    expect_out(out, &[values.len()], DType::F32)?;
    // SAFETY: out is a fresh output owned by this call.
    let out = unsafe { out.as_mut_slice::<f32>()? };
    let expected = max_response_length - buffer_length;
    for (o, l) in out.iter_mut().zip(values) {
        let v = -(l - expected) / buffer_length * penalty_factor;
        // A NaN length stays NaN, as verl's `min(v, 0)` leaves it (f64::min would give 0).
        *o = if v.is_nan() { v } else { v.min(0.0) } as f32;
    }
    Ok(())
}

fn expect_out(out: &TensorRef, shape: &[usize], dtype: DType) -> Result<()> {
    out.expect_dtype(&[dtype])?;
    if out.shape() != shape {
        return Err(Error::shape(out.name(), format!("{shape:?}"), out.shape()));
    }
    Ok(())
}

/// Forward of the clipped policy loss in one pass. Writes `dloss/d(l m)` per row into
/// `row_scale` (float32 `[B]`, float64 for float64 inputs) and, when `factor` is given (a
/// contiguous `[B, T]` tensor of log_prob's dtype), the per-token `m w dl/dlog_prob`, which
/// turns the backward into one scaling pass.
pub fn policy_loss_forward(
    inputs: &PolicyInputs,
    clip: &ClipConfig,
    agg: &AggConfig,
    row_scale: &mut TensorRef,
    factor: Option<&mut TensorRef>,
    kernel: PolicyKernelArgs,
) -> Result<Option<PolicyForward>> {
    let ((b, t), backend) = validate(inputs, kernel.stream)?;
    let dtype = inputs.log_prob.dtype();
    if let Backend::Kernels(exec) = backend {
        cuda::expect_buffer(row_scale, &[b], DType::F32)?;
        if let Some(f) = &factor {
            cuda::expect_buffer(f, &[b, t], dtype)?;
        }
        let loss = cuda::expect_scratch(kernel.loss, "loss", &[], DType::F32)?;
        let metrics = cuda::expect_scratch(kernel.metrics, "metrics", &[3], DType::F32)?;
        let chunks = cuda::dapo::policy_chunks(t);
        let partials = cuda::expect_scratch(
            kernel.partials,
            "partials",
            &[b, chunks, cuda::dapo::POLICY_SUMS],
            DType::F64,
        )?;
        let norms = kernel.norms;
        for n in [
            &norms.batch_num_tokens,
            &norms.global_batch_size,
            &norms.loss_scale_factor,
        ]
        .into_iter()
        .flatten()
        {
            if n.numel() != 1 {
                return Err(Error::shape(n.name(), "one element", n.shape()));
            }
            if n.device() != inputs.log_prob.device() {
                return Err(Error::Device {
                    arg: n.name(),
                    expected: inputs.log_prob.device().to_string(),
                    got: n.device().to_string(),
                });
            }
        }
        let bufs = PolicyForwardBuffers {
            loss,
            metrics,
            row_scale,
            factor: factor.as_deref(),
            partials,
        };
        cuda::dapo::policy_forward(&exec, inputs, (b, t), clip, agg, norms, &bufs)?;
        return Ok(None);
    }
    let acc = accumulator(dtype);
    expect_out(row_scale, &[b], acc)?;
    if let Some(f) = &factor {
        expect_out(f, &[b, t], dtype)?;
    }
    // Normalisers given as tensors: read on the host here, then checked as numbers.
    let norms = kernel.norms;
    let read = |t: &Option<TensorRef>, v: Option<f64>| -> Result<Option<f64>> {
        t.as_ref().map_or(Ok(v), |t| t.item_f64(t.name()).map(Some))
    };
    let agg = &AggConfig::new_mode(
        agg.mode,
        read(&norms.batch_num_tokens, agg.batch_num_tokens)?,
        agg.dp_size as i64,
        read(&norms.global_batch_size, agg.global_batch_size)?,
        read(&norms.loss_scale_factor, agg.loss_scale_factor)?,
    )?;
    crate::dispatch_float!(dtype, T => {
        crate::dispatch_any!(inputs.response_mask.dtype(), M => {
            // SAFETY: row_scale and factor are fresh outputs owned by this call.
            let scale = unsafe { row_scale.as_mut_slice::<<T as cpu::float::Elem>::Acc>()? };
            let factor = match factor {
                Some(f) => Some(unsafe { f.as_mut_slice::<T>()? }),
                None => None,
            };
            Ok(Some(cpu::dapo::policy_forward::<T, M>(inputs, (b, t), clip, agg, scale, factor)))
        })
    })
}

/// Backward of the clipped policy loss in one pass: `grad` (`[B, T]`, the dtype of
/// `log_prob`) receives `upstream * dloss/dlog_prob`, zero at masked positions. With
/// `saved_factor`, `grad` holds the factor the forward wrote and is scaled in place; otherwise
/// the token math is recomputed from the inputs. `upstream` is the one-element gradient of
/// the loss (read on the device by the kernel backend).
pub fn policy_loss_backward(
    inputs: &PolicyInputs,
    clip: &ClipConfig,
    row_scale: &TensorRef,
    upstream: &TensorRef,
    grad: &mut TensorRef,
    saved_factor: bool,
    stream: Option<usize>,
) -> Result<()> {
    let ((b, t), backend) = validate(inputs, stream)?;
    let dtype = inputs.log_prob.dtype();
    if let Backend::Kernels(exec) = backend {
        cuda::expect_buffer(row_scale, &[b], DType::F32)?;
        cuda::expect_buffer(grad, &[b, t], dtype)?;
        if upstream.numel() != 1 || upstream.device() != inputs.log_prob.device() {
            return Err(Error::shape(
                "grad_output",
                "one element on the device of log_prob",
                upstream.shape(),
            ));
        }
        return cuda::dapo::policy_backward(
            &exec,
            inputs,
            (b, t),
            clip,
            row_scale,
            upstream,
            grad,
            saved_factor,
        );
    }
    let upstream = upstream.item_f64("grad_output")?;
    expect_out(row_scale, &[b], accumulator(dtype))?;
    expect_out(grad, &[b, t], dtype)?;
    crate::dispatch_float!(dtype, T => {
        let scale = row_scale.as_slice::<<T as cpu::float::Elem>::Acc>()?;
        // SAFETY: grad is an output owned by this call (fresh, or the saved factor that only
        // the autograd node holds).
        let out = unsafe { grad.as_mut_slice::<T>()? };
        if saved_factor {
            cpu::dapo::policy_backward_saved::<T>(t, scale, upstream, out);
            return Ok(());
        }
        crate::dispatch_any!(inputs.response_mask.dtype(), M => {
            cpu::dapo::policy_backward::<T, M>(inputs, (b, t), clip, scale, upstream, out);
            Ok(())
        })
    })
}

fn accumulator(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}
