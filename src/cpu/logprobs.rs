//! Token log-probs and entropies over a chunk of logits, and the chunk's logit gradient in
//! place (`op::logprobs` has the formulas). One pass per row each way: the forward keeps a
//! running max, the sum of `e^{x - max}` and the sum of `e^{x - max} (x - max)`, rescaled
//! when the max grows; blocks of [`BLOCK`] columns take their max first so the inner loop is
//! branch-free and vectorises (the `exp` is [`Acc::exp_fast`]).

use num_traits::{Float, Zero};
use rayon::prelude::*;

use super::Bound;
use super::float::{Acc, Elem};
use crate::op::logprobs::LogprobOptions;

/// Columns per block of the running max.
const BLOCK: usize = 64;
/// Interleaved partial sums inside a block (fixed order: results do not depend on threads).
const LANES: usize = 8;

/// One row's `(max, sum e^{x - max}, sum e^{x - max} (x - max))` over `x = z * inv_t`.
/// NaN or `+inf` anywhere makes the sums NaN; a row of `-inf` gives `(-inf, 0, 0)`.
fn row_sums<E: Elem>(row: &[E], inv_t: E::Acc) -> (E::Acc, E::Acc, E::Acc) {
    let zero = E::Acc::zero();
    let mut m = E::Acc::neg_infinity();
    let (mut s, mut t) = (zero, zero);
    let mut x = [zero; BLOCK];
    for block in row.chunks(BLOCK) {
        let x = &mut x[..block.len()];
        let mut bm = E::Acc::neg_infinity();
        let mut nan = false;
        for (xi, &z) in x.iter_mut().zip(block) {
            *xi = z.load() * inv_t;
            bm = if *xi > bm { *xi } else { bm };
            nan |= xi.is_nan();
        }
        if nan {
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

/// Fills `logprob`, `lse` and (when given) `entropy` for every row of `rows`. Targets were
/// checked to be in `0..V` or the ignore index; ignored rows get zeros.
///
/// # Safety
/// `rows` describes a live `[targets.len(), V]` tensor of element type `E`.
pub unsafe fn forward<E: Elem>(
    rows: Rows,
    targets: &[i64],
    options: LogprobOptions,
    logprob: &mut [E::Acc],
    lse: &mut [E::Acc],
    mut entropy: Option<&mut [E::Acc]>,
) {
    let inv_t = E::Acc::of(1.0 / options.temperature);
    let n = targets.len();
    let mut per_row = vec![[E::Acc::zero(); 3]; n];
    let one_row = |r: usize, o: &mut [E::Acc; 3]| {
        let target = targets[r];
        if target == options.ignore_index {
            return;
        }
        // SAFETY: r < n, a row of the tensor (the caller's promise).
        let row = unsafe { rows.row::<E>(r) };
        let (m, s, t) = row_sums(row, inv_t);
        let log_s = s.ln();
        let xt = row[target as usize].load() * inv_t;
        // log p_t = (x_t - m) - log s; H = log s - t / s (both free of the max).
        *o = [(xt - m) - log_s, m + log_s, log_s - t / s];
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
    for (r, [lp, l, h]) in per_row.into_iter().enumerate() {
        logprob[r] = lp;
        lse[r] = l;
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
    /// The forward pass's `lse`.
    pub lse: A,
    /// The forward pass's entropy (0 when no entropy gradient flows).
    pub entropy: A,
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
        // x_k - lse + H = log p_k + H.
        let shift = g.entropy - g.lse;
        let t = target as usize;
        for (k, z) in row.iter_mut().enumerate() {
            let x = z.load() * inv_t;
            let p = (x - g.lse).exp_fast();
            // p = 0 where x = -inf, whose (x + shift) would make the product NaN.
            let ent = if p > zero { b * p * (x + shift) } else { zero };
            let hit = if k == t { a } else { zero };
            *z = E::store((hit - a * p) - ent);
        }
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
