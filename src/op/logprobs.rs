//! Token log-probabilities and entropies from one chunk of logits (`[n, V]`, the LM head's
//! output for n tokens), and the in-place turn of that chunk into its logit gradient. The
//! chunking, the matmuls and autograd live in Python (`hidden_align.token_logprobs`); a
//! backend runs one pass over the chunk per direction.
//!
//! With `x = z / temperature`, `lse = log sum_j e^{x_j}`, `p = e^{x - lse}`:
//! log-prob `x_t - lse`; entropy `H = lse - sum_j p_j x_j`; the gradient of
//! `g_lp * logprob + g_ent * H` w.r.t. `z_k` is
//! `(g_lp ([k = t] - p_k) - g_ent p_k (x_k - lse + H)) / temperature`.

use crate::error::{Error, Result};
use crate::tensor::{DType, TensorRef};

/// The smallest temperature: `1 / temperature` stays a finite float32.
pub const MIN_TEMPERATURE: f64 = 1e-30;

/// How the chunk's options reach a backend.
#[derive(Clone, Copy, Debug)]
pub struct LogprobOptions {
    /// Softmax temperature (finite, > 0).
    pub temperature: f64,
    /// Targets equal to this give log-prob 0, entropy 0 and no gradient.
    pub ignore_index: i64,
}

impl LogprobOptions {
    /// Checks the temperature.
    pub fn new(temperature: f64, ignore_index: i64) -> Result<Self> {
        // Its inverse multiplies the logits in float32: it must be a float32 number.
        if !(temperature.is_finite() && temperature >= MIN_TEMPERATURE) {
            return Err(Error::value(
                "temperature",
                format!("a finite number >= {MIN_TEMPERATURE:e}"),
                temperature,
            ));
        }
        Ok(LogprobOptions {
            temperature,
            ignore_index,
        })
    }
}

/// The dtype of the per-token results for logits of `dtype`: float64 for float64 (so that
/// gradcheck sees float64 throughout), float32 otherwise.
pub fn result_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Checks a chunk of logits and its targets; returns `(n, V)`.
fn check_chunk(logits: &TensorRef, targets: &TensorRef) -> Result<(usize, usize)> {
    logits.expect_dtype(&[DType::F32, DType::BF16, DType::F16, DType::F64])?;
    logits.expect_ndim(2, "[n, V]")?;
    let (n, v) = (logits.shape()[0], logits.shape()[1]);
    if n > 0 && v > 1 && logits.strides()[1] != 1 {
        return Err(Error::shape(
            "logits",
            "rows with contiguous columns (stride 1 along V)",
            logits.shape(),
        ));
    }
    if v == 0 && n > 0 {
        return Err(Error::shape("logits", "[n, V] with V >= 1", logits.shape()));
    }
    targets.expect_dtype(&[DType::I64])?;
    if targets.shape() != [n] {
        return Err(Error::shape(
            "targets",
            format!("[n] = [{n}] (one per row of the logits)"),
            targets.shape(),
        ));
    }
    Ok((n, v))
}

/// The forward pass over one chunk.
pub struct LogprobForward<'a> {
    /// `[n, V]` float32, bfloat16, float16 or float64; rows of contiguous columns.
    pub logits: TensorRef<'a>,
    /// int64 `[n]`, any stride.
    pub targets: TensorRef<'a>,
    /// Temperature and ignore index.
    pub options: LogprobOptions,
}

/// What the forward pass fills (contiguous, of [`result_dtype`]).
pub struct LogprobOutputs<'a> {
    /// Log-probability of each target.
    pub logprob: TensorRef<'a>,
    /// Entropy of each row's distribution (skipped when absent).
    pub entropy: Option<TensorRef<'a>>,
    /// Each row's max and `log sum e^{x - max}` (`[n, 2]`), kept for the backward pass.
    pub stats: TensorRef<'a>,
}

impl LogprobForward<'_> {
    /// Checks shapes and dtypes of the inputs and outputs; returns `(n, V)`.
    pub fn check(&self, out: &LogprobOutputs) -> Result<(usize, usize)> {
        let (n, v) = check_chunk(&self.logits, &self.targets)?;
        let dtype = result_dtype(self.logits.dtype());
        out.logprob.expect_buffer(&[n], dtype)?;
        out.stats.expect_buffer(&[n, 2], dtype)?;
        if let Some(e) = &out.entropy {
            e.expect_buffer(&[n], dtype)?;
        }
        Ok((n, v))
    }
}

/// The backward pass over one chunk: `logits` (recomputed by the caller) becomes the
/// gradient of `sum_i g_lp_i logprob_i + g_ent_i H_i` w.r.t. the logits, in place.
pub struct LogprobBackward<'a> {
    /// `[n, V]`, as in the forward pass; overwritten.
    pub logits: TensorRef<'a>,
    /// int64 `[n]`.
    pub targets: TensorRef<'a>,
    /// Temperature and ignore index.
    pub options: LogprobOptions,
    /// The forward pass's `stats` (contiguous `[n, 2]`).
    pub stats: TensorRef<'a>,
    /// The forward pass's entropy: needed with `grad_entropy`.
    pub entropy: Option<TensorRef<'a>>,
    /// Upstream gradient of the log-probs (`[n]`, result dtype, any stride; absent: zero).
    pub grad_logprob: Option<TensorRef<'a>>,
    /// Upstream gradient of the entropies (absent: zero).
    pub grad_entropy: Option<TensorRef<'a>>,
}

impl LogprobBackward<'_> {
    /// Checks shapes and dtypes; returns `(n, V)`.
    pub fn check(&self) -> Result<(usize, usize)> {
        let (n, v) = check_chunk(&self.logits, &self.targets)?;
        if n > 1 && self.logits.strides()[0] < v as isize {
            // Written in place: rows that share memory would overwrite each other.
            return Err(Error::shape(
                "logits",
                "rows that do not overlap (row stride >= V)",
                self.logits.shape(),
            ));
        }
        let dtype = result_dtype(self.logits.dtype());
        self.stats.expect_buffer(&[n, 2], dtype)?;
        for g in [&self.grad_logprob, &self.grad_entropy]
            .into_iter()
            .flatten()
        {
            g.expect_dtype(&[dtype])?;
            if g.shape() != [n] {
                return Err(Error::shape(g.name(), format!("[{n}]"), g.shape()));
            }
        }
        match (&self.entropy, &self.grad_entropy) {
            (Some(e), _) => e.expect_buffer(&[n], dtype)?,
            (None, Some(_)) => {
                return Err(Error::value(
                    "entropy",
                    "the forward pass's entropies when grad_entropy is given",
                    "None",
                ));
            }
            (None, None) => {}
        }
        Ok((n, v))
    }

    /// The tensors that must share the device of `logits`.
    pub fn others(&self) -> [Option<&TensorRef<'_>>; 5] {
        [
            Some(&self.targets),
            Some(&self.stats),
            self.entropy.as_ref(),
            self.grad_logprob.as_ref(),
            self.grad_entropy.as_ref(),
        ]
    }
}

impl LogprobForward<'_> {
    /// The tensors that must share the device of `logits`.
    pub fn others<'b>(&'b self, out: &'b LogprobOutputs) -> [Option<&'b TensorRef<'b>>; 4] {
        [
            Some(&self.targets),
            Some(&out.logprob),
            Some(&out.stats),
            out.entropy.as_ref(),
        ]
    }
}

/// The first target of `targets` (CPU) that is neither in `0..V` nor the ignore index.
pub fn check_targets(targets: &TensorRef, v: usize, ignore_index: i64) -> Result<()> {
    let values = targets.to_i64_vec()?;
    if let Some((i, t)) = values
        .iter()
        .enumerate()
        .find(|&(_, &t)| t != ignore_index && !(0..v as i64).contains(&t))
    {
        return Err(Error::value(
            "targets",
            format!("token ids in [0, {v}) or the ignore index {ignore_index}"),
            format!("{t} at position {i}"),
        ));
    }
    Ok(())
}
