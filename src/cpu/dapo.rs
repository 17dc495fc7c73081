//! CPU kernels of the DAPO ops. Per-token math runs in the accumulator type (f32, f64 for
//! f64 inputs) in the order verl's eager formulas use; sums accumulate in f64 per row and are
//! combined in row order, so results are deterministic.

use num_traits::{Float, Zero};

use super::float::{Acc, Elem, Strided2, lane_sum};
use super::{Bound, for_each_chunk, map_range, simd};
use crate::op::dapo::{AggConfig, AggMode, ClipConfig, PolicyForward, PolicyInputs};
use crate::op::groups::members;
use crate::tensor::{Scalar, TensorRef};

/// verl's masked-mean epsilon and per-sequence token-mean epsilon.
const MEAN_EPS: f64 = 1e-8;

/// Sum over the last dimension of a `[B]` or `[B, T]` float tensor, in f64.
pub fn row_sums<T: Elem>(t: &TensorRef) -> Vec<f64> {
    let v = Strided2::of(t);
    let cols = if t.ndim() == 2 { t.shape()[1] } else { 1 };
    (0..t.shape()[0])
        .map(|r| {
            // SAFETY: r < B and c < cols, inside the tensor; T is its dtype.
            match unsafe { v.row_slice::<T>(r, 0, cols) } {
                Some(row) => simd::vectorized(
                    #[inline(always)]
                    || widened_lane_sum(row),
                ),
                None => (0..cols)
                    .map(|c| unsafe { v.get::<T>(r, c) }.load().f64())
                    .sum(),
            }
        })
        .collect()
}

/// Sum in f64 of a contiguous row over 8 interleaved lanes: one running sum would be bound by
/// the latency of each addition.
#[inline(always)]
fn widened_lane_sum<T: Elem>(row: &[T]) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = row.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|x| x.load().f64()).sum();
    for c in chunks {
        for (lane, x) in lanes.iter_mut().zip(c) {
            *lane += x.load().f64();
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// See [`crate::dispatch::dapo::group_advantages`]. Group statistics in f64, rounded to f32, then
/// the normalisation in f32 as verl does it.
pub fn group_advantages(
    scores: &[f64],
    group: &[usize],
    num_groups: usize,
    eps: f64,
    norm_by_std: bool,
    out: &mut [f32],
) {
    // Per-group sums accumulated in ascending rollout order (the order of the group's members),
    // in two passes over flat arrays: no list of members per group.
    let mut count = vec![0usize; num_groups];
    let mut sum = vec![0f64; num_groups];
    for (&g, &r) in group.iter().zip(scores) {
        count[g] += 1;
        sum[g] += r;
    }
    let mean: Vec<f64> = sum
        .iter()
        .zip(&count)
        .map(|(&s, &n)| s / n as f64)
        .collect();
    let mut square = vec![0f64; num_groups];
    for (&g, &r) in group.iter().zip(scores) {
        square[g] += (r - mean[g]).powi(2);
    }
    let stats: Vec<(f32, f32)> = (0..num_groups)
        .map(|g| match count[g] {
            1 => (0.0, 1.0),
            n => (mean[g] as f32, (square[g] / (n as f64 - 1.0)).sqrt() as f32),
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

/// See [`crate::dispatch::dapo::dynamic_sampling_mask`].
pub fn dynamic_sampling(metric: &[f64], group: &[usize], num_groups: usize, out: &mut [bool]) {
    let keep: Vec<bool> = members(group, num_groups)
        .iter()
        .map(|m| {
            let first = metric[m[0]];
            m.len() == 1
                || (m.iter().all(|&b| metric[b].is_finite())
                    && m.iter().any(|&b| metric[b] != first))
        })
        .collect();
    for (b, o) in out.iter_mut().enumerate() {
        *o = keep[group[b]];
    }
}

/// Clip constants in the accumulator type; no log-ratio clamp is a clamp at infinity.
#[derive(Clone, Copy)]
struct Clip<A> {
    lo: A,
    hi: A,
    c: A,
    clamp: A,
}

impl<A: Acc> Clip<A> {
    #[inline(always)]
    fn of(cfg: &ClipConfig) -> Self {
        Clip {
            lo: A::of(1.0 - cfg.low),
            hi: A::of(1.0 + cfg.high),
            c: A::of(cfg.c),
            clamp: cfg.log_ratio_clamp.map_or(A::infinity(), A::of),
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

/// `if cond { yes } else { no }`, which compiles to one compare-and-select per vector.
#[inline(always)]
fn pick<A: Float>(cond: bool, yes: A, no: A) -> A {
    if cond { yes } else { no }
}

/// verl `compute_policy_loss_vanilla` for one token, with the derivative autograd would give
/// (ties of max/min split the gradient in half, clamps pass it on their closed interval).
///
/// NaN can only enter through the log-ratio or the advantage (the clamped ratio is finite and
/// positive, so no product or sum below makes a new one). It is carried by one flag and put
/// into the loss and the gradient at the end, as `torch.maximum`/`torch.minimum` would
/// propagate it; every clamp, max and min is then a plain compare-and-select, which is what
/// the per-token cost comes down to.
#[inline(always)]
fn token<A: Acc>(lp: A, old: A, adv: A, k: &Clip<A>) -> Token<A> {
    let (zero, one, half) = (A::zero(), A::one(), A::of(0.5));
    let raw = lp - old;
    let nan = raw.is_nan() | adv.is_nan();
    // A NaN raw fails both compares and stays NaN in d.
    let d = pick(raw < -k.clamp, -k.clamp, pick(raw > k.clamp, k.clamp, raw));
    let d_grad = pick(d == raw, one, zero);
    let ratio = d.exp_fast();
    let neg_adv = -adv;
    let l1 = neg_adv * ratio;
    let clamped = pick(ratio < k.lo, k.lo, pick(ratio > k.hi, k.hi, ratio));
    let l2 = neg_adv * clamped;
    let dl1 = l1;
    let dl2 = pick(clamped == ratio, dl1, zero);
    let c1 = pick(l1 > l2, l1, l2);
    let dc1 = pick(l1 > l2, dl1, pick(l1 < l2, dl2, half * (dl1 + dl2)));
    let l3 = neg_adv * k.c;
    let negative = adv < zero;
    let c2 = pick(l3 < c1, l3, c1);
    let share = pick(c1 < l3, one, pick(c1 == l3, half, zero));
    let grad = pick(negative, share, one) * dc1 * d_grad;
    Token {
        loss: pick(nan, A::nan(), pick(negative, c2, c1)),
        d,
        clipped: l2 > l1,
        clipped_lower: (c1 > l3) & negative,
        grad: pick(nan, A::nan(), grad),
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

/// Columns per block: the token math runs over a block, the block's sums go to f64.
const BLOCK: usize = 128;

/// Columns `c0..c0 + n` of row `r` of `view`: the tensor's own memory when its columns are
/// contiguous (no copy), else gathered into `buf` (strided views, per-rollout advantages).
#[inline(always)]
fn columns<'a, T: Copy>(
    view: &'a Strided2,
    r: usize,
    c0: usize,
    n: usize,
    buf: &'a mut [T; BLOCK],
) -> &'a [T] {
    // SAFETY (both reads): r < B and c0 + n <= T, inside the tensor of the view (the [B]
    // advantages through their 0 column stride), and T is its element type.
    if let Some(row) = unsafe { view.row_slice::<T>(r, c0, n) } {
        return row;
    }
    for (i, o) in buf[..n].iter_mut().enumerate() {
        *o = unsafe { view.get::<T>(r, c0 + i) };
    }
    &buf[..n]
}

/// Scratch of [`columns`] for the inputs of one row, and weights of 1 for inputs without any.
struct Scratch<T, M> {
    lp: [T; BLOCK],
    old: [T; BLOCK],
    adv: [T; BLOCK],
    mask: [M; BLOCK],
    w: [T; BLOCK],
    ones: [T; BLOCK],
}

impl<T: Elem, M: Scalar + Copy + Default> Scratch<T, M> {
    #[inline(always)]
    fn new() -> Self {
        let one = T::store(T::Acc::of(1.0));
        Scratch {
            lp: [one; BLOCK],
            old: [one; BLOCK],
            adv: [one; BLOCK],
            mask: [M::default(); BLOCK],
            w: [one; BLOCK],
            ones: [one; BLOCK],
        }
    }

    /// Calls `each(i, token, m, w)` for the columns `c0 + i` of row `r`, `i < n`. Masked
    /// positions enter the token math as zeros, so garbage there (NaN, inf) never reaches it.
    #[inline(always)]
    fn tokens(
        &mut self,
        v: &Views,
        k: &Clip<T::Acc>,
        (r, c0, n): (usize, usize, usize),
        mut each: impl FnMut(usize, Token<T::Acc>, T::Acc, T::Acc),
    ) {
        let lp = columns::<T>(&v.lp, r, c0, n, &mut self.lp);
        let old = columns::<T>(&v.old, r, c0, n, &mut self.old);
        let adv = columns::<T>(&v.adv, r, c0, n, &mut self.adv);
        let mask = columns::<M>(&v.mask, r, c0, n, &mut self.mask);
        let w = match &v.weights {
            Some(w) => columns::<T>(w, r, c0, n, &mut self.w),
            None => &self.ones[..n],
        };
        let zero = T::Acc::zero();
        for i in 0..n {
            let m = T::Acc::of(mask[i].to_f64());
            let on = m != zero;
            let tok = token(
                pick(on, lp[i].load(), zero),
                pick(on, old[i].load(), zero),
                pick(on, adv[i].load(), zero),
                k,
            );
            each(i, tok, m, pick(on, w[i].load(), zero));
        }
    }
}

/// One row's forward sums; writes the row's factor when `factor_base` points at one.
#[inline(always)]
fn forward_row<T: Elem, M: Scalar + Copy + Default>(
    v: &Views,
    r: usize,
    t: usize,
    k: &Clip<T::Acc>,
    factor_base: Option<usize>,
) -> RowSums {
    let mut s = RowSums::default();
    let mut scratch = Scratch::<T, M>::new();
    let zero = T::Acc::zero();
    // Per-token terms of one block, reduced afterwards: a running sum inside the token
    // loop would serialise it and stop vectorisation.
    let (mut tl, mut tk, mut tc, mut to, mut tm, mut tg) = (
        [zero; BLOCK],
        [zero; BLOCK],
        [zero; BLOCK],
        [zero; BLOCK],
        [zero; BLOCK],
        [zero; BLOCK],
    );
    for c0 in (0..t).step_by(BLOCK) {
        let n = BLOCK.min(t - c0);
        scratch.tokens(
            v,
            k,
            (r, c0, n),
            #[inline(always)]
            |i, tok, m, w| {
                tl[i] = tok.loss * w * m;
                tk[i] = -tok.d * m;
                tc[i] = pick(tok.clipped, m, zero);
                to[i] = pick(tok.clipped_lower, m, zero);
                tm[i] = m;
                tg[i] = tok.grad * w * m;
            },
        );
        if let Some(base) = factor_base {
            // SAFETY: factor is a contiguous [B, T] output; this task alone writes row r.
            let dst =
                unsafe { std::slice::from_raw_parts_mut((base as *mut T).add(r * t + c0), n) };
            dst.iter_mut()
                .zip(&tg[..n])
                .for_each(|(d, &g)| *d = T::store(g));
        }
        s.loss += lane_sum(&tl[..n]).f64();
        s.kl += lane_sum(&tk[..n]).f64();
        s.clipped += lane_sum(&tc[..n]).f64();
        s.clipped_lower += lane_sum(&to[..n]).f64();
        s.mask += lane_sum(&tm[..n]).f64();
    }
    s
}

/// Forward of the policy loss; fills `scale` with `dloss/d(l m)` per row, and `factor` (when
/// given, `[B, T]` contiguous) with `m w dl/dlog_prob`, so that the backward is one scaling.
pub fn policy_forward<T: Elem, M: Scalar + Copy + Default>(
    inputs: &PolicyInputs,
    (b, t): (usize, usize),
    clip: &ClipConfig,
    agg: &AggConfig,
    scale: &mut [T::Acc],
    factor: Option<&mut [T]>,
) -> PolicyForward {
    let v = Views::of(inputs);
    let k = Clip::<T::Acc>::of(clip);
    let factor_base = factor.map(|f| f.as_mut_ptr() as usize);
    let rows: Vec<RowSums> = map_range(b, b * t, Bound::Compute, |r| {
        simd::vectorized(
            #[inline(always)]
            || forward_row::<T, M>(&v, r, t, &k, factor_base),
        )
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

/// Backward of the policy loss: `out[r, c] = upstream * scale[r] * m * w * dl/dlog_prob`,
/// recomputing the token math (used when the forward saved no factor).
pub fn policy_backward<T: Elem, M: Scalar + Copy + Default>(
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
    for_each_chunk(out, t, Bound::Compute, |r, row| {
        simd::vectorized(
            #[inline(always)]
            || {
                let row_up = up * scale[r];
                let mut scratch = Scratch::<T, M>::new();
                for c0 in (0..t).step_by(BLOCK) {
                    let n = BLOCK.min(t - c0);
                    let out = &mut row[c0..c0 + n];
                    scratch.tokens(
                        &v,
                        &k,
                        (r, c0, n),
                        #[inline(always)]
                        |i, tok, m, w| out[i] = T::store(row_up * m * w * tok.grad),
                    );
                }
            },
        )
    });
}

/// Backward from the factor the forward saved: `grad[r, c] *= upstream * scale[r]`, in place.
pub fn policy_backward_saved<T: Elem>(t: usize, scale: &[T::Acc], upstream: f64, grad: &mut [T]) {
    let up = T::Acc::of(upstream);
    for_each_chunk(grad, t, Bound::Memory, |r, row| {
        let s = up * scale[r];
        simd::vectorized(
            #[inline(always)]
            || row.iter_mut().for_each(|g| *g = T::store(g.load() * s)),
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clip() -> Clip<f64> {
        Clip::of(&ClipConfig::new(0.2, 0.28, 3.0, Some(20.0)).unwrap())
    }

    /// The token derivative against central differences of the token loss, over log-ratios
    /// inside and outside the clip range, both advantage signs and the dual-clip region.
    #[test]
    fn token_gradient_matches_finite_differences() {
        let k = clip();
        for &adv in &[1.3, -0.7, -2.0, 0.4] {
            for &d in &[-2.0, -0.5, -0.1, 0.05, 0.2, 0.5, 1.5, 3.0, 25.0, -25.0] {
                let old = -1.0;
                let at = |lp: f64| token(lp, old, adv, &k).loss;
                let h = 1e-6;
                let numeric = (at(old + d + h) - at(old + d - h)) / (2.0 * h);
                let analytic = token(old + d, old, adv, &k).grad;
                assert!(
                    (numeric - analytic).abs() < 1e-5,
                    "adv {adv} d {d}: {numeric} vs {analytic}"
                );
            }
        }
    }

    #[test]
    fn dual_clip_bounds_negative_advantage_losses() {
        let k = clip();
        let t = token(3.0, 0.0, -2.0, &k); // ratio e^3 > c = 3
        assert_eq!(t.loss, 6.0);
        assert!(t.clipped_lower);
        assert_eq!(t.grad, 0.0);
    }

    #[test]
    fn nan_log_prob_propagates() {
        let t = token(f64::NAN, 0.0, 1.0, &clip());
        assert!(t.loss.is_nan());
    }
}
