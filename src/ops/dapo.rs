//! DAPO token-level computations with verl's semantics (DESIGN section 4): group advantages,
//! the dynamic-sampling filter, overlong shaping, and the clipped policy loss with its
//! aggregation modes, fused forward and backward.

use std::str::FromStr;

use crate::cpu;
use crate::cuda::{self, Backend};
use crate::error::{Error, Result};
use crate::ops::grouping_tensor;
use crate::ops::groups::{Grouping, dense_groups};

pub use crate::cuda::dapo::{NormaliserTensors, PolicyForwardBuffers, policy_chunks};
use crate::tensor::{DType, TensorRef};

const FLOATS: [DType; 4] = [DType::F32, DType::BF16, DType::F16, DType::F64];

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
    let backend = cuda::select(scores, &[grouping_tensor(grouping), totals, order], stream)?;
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
    let backend = cuda::select(metric, &[grouping_tensor(grouping), order], stream)?;
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
    let backend = cuda::select(lengths, &[], stream)?;
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
        *o = (-(l - expected) / buffer_length * penalty_factor).min(0.0) as f32;
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

/// verl's loss aggregation modes (`agg_loss`, verl >= 0.7.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AggMode {
    /// `sum(l m) / N * D`, N the global token count (default: the local mask sum).
    TokenMean,
    /// `sum(l m) * D`.
    TokenSum,
    /// Mean over non-empty sequences of the per-sequence token sum.
    SeqMeanTokenSum,
    /// Mean over non-empty sequences of the per-sequence token mean.
    SeqMeanTokenMean,
    /// `seq-mean-token-sum` divided by `loss_scale_factor` (default: T).
    SeqMeanTokenSumNorm,
}

impl FromStr for AggMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "token-mean" => Ok(AggMode::TokenMean),
            "token-sum" => Ok(AggMode::TokenSum),
            "seq-mean-token-sum" => Ok(AggMode::SeqMeanTokenSum),
            "seq-mean-token-mean" => Ok(AggMode::SeqMeanTokenMean),
            "seq-mean-token-sum-norm" => Ok(AggMode::SeqMeanTokenSumNorm),
            other => Err(Error::value(
                "loss_agg_mode",
                "one of 'token-mean', 'token-sum', 'seq-mean-token-sum', 'seq-mean-token-mean', \
                 'seq-mean-token-sum-norm'",
                format!("{other:?}"),
            )),
        }
    }
}

/// Clipping options of the policy loss.
#[derive(Clone, Copy, Debug)]
pub struct ClipConfig {
    /// `eps_low`: the ratio is clipped below at `1 - low`.
    pub low: f64,
    /// `eps_high` (clip-higher): the ratio is clipped above at `1 + high`.
    pub high: f64,
    /// Dual-clip constant `c` (> 1) bounding the loss of negative advantages.
    pub c: f64,
    /// Clamp of `log_prob - old_log_prob` before `exp`; `None` disables it.
    pub log_ratio_clamp: Option<f64>,
}

impl ClipConfig {
    /// Checks the options.
    pub fn new(low: f64, high: f64, c: f64, log_ratio_clamp: Option<f64>) -> Result<Self> {
        if !(low.is_finite() && low >= 0.0) {
            return Err(Error::value("clip_ratio_low", "a finite number >= 0", low));
        }
        if !(high.is_finite() && high >= 0.0) {
            return Err(Error::value(
                "clip_ratio_high",
                "a finite number >= 0",
                high,
            ));
        }
        if !(c.is_finite() && c > 1.0) {
            return Err(Error::value(
                "clip_ratio_c",
                "a finite number > 1 (dual clip)",
                c,
            ));
        }
        if let Some(k) = log_ratio_clamp
            && !(k.is_finite() && k > 0.0)
        {
            return Err(Error::value(
                "log_ratio_clamp",
                "None or a finite number > 0",
                k,
            ));
        }
        Ok(ClipConfig {
            low,
            high,
            c,
            log_ratio_clamp,
        })
    }
}

/// Aggregation options, with verl's optional global normalisers.
#[derive(Clone, Copy, Debug)]
pub struct AggConfig {
    /// The mode.
    pub mode: AggMode,
    /// Global number of valid tokens (token-mean); default the local mask sum.
    pub batch_num_tokens: Option<f64>,
    /// Data-parallel world size D.
    pub dp_size: f64,
    /// Global number of sequences (seq-mean-*); default the local non-empty sequences.
    pub global_batch_size: Option<f64>,
    /// Divisor of seq-mean-token-sum-norm; default the response length T.
    pub loss_scale_factor: Option<f64>,
}

impl AggConfig {
    /// Checks the options the way verl does (a global normaliser is required when D > 1).
    pub fn new(
        mode: &str,
        batch_num_tokens: Option<f64>,
        dp_size: i64,
        global_batch_size: Option<f64>,
        loss_scale_factor: Option<f64>,
    ) -> Result<Self> {
        Self::new_mode(
            mode.parse()?,
            batch_num_tokens,
            dp_size,
            global_batch_size,
            loss_scale_factor,
        )
    }

    /// [`AggConfig::new`] with the mode already parsed.
    pub fn new_mode(
        mode: AggMode,
        batch_num_tokens: Option<f64>,
        dp_size: i64,
        global_batch_size: Option<f64>,
        loss_scale_factor: Option<f64>,
    ) -> Result<Self> {
        if dp_size < 1 {
            return Err(Error::value("dp_size", "an integer >= 1", dp_size));
        }
        for (name, v) in [
            ("batch_num_tokens", batch_num_tokens),
            ("global_batch_size", global_batch_size),
            ("loss_scale_factor", loss_scale_factor),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v > 0.0)
            {
                return Err(Error::value(name, "None or a finite number > 0", v));
            }
        }
        if dp_size > 1 {
            let needs_tokens = mode == AggMode::TokenMean && batch_num_tokens.is_none();
            let needs_seqs = matches!(
                mode,
                AggMode::SeqMeanTokenSum | AggMode::SeqMeanTokenMean | AggMode::SeqMeanTokenSumNorm
            ) && global_batch_size.is_none();
            if needs_tokens {
                return Err(Error::value(
                    "batch_num_tokens",
                    "the global token count when dp_size > 1",
                    "None",
                ));
            }
            if needs_seqs {
                return Err(Error::value(
                    "global_batch_size",
                    "the global batch size when dp_size > 1",
                    "None",
                ));
            }
        }
        Ok(AggConfig {
            mode,
            batch_num_tokens,
            dp_size: dp_size as f64,
            global_batch_size,
            loss_scale_factor,
        })
    }
}

/// The tensors of the policy loss.
pub struct PolicyInputs<'a> {
    /// Current log-probabilities `[B, T]`.
    pub log_prob: TensorRef<'a>,
    /// Old log-probabilities `[B, T]`, same dtype.
    pub old_log_prob: TensorRef<'a>,
    /// Advantages `[B, T]` or per rollout `[B]`, same dtype.
    pub advantages: TensorRef<'a>,
    /// Response mask `[B, T]`, any dtype (bool, integer or float weights).
    pub response_mask: TensorRef<'a>,
    /// Optional importance weights `[B, T]`, same dtype as `log_prob`.
    pub rollout_is_weights: Option<TensorRef<'a>>,
}

impl PolicyInputs<'_> {
    fn validate(&self, stream: Option<usize>) -> Result<((usize, usize), Backend)> {
        let lp = &self.log_prob;
        lp.expect_dtype(&FLOATS)?;
        lp.expect_ndim(2, "[B, T]")?;
        let (b, t) = (lp.shape()[0], lp.shape()[1]);
        let backend = cuda::select(
            lp,
            &[
                Some(&self.old_log_prob),
                Some(&self.advantages),
                Some(&self.response_mask),
                self.rollout_is_weights.as_ref(),
            ],
            stream,
        )?;
        if let Backend::Kernels(_) = backend {
            cuda::expect_kernel_float(lp)?;
        }
        let same_dtype = |x: &TensorRef| -> Result<()> {
            if x.dtype() == lp.dtype() {
                return Ok(());
            }
            Err(Error::Dtype {
                arg: x.name(),
                expected: format!("{} (the dtype of log_prob)", lp.dtype()),
                got: x.dtype().to_string(),
            })
        };
        for x in [Some(&self.old_log_prob), self.rollout_is_weights.as_ref()]
            .into_iter()
            .flatten()
        {
            same_dtype(x)?;
            if x.shape() != [b, t] {
                return Err(Error::shape(
                    x.name(),
                    format!("[B, T] = [{b}, {t}]"),
                    x.shape(),
                ));
            }
        }
        same_dtype(&self.advantages)?;
        if self.advantages.shape() != [b, t] && self.advantages.shape() != [b] {
            return Err(Error::shape(
                "advantages",
                format!("[B, T] = [{b}, {t}] or per rollout [B] = [{b}]"),
                self.advantages.shape(),
            ));
        }
        if self.response_mask.shape() != [b, t] {
            return Err(Error::shape(
                "response_mask",
                format!("[B, T] = [{b}, {t}]"),
                self.response_mask.shape(),
            ));
        }
        Ok(((b, t), backend))
    }
}

/// Forward of the policy loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PolicyForward {
    /// The aggregated loss.
    pub loss: f64,
    /// `mean((L2 > L1) m)`.
    pub pg_clipfrac: f64,
    /// `mean(-d m)`.
    pub ppo_kl: f64,
    /// `mean((C1 > L3) & (A < 0) m)`.
    pub pg_clipfrac_lower: f64,
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
    let ((b, t), backend) = inputs.validate(kernel.stream)?;
    let dtype = inputs.log_prob.dtype();
    if let Backend::Kernels(exec) = backend {
        cuda::expect_buffer(row_scale, &[b], DType::F32)?;
        if let Some(f) = &factor {
            cuda::expect_buffer(f, &[b, t], dtype)?;
        }
        let loss = cuda::expect_scratch(kernel.loss, "loss", &[], DType::F32)?;
        let metrics = cuda::expect_scratch(kernel.metrics, "metrics", &[3], DType::F32)?;
        let chunks = policy_chunks(t);
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

/// What only the kernel backend of [`policy_loss_forward`] needs.
pub struct PolicyKernelArgs<'a, 'b> {
    /// float32 0-d out: the loss, written on the device.
    pub loss: Option<&'b TensorRef<'a>>,
    /// float32 `[3]` out: the metrics, written on the device.
    pub metrics: Option<&'b TensorRef<'a>>,
    /// float64 `[B, policy_chunks(T), 5]` scratch.
    pub partials: Option<&'b TensorRef<'a>>,
    /// Normalisers given as device tensors.
    pub norms: &'b NormaliserTensors<'a>,
    /// PyTorch's current stream of the tensors' device, for CUDA tensors.
    pub stream: Option<usize>,
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
    let ((b, t), backend) = inputs.validate(stream)?;
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
