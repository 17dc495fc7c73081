//! DAPO's policy loss: clip and aggregation options, the tensors a backend reads and fills.

use std::str::FromStr;

use crate::error::{Error, Result};
use crate::tensor::{DType, TensorRef};

/// Storage types of the policy loss's float inputs.
pub const FLOATS: [DType; 4] = [DType::F32, DType::BF16, DType::F16, DType::F64];

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
    /// The tensors of log_prob's device, for backend selection.
    pub fn others(&self) -> [Option<&TensorRef<'_>>; 4] {
        [
            Some(&self.old_log_prob),
            Some(&self.advantages),
            Some(&self.response_mask),
            self.rollout_is_weights.as_ref(),
        ]
    }

    /// Checks dtypes and shapes (nothing that reads elements) and returns `(B, T)`.
    pub fn check(&self) -> Result<(usize, usize)> {
        let lp = &self.log_prob;
        lp.expect_dtype(&FLOATS)?;
        lp.expect_ndim(2, "[B, T]")?;
        let (b, t) = (lp.shape()[0], lp.shape()[1]);
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
        Ok((b, t))
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

/// What only the kernel backend of `policy_loss_forward` needs.
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

/// Normalisers given as 0-d/1-element tensors on the device, read by the kernel (no host
/// read); each replaces the number of the same name in [`AggConfig`].
#[derive(Default)]
pub struct NormaliserTensors<'a> {
    /// `batch_num_tokens`.
    pub batch_num_tokens: Option<TensorRef<'a>>,
    /// `global_batch_size`.
    pub global_batch_size: Option<TensorRef<'a>>,
    /// `loss_scale_factor`.
    pub loss_scale_factor: Option<TensorRef<'a>>,
}

/// Buffers of the policy forward, allocated by the caller.
pub struct PolicyForwardBuffers<'a, 'b> {
    /// float32 0-d out: the loss.
    pub loss: &'b TensorRef<'a>,
    /// float32 `[3]` out: pg_clipfrac, ppo_kl, pg_clipfrac_lower.
    pub metrics: &'b TensorRef<'a>,
    /// float32 `[B]` out: the per-row scale of the backward.
    pub row_scale: &'b TensorRef<'a>,
    /// Optional `[B, T]` out: the per-token derivative.
    pub factor: Option<&'b TensorRef<'a>>,
    /// float64 `[B, chunks, 5]` scratch.
    pub partials: &'b TensorRef<'a>,
}
