//! CPU kernels of the DAPO ops. Per-token math runs in the accumulator type (f32, f64 for
//! f64 inputs) in the order verl's eager formulas use; sums accumulate in f64 per row and are
//! combined in row order, so results are deterministic.

use num_traits::{Float, One, Zero};

use super::float::{Acc, Elem, Scalar, Strided2};
use super::{for_each_chunk, map_range};
use crate::ops::dapo::{AggConfig, AggMode, ClipConfig, PolicyForward, PolicyInputs};
use crate::ops::groups::members;
use crate::tensor::TensorRef;

/// verl's masked-mean epsilon and per-sequence token-mean epsilon.
const MEAN_EPS: f64 = 1e-8;

/// Sum over the last dimension of a `[B]` or `[B, T]` float tensor, in f64.
pub fn row_sums<T: Elem>(t: &TensorRef) -> Vec<f64> {
    let v = Strided2::of(t);
    let cols = if t.ndim() == 2 { t.shape()[1] } else { 1 };
    (0..t.shape()[0])
        .map(|r| {
            // SAFETY: r < B and c < cols, inside the tensor; T is its dtype.
            (0..cols)
                .map(|c| unsafe { v.get::<T>(r, c) }.load().f64())
                .sum()
        })
        .collect()
}

/// See [`crate::ops::dapo::group_advantages`]. Group statistics in f64, rounded to f32, then
/// the normalisation in f32 as verl does it.
pub fn group_advantages(
    scores: &[f64],
    group: &[usize],
    num_groups: usize,
    eps: f64,
    norm_by_std: bool,
    out: &mut [f32],
) {
    let stats: Vec<(f32, f32)> = members(group, num_groups)
        .iter()
        .map(|m| {
            if m.len() == 1 {
                return (0.0, 1.0);
            }
            let n = m.len() as f64;
            let mean = m.iter().map(|&b| scores[b]).sum::<f64>() / n;
            let var = m.iter().map(|&b| (scores[b] - mean).powi(2)).sum::<f64>() / (n - 1.0);
            (mean as f32, var.sqrt() as f32)
        })
        .collect();
    for (b, o) in out.iter_mut().enumerate() {
        let (mean, std) = stats[group[b]];
        let centred = scores[b] as f32 - mean;
        *o = if norm_by_std {
            centred / (std + eps as f32)
        } else {
            centred
        };
    }
}

/// See [`crate::ops::dapo::dynamic_sampling_mask`].
pub fn dynamic_sampling(metric: &[f64], group: &[usize], num_groups: usize, out: &mut [bool]) {
    let keep: Vec<bool> = members(group, num_groups)
        .iter()
        .map(|m| {
            let first = metric[m[0]];
            m.len() == 1
                || (!m.iter().any(|&b| metric[b].is_nan()) && m.iter().any(|&b| metric[b] != first))
        })
        .collect();
    for (b, o) in out.iter_mut().enumerate() {
        *o = keep[group[b]];
    }
}

/// NaN-propagating max/min, as `torch.maximum`/`torch.minimum`.
#[inline(always)]
fn nan_max<A: Float>(a: A, b: A) -> A {
    if a.is_nan() || b.is_nan() {
        A::nan()
    } else {
        a.max(b)
    }
}
#[inline(always)]
fn nan_min<A: Float>(a: A, b: A) -> A {
    if a.is_nan() || b.is_nan() {
        A::nan()
    } else {
        a.min(b)
    }
}

/// Clip constants in the accumulator type.
#[derive(Clone, Copy)]
struct Clip<A> {
    lo: A,
    hi: A,
    c: A,
    clamp: Option<A>,
}

impl<A: Acc> Clip<A> {
    fn of(cfg: &ClipConfig) -> Self {
        Clip {
            lo: A::of(1.0 - cfg.low),
            hi: A::of(1.0 + cfg.high),
            c: A::of(cfg.c),
            clamp: cfg.log_ratio_clamp.map(A::of),
        }
    }
}

/// Everything one token contributes, forward and backward.
struct Token<A> {
    /// The per-token loss before weights.
    loss: A,
    /// Clamped log-ratio d.
    d: A,
    /// `L2 > L1`.
    clipped: bool,
    /// `(C1 > L3) & (A < 0)`.
    clipped_lower: bool,
    /// d(loss)/d(log_prob).
    grad: A,
}

/// verl `compute_policy_loss_vanilla` for one token, with the derivative autograd would give
/// (ties of max/min split the gradient in half, clamps pass it on their closed interval).
#[inline(always)]
fn token<A: Acc>(lp: A, old: A, adv: A, k: &Clip<A>) -> Token<A> {
    let raw = lp - old;
    let (d, d_grad) = match k.clamp {
        // max/min would swallow a NaN: keep it, so NaN in gives NaN out as in torch.clamp.
        Some(_) if raw.is_nan() => (raw, A::one()),
        Some(c) => (
            raw.max(-c).min(c),
            if raw >= -c && raw <= c {
                A::one()
            } else {
                A::zero()
            },
        ),
        None => (raw, A::one()),
    };
    let ratio = d.exp();
    let l1 = -adv * ratio;
    let l2 = -adv * ratio.max(k.lo).min(k.hi);
    let dl1 = -adv * ratio;
    let dl2 = if ratio >= k.lo && ratio <= k.hi {
        dl1
    } else {
        A::zero()
    };
    let c1 = nan_max(l1, l2);
    let half = A::of(0.5);
    let dc1 = if l1 > l2 {
        dl1
    } else if l1 < l2 {
        dl2
    } else {
        half * (dl1 + dl2)
    };
    let l3 = -adv * k.c;
    let negative = adv < A::zero();
    let (loss, dloss) = if negative {
        let c2 = nan_min(l3, c1);
        let share = if c1 < l3 {
            A::one()
        } else if c1 == l3 {
            half
        } else {
            A::zero()
        };
        (c2, share * dc1)
    } else {
        (c1, dc1)
    };
    Token {
        loss,
        d,
        clipped: l2 > l1,
        clipped_lower: c1 > l3 && negative,
        grad: dloss * d_grad,
    }
}

/// Per-row sums of the forward pass.
#[derive(Clone, Copy, Default)]
struct RowSums {
    loss: f64,
    mask: f64,
    clipped: f64,
    kl: f64,
    clipped_lower: f64,
}

struct Views {
    lp: Strided2,
    old: Strided2,
    adv: Strided2,
    mask: Strided2,
    weights: Option<Strided2>,
}

impl Views {
    fn of(i: &PolicyInputs) -> Self {
        Views {
            lp: Strided2::of(&i.log_prob),
            old: Strided2::of(&i.old_log_prob),
            adv: Strided2::of(&i.advantages),
            mask: Strided2::of(&i.response_mask),
            weights: i.rollout_is_weights.as_ref().map(Strided2::of),
        }
    }
}

/// Forward of the policy loss; fills `scale` with `dloss/d(l m)` per row.
pub fn policy_forward<T: Elem, M: Scalar>(
    inputs: &PolicyInputs,
    (b, t): (usize, usize),
    clip: &ClipConfig,
    agg: &AggConfig,
    scale: &mut [T::Acc],
) -> PolicyForward {
    let v = Views::of(inputs);
    let k = Clip::<T::Acc>::of(clip);
    let rows: Vec<RowSums> = map_range(b, b * t, |r| {
        let mut s = RowSums::default();
        for c in 0..t {
            // SAFETY (all reads): r < B, c < T, each view matches its tensor's dtype; the
            // other inputs are read only where the mask is nonzero, so masked garbage is
            // never touched.
            let m = unsafe { v.mask.get::<M>(r, c) }.to_f64();
            if m == 0.0 {
                continue;
            }
            let (lp, old, adv) = unsafe {
                (
                    v.lp.get::<T>(r, c).load(),
                    v.old.get::<T>(r, c).load(),
                    v.adv.get::<T>(r, c).load(),
                )
            };
            let tok = token(lp, old, adv, &k);
            let w = v
                .weights
                .map_or(T::Acc::one(), |w| unsafe { w.get::<T>(r, c) }.load());
            s.loss += (tok.loss * w).f64() * m;
            s.mask += m;
            s.kl += -tok.d.f64() * m;
            s.clipped += if tok.clipped { m } else { 0.0 };
            s.clipped_lower += if tok.clipped_lower { m } else { 0.0 };
        }
        s
    });
    let total = rows.iter().fold(RowSums::default(), |a, r| RowSums {
        loss: a.loss + r.loss,
        mask: a.mask + r.mask,
        clipped: a.clipped + r.clipped,
        kl: a.kl + r.kl,
        clipped_lower: a.clipped_lower + r.clipped_lower,
    });
    let dp = agg.dp_size;
    // An empty denominator (no valid token or sequence) gives 0, where verl gives NaN.
    let ratio = |num: f64, den: f64| if den == 0.0 { 0.0 } else { num / den };
    let (loss, row_scale): (f64, Vec<f64>) = match agg.mode {
        AggMode::TokenMean => {
            let n = agg.batch_num_tokens.unwrap_or(total.mask);
            let s = ratio(dp, n);
            (total.loss * s, vec![s; b])
        }
        AggMode::TokenSum => (total.loss * dp, vec![dp; b]),
        AggMode::SeqMeanTokenSum | AggMode::SeqMeanTokenSumNorm | AggMode::SeqMeanTokenMean => {
            let live = |r: &RowSums| if r.mask > 0.0 { 1.0 } else { 0.0 };
            let gbs = agg
                .global_batch_size
                .unwrap_or_else(|| rows.iter().map(live).sum());
            let mut s = ratio(dp, gbs);
            if agg.mode == AggMode::SeqMeanTokenSumNorm {
                s /= agg.loss_scale_factor.unwrap_or(t as f64);
            }
            let per_row: Vec<f64> = rows
                .iter()
                .map(|r| {
                    let token_mean = if agg.mode == AggMode::SeqMeanTokenMean {
                        r.mask + MEAN_EPS
                    } else {
                        1.0
                    };
                    live(r) * s / token_mean
                })
                .collect();
            (
                rows.iter().zip(&per_row).map(|(r, s)| r.loss * s).sum(),
                per_row,
            )
        }
    };
    for (o, s) in scale.iter_mut().zip(row_scale) {
        *o = T::Acc::of(s);
    }
    let den = total.mask + MEAN_EPS;
    PolicyForward {
        loss,
        pg_clipfrac: total.clipped / den,
        ppo_kl: total.kl / den,
        pg_clipfrac_lower: total.clipped_lower / den,
    }
}

/// Backward of the policy loss: `out[r, c] = upstream * scale[r] * m * w * dl/dlog_prob`.
pub fn policy_backward<T: Elem, M: Scalar>(
    inputs: &PolicyInputs,
    (_, t): (usize, usize),
    clip: &ClipConfig,
    scale: &[T::Acc],
    upstream: f64,
    out: &mut [T],
) {
    let v = Views::of(inputs);
    let k = Clip::<T::Acc>::of(clip);
    let up = T::Acc::of(upstream);
    for_each_chunk(out, t, |r, row| {
        let row_up = up * scale[r];
        for (c, o) in row.iter_mut().enumerate() {
            // SAFETY (all reads): as in the forward; masked positions are not read.
            let m = unsafe { v.mask.get::<M>(r, c) }.to_f64();
            if m == 0.0 {
                *o = T::store(T::Acc::zero());
                continue;
            }
            let (lp, old, adv) = unsafe {
                (
                    v.lp.get::<T>(r, c).load(),
                    v.old.get::<T>(r, c).load(),
                    v.adv.get::<T>(r, c).load(),
                )
            };
            let w = v
                .weights
                .map_or(T::Acc::one(), |w| unsafe { w.get::<T>(r, c) }.load());
            *o = T::store(row_up * T::Acc::of(m) * w * token(lp, old, adv, &k).grad);
        }
    });
}
