//! Token log-probs and entropies over a chunk of logits, and the chunk's logit gradient in
//! place (`op::logprobs` has the formulas). One pass per row each way: the forward keeps a
//! running max, the sum of `e^{x - max}` and the sum of `e^{x - max} (x - max)`, rescaled
//! when the max grows; blocks of [`BLOCK`] columns take their max first so the inner loop is
//! branch-free and vectorises (the `exp` is [`Acc::exp_fast`]).

use num_traits::{Float, Zero};
use rayon::prelude::*;

use super::float::{Acc, Elem};
use super::{Bound, for_each_chunk, simd};
use crate::op::logprobs::LogprobOptions;

/// Columns per block of the running max.
const BLOCK: usize = 256;
/// Interleaved partial sums inside a block (fixed order: results do not depend on threads).
const LANES: usize = 8;

/// One row's `(max, sum e^{x - max}, sum e^{x - max} (x - max))` over `x = z * inv_t`.
/// NaN or `+inf` anywhere makes the sums NaN; a row of `-inf` gives `(-inf, 0, 0)`.
#[inline(always)]
fn row_sums<E: Elem>(row: &[E], inv_t: E::Acc) -> (E::Acc, E::Acc, E::Acc) {
    let zero = E::Acc::zero();
    let mut m = E::Acc::neg_infinity();
    let (mut s, mut t) = (zero, zero);
    let mut x = [zero; BLOCK];
    for block in row.chunks(BLOCK) {
        let x = &mut x[..block.len()];
        for (xi, &z) in x.iter_mut().zip(block) {
            *xi = z.load() * inv_t;
        }
        // The block's max over LANES lanes (Float::max ignores NaN, so NaN is looked for
        // separately); both loops vectorise.
        let mut lm = [E::Acc::neg_infinity(); LANES];
        let mut nan = [false; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for j in 0..LANES {
                lm[j] = lm[j].max(c[j]);
                nan[j] |= c[j].is_nan();
            }
        }
        let mut bm = E::Acc::neg_infinity();
        let mut any_nan = false;
        for &xi in tail {
            bm = bm.max(xi);
            any_nan |= xi.is_nan();
        }
        for j in 0..LANES {
            bm = bm.max(lm[j]);
            any_nan |= nan[j];
        }
        if any_nan {
            let q = E::Acc::nan();
            return (q, q, q);
        }
        if bm > m {
            if m > E::Acc::neg_infinity() {
                // Rescale to the new max: every earlier term gains a factor e^{m - bm} and its
                // (x - max) shifts by (m - bm).
                let scale = (m - bm).exp_fast();
                t = scale * (t + (m - bm) * s);
                s *= scale;
            }
            m = bm;
        }
        if m == E::Acc::neg_infinity() {
            continue; // every column so far is -inf: they add nothing
        }
        let mut sl = [zero; LANES];
        let mut tl = [zero; LANES];
        let chunks = x.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for j in 0..LANES {
                let d = c[j] - m;
                let e = d.exp_fast();
                sl[j] += e;
                // e = 0 for d = -inf, whose product would be NaN.
                tl[j] += if e > zero { e * d } else { zero };
            }
        }
        for &xi in rest {
            let d = xi - m;
            let e = d.exp_fast();
            s += e;
            t += if e > zero { e * d } else { zero };
        }
        for j in 0..LANES {
            s += sl[j];
            t += tl[j];
        }
    }
    (m, s, t)
}

/// Pointer and row stride of a chunk of logits (columns contiguous).
#[derive(Clone, Copy)]
pub struct Rows {
    /// Address of element `(0, 0)`.
    pub base: usize,
    /// Elements between rows.
    pub row_stride: isize,
    /// Columns (V).
    pub cols: usize,
}

impl Rows {
    /// Row `r`.
    ///
    /// # Safety
    /// `r` is a row of the tensor these rows describe, whose element type is `E`.
    unsafe fn row<E>(&self, r: usize) -> &[E] {
        // SAFETY: the caller's promise; V >= 1 so the pointer is a real element.
        unsafe {
            let p = (self.base as *const E).offset(r as isize * self.row_stride);
            std::slice::from_raw_parts(p, self.cols)
        }
    }

    /// Row `r`, writable.
    ///
    /// # Safety
    /// As for [`Rows::row`], and no other reference to row `r` may be live.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row_mut<E>(&self, r: usize) -> &mut [E] {
        // SAFETY: the caller's promise.
        unsafe {
            let p = (self.base as *mut E).offset(r as isize * self.row_stride);
            std::slice::from_raw_parts_mut(p, self.cols)
        }
    }
}

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 4;

/// Fills `logprob`, `stats` (per row its max and `log sum e^{x - max}`, `[n, 2]`) and (when
/// given) `entropy` for every row of `rows`. Targets were checked to be in `0..V` or the
/// ignore index; ignored rows get zeros.
///
/// # Safety
/// `rows` describes a live `[targets.len(), V]` tensor of element type `E`.
pub unsafe fn forward<E: Elem>(
    rows: Rows,
    targets: &[i64],
    options: LogprobOptions,
    logprob: &mut [E::Acc],
    stats: &mut [E::Acc],
    mut entropy: Option<&mut [E::Acc]>,
) {
    let inv_t = E::Acc::of(1.0 / options.temperature);
    let n = targets.len();
    let mut per_row = vec![[E::Acc::zero(); 4]; n];
    let one_row = |r: usize, o: &mut [E::Acc; 4]| {
        let target = targets[r];
        if target == options.ignore_index {
            return;
        }
        // SAFETY: r < n, a row of the tensor (the caller's promise).
        let row = unsafe { rows.row::<E>(r) };
        let (m, s, t) = simd::vectorized(
            #[inline(always)]
            || row_sums(row, inv_t),
        );
        let log_s = s.ln();
        let xt = row[target as usize].load() * inv_t;
        // log p_t = (x_t - m) - log s; H = log s - t / s (both free of the max, which the
        // backward pass also keeps apart from log s: x - (m + log s) would lose the digits of
        // log s when |x| is large).
        *o = [(xt - m) - log_s, m, log_s, log_s - t / s];
    };
    if Bound::Compute.parallel(n * rows.cols) {
        per_row
            .par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(task, out)| {
                for (k, o) in out.iter_mut().enumerate() {
                    one_row(task * ROWS_PER_TASK + k, o);
                }
            });
    } else {
        per_row
            .iter_mut()
            .enumerate()
            .for_each(|(r, o)| one_row(r, o));
    }
    for (r, [lp, m, log_s, h]) in per_row.into_iter().enumerate() {
        logprob[r] = lp;
        stats[2 * r] = m;
        stats[2 * r + 1] = log_s;
        if let Some(e) = entropy.as_deref_mut() {
            e[r] = h;
        }
    }
}

/// The upstream gradients and saved values of one row.
#[derive(Clone, Copy)]
pub struct RowGrad<A> {
    /// `d loss / d logprob`.
    pub grad_logprob: A,
    /// `d loss / d entropy`.
    pub grad_entropy: A,
    /// The forward pass's row max.
    pub max: A,
    /// The forward pass's `log sum e^{x - max}`.
    pub log_sum: A,
    /// The forward pass's entropy (0 when no entropy gradient flows).
    pub entropy: A,
}

/// `acc += x` elementwise, `x` widened to f32: one chunk's weight-gradient product (rounded
/// once to the weight's dtype) added to the float32 accumulator, in pieces of 64K elements.
pub fn accumulate<E: Elem<Acc = f32>>(acc: &mut [f32], x: &[E]) {
    const PIECE: usize = 1 << 16;
    for_each_chunk(acc, PIECE, Bound::Compute, |i, a| {
        let x = &x[i * PIECE..i * PIECE + a.len()];
        simd::vectorized(
            #[inline(always)]
            || a.iter_mut().zip(x).for_each(|(a, &x)| *a += x.load()),
        )
    });
}

/// The constants of one row's logit gradient.
struct Column<A> {
    inv_t: A,
    max: A,
    log_sum: A,
    /// `grad_logprob / T`.
    a: A,
    /// `grad_entropy / T`.
    b: A,
    /// `H - log_sum`.
    shift: A,
}

impl<A: Acc> Column<A> {
    /// `d(loss)/dz = (hit - a p) - b p (log p + H)` for logit `z`.
    #[inline(always)]
    fn grad<E: Elem<Acc = A>>(&self, z: E, hit: A) -> E {
        let zero = A::zero();
        let d = z.load() * self.inv_t - self.max;
        let p = (d - self.log_sum).exp_fast();
        // p = 0 where x = -inf, whose (d + shift) would make the product NaN.
        let ent = if p > zero {
            self.b * p * (d + self.shift)
        } else {
            zero
        };
        E::store((hit - self.a * p) - ent)
    }
}

/// Turns every row of `rows` into its logit gradient, in place. `grads(r)` gives row r's
/// upstream gradients and saved values; ignored rows become zeros.
///
/// # Safety
/// `rows` describes a live, writable `[targets.len(), V]` tensor of element type `E` whose
/// rows do not overlap, with no other reference to it.
pub unsafe fn backward<E: Elem>(
    rows: Rows,
    targets: &[i64],
    options: LogprobOptions,
    grads: impl Fn(usize) -> RowGrad<E::Acc> + Sync + Send,
) {
    let inv_t = E::Acc::of(1.0 / options.temperature);
    let zero = E::Acc::zero();
    let n = targets.len();
    let one_row = |r: usize| {
        let target = targets[r];
        // SAFETY: rows are disjoint and each is visited once.
        let row = unsafe { rows.row_mut::<E>(r) };
        if target == options.ignore_index {
            row.fill(E::store(zero));
            return;
        }
        let g = grads(r);
        let a = g.grad_logprob * inv_t;
        let b = g.grad_entropy * inv_t;
        // log p_k + H = (x_k - max) - log_sum + H.
        let shift = g.entropy - g.log_sum;
        let t = target as usize;
        // d(loss)/dz_k = (hit_k - a p_k) - b p_k (log p_k + H), hit_k = a at the target only:
        // the loop writes every column with hit = 0 (no per-column index compare, which would
        // halve the vector width), then the target's column is redone from its saved logit.
        let k = Column {
            inv_t,
            max: g.max,
            log_sum: g.log_sum,
            a,
            b,
            shift,
        };
        let target_logit = row[t];
        simd::vectorized(
            #[inline(always)]
            || row.iter_mut().for_each(|z| *z = k.grad(*z, zero)),
        );
        row[t] = k.grad(target_logit, a);
    };
    if Bound::Compute.parallel(n * rows.cols) {
        (0..n)
            .into_par_iter()
            .with_min_len(ROWS_PER_TASK)
            .for_each(one_row);
    } else {
        (0..n).for_each(one_row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// log-prob of `target` and entropy of `row / t` in f64, the plain way.
    fn naive(row: &[f32], target: usize, t: f64) -> (f64, f64) {
        let x: Vec<f64> = row.iter().map(|&z| z as f64 / t).collect();
        let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = x.iter().map(|&v| (v - m).exp()).sum();
        let lse = m + s.ln();
        let h: f64 = x
            .iter()
            .map(|&v| {
                let p = (v - lse).exp();
                if p > 0.0 { -p * (v - lse) } else { 0.0 }
            })
            .sum();
        (x[target] - lse, h)
    }

    fn run(rows: &[Vec<f32>], targets: &[i64], t: f64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let v = rows[0].len();
        let flat: Vec<f32> = rows.concat();
        let n = rows.len();
        let (mut lp, mut stats, mut ent) = (vec![0f32; n], vec![0f32; 2 * n], vec![0f32; n]);
        let r = Rows {
            base: flat.as_ptr() as usize,
            row_stride: v as isize,
            cols: v,
        };
        let options = LogprobOptions::new(t, -100).unwrap();
        // SAFETY: r describes `flat`, alive for the call.
        unsafe { forward::<f32>(r, targets, options, &mut lp, &mut stats, Some(&mut ent)) };
        (lp, stats, ent)
    }

    #[test]
    fn forward_matches_the_f64_definition_across_blocks_and_rescales() {
        // Rows longer than a block whose max grows from block to block (rescaling), with ties,
        // -inf entries and a strongly negative row.
        let v = 3 * BLOCK + 17;
        let mut rows = Vec::new();
        for k in 0..6 {
            let row: Vec<f32> = (0..v)
                .map(|j| match k {
                    0 => ((j * 37 % 101) as f32) * 0.05,
                    1 => j as f32 * 0.01,
                    2 => 1.5,
                    3 => -1e4 + (j % 7) as f32,
                    4 if j % 3 == 0 => f32::NEG_INFINITY,
                    _ => ((j * 13 % 29) as f32).sin() * 20.0,
                })
                .collect();
            rows.push(row);
        }
        let targets: Vec<i64> = vec![5, v as i64 - 1, 0, 3, 1, 77];
        for t in [1.0, 0.6] {
            let (lp, _, ent) = run(&rows, &targets, t);
            for (i, row) in rows.iter().enumerate() {
                let (want_lp, want_h) = naive(row, targets[i] as usize, t);
                assert!(
                    (lp[i] as f64 - want_lp).abs() <= 1e-4 * (1.0 + want_lp.abs()),
                    "{i}"
                );
                assert!(
                    (ent[i] as f64 - want_h).abs() <= 1e-4 * (1.0 + want_h),
                    "{i}"
                );
            }
        }
    }

    #[test]
    fn nan_and_inf_give_nan_only_in_their_row() {
        let mut rows = vec![vec![0.5f32; 300]; 3];
        rows[0][200] = f32::NAN;
        rows[1][7] = f32::INFINITY;
        let (lp, _, ent) = run(&rows, &[0, 0, 0], 1.0);
        assert!(lp[0].is_nan() && ent[0].is_nan() && lp[1].is_nan());
        assert!((lp[2] as f64 + (300f64).ln()).abs() < 1e-5);
    }

    #[test]
    fn ignored_rows_are_zero_and_get_zero_gradient() {
        let rows = vec![vec![1.0f32, 2.0, 3.0]; 2];
        let (lp, stats, ent) = run(&rows, &[-100, 2], 1.0);
        assert_eq!((lp[0], ent[0]), (0.0, 0.0));
        let mut flat: Vec<f32> = rows.concat();
        let r = Rows {
            base: flat.as_mut_ptr() as usize,
            row_stride: 3,
            cols: 3,
        };
        let options = LogprobOptions::new(1.0, -100).unwrap();
        let grads = |i: usize| RowGrad {
            grad_logprob: 1.0,
            grad_entropy: 0.0,
            max: stats[2 * i],
            log_sum: stats[2 * i + 1],
            entropy: ent[i],
        };
        // SAFETY: r describes `flat`, alive and not otherwise borrowed.
        unsafe { backward::<f32>(r, &[-100, 2], options, grads) };
        assert_eq!(&flat[..3], &[0.0, 0.0, 0.0]);
        // d log p_2 / d z = onehot - p: sums to zero, positive at the target.
        let sum: f32 = flat[3..].iter().sum();
        assert!(sum.abs() < 1e-6 && flat[5] > 0.0 && flat[3] < 0.0);
        assert!((lp[1] - (3.0 - stats[2] - stats[3])).abs() < 1e-6);
    }
}
