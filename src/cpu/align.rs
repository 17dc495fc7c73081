//! CPU kernels of the alignment loss: the executable specification.
//!
//! Work is O(B * H) for every loss type but `contrastive` (O(sum_g m_g^2 H), m_g the anchored
//! rollouts of group g). Only the anchor rows of `hidden` are read. Groups are independent
//! and reduced in a fixed order, so results are bitwise reproducible.

use ndarray::Array2;
use num_traits::{Float, One, Zero};

use super::float::{Acc, Elem, Pooled, dot, give_back, take_zeroed};
use super::{Bound, for_each_chunk, for_each_chunk_with, map_range, simd};
use crate::op::align::{AlignConfig, AlignForward, LossType, Reduction};
use crate::op::anchor_plan::{AnchorPlan, RowSpace};
use crate::tensor::TensorRef;

/// The anchor rows of one call, widened to the accumulator type.
struct Anchored<A: Pooled> {
    /// Rollout of each gathered row.
    rollout: Vec<usize>,
    /// Raw states `h` `[m, H]`, kept for `mse` only.
    h: Option<Array2<A>>,
    /// Unit states `u = h / max(||h||, eps)` `[m, H]`.
    u: Array2<A>,
    /// `1 / max(||h||, eps)` per row.
    inv_norm: Vec<A>,
    /// Whether the norm was clamped to eps (then `du/dh = I / eps`).
    clamped: Vec<bool>,
    /// Per group: gathered rows of correct rollouts, ascending rollout order.
    correct: Vec<Vec<usize>>,
    /// Per group: gathered rows of incorrect rollouts (contrastive only).
    negative: Vec<Vec<usize>>,
}

fn pooled_matrix<A: Pooled>(rows: usize, cols: usize) -> Array2<A> {
    Array2::from_shape_vec((rows, cols), take_zeroed(rows * cols)).expect("length matches shape")
}

impl<A: Pooled> Drop for Anchored<A> {
    fn drop(&mut self) {
        for m in [Some(std::mem::take(&mut self.u)), self.h.take()]
            .into_iter()
            .flatten()
        {
            give_back(m.into_raw_vec_and_offset().0);
        }
    }
}

fn gather<T: Elem>(
    hidden: &TensorRef,
    space: &RowSpace,
    plan: &AnchorPlan,
    cfg: &AlignConfig,
) -> Anchored<T::Acc> {
    let with_negatives = cfg.loss_type == LossType::Contrastive;
    let rollout: Vec<usize> = (0..plan.batch())
        .filter(|&b| plan.rows[b] >= 0 && (plan.correct[b] || with_negatives))
        .collect();
    let hs = space.hidden_size;
    // Raw pointers are not Sync; the address crosses into the workers as an integer.
    let base = hidden.data_ptr() as usize;
    let load_row = |i: usize, row: &mut [T::Acc]| {
        let off = space.offset(plan.rows[rollout[i]] as usize);
        let base = base as *const T;
        if space.feature_stride == 1 {
            // SAFETY: as below, for the H contiguous elements of the row.
            let src = unsafe { std::slice::from_raw_parts(base.offset(off), row.len()) };
            row.iter_mut().zip(src).for_each(|(x, &v)| *x = v.load());
            return;
        }
        for (j, x) in row.iter_mut().enumerate() {
            // SAFETY: plan rows were checked against the row space of `hidden`, and j < H;
            // the TensorRef invariant covers every such element.
            *x = unsafe { *base.offset(off + j as isize * space.feature_stride) }.load();
        }
    };
    let eps = T::Acc::of(cfg.eps);
    // One pass per row: load, norm, normalise in place; the row's scale 1 / max(||h||, eps)
    // and whether the clamp was hit go to `scales`.
    let mut u = pooled_matrix::<T::Acc>(rollout.len(), hs);
    let mut scales = vec![(T::Acc::zero(), false); rollout.len()];
    for_each_chunk_with(
        u.as_slice_mut().expect("fresh arrays are contiguous"),
        hs,
        &mut scales,
        Bound::Memory,
        |i, row, scale| {
            load_row(i, row);
            let norm = dot(row, row).sqrt();
            *scale = if norm <= eps {
                (eps.recip(), true)
            } else {
                (norm.recip(), false)
            };
            row.iter_mut().for_each(|x| *x *= scale.0);
        },
    );
    // Only mse needs the raw states.
    let h = (cfg.loss_type == LossType::Mse).then(|| {
        let mut h = pooled_matrix::<T::Acc>(rollout.len(), hs);
        for_each_chunk(
            h.as_slice_mut().expect("fresh arrays are contiguous"),
            hs,
            Bound::Memory,
            load_row,
        );
        h
    });
    let inv_norm = scales.iter().map(|s| s.0).collect();
    let clamped = scales.iter().map(|s| s.1).collect();
    let mut correct = vec![Vec::new(); plan.num_groups];
    let mut negative = vec![Vec::new(); plan.num_groups];
    for (i, &b) in rollout.iter().enumerate() {
        let g = plan.group[b];
        if plan.correct[b] {
            correct[g].push(i);
        } else {
            negative[g].push(i);
        }
    }
    Anchored {
        rollout,
        h,
        u,
        inv_norm,
        clamped,
        correct,
        negative,
    }
}

/// Only the contrastive loss does enough arithmetic per group (m^2 H) to use the pool.
fn group_bound(cfg: &AlignConfig) -> Bound {
    if cfg.loss_type == LossType::Contrastive {
        Bound::Compute
    } else {
        Bound::Memory
    }
}

/// Element operations of the per-group pass (for choosing between sequential and parallel).
fn gather_work<A: Pooled>(a: &Anchored<A>, cfg: &AlignConfig) -> usize {
    let pairs = if cfg.loss_type == LossType::Contrastive {
        a.rollout.len().max(1)
    } else {
        2
    };
    a.u.len() * pairs
}

#[inline(always)]
fn row<A>(m: &Array2<A>, i: usize) -> &[A] {
    m.row(i).to_slice().expect("owned arrays are row-major")
}

/// Sum of the listed rows of `m`.
#[inline(always)]
fn sum_rows<A: Acc>(m: &Array2<A>, rows: &[usize]) -> Vec<A> {
    let mut s = vec![A::zero(); m.ncols()];
    for &i in rows {
        s.iter_mut().zip(row(m, i)).for_each(|(a, &x)| *a += x);
    }
    s
}

fn is_valid(cfg: &AlignConfig, n: usize, negatives: usize) -> bool {
    match cfg.loss_type {
        LossType::Contrastive => n >= 2 && negatives >= 1,
        _ => n >= 2,
    }
}

/// Mean pairwise cosine `(||S||^2 - sum ||u_i||^2) / (n (n - 1))` of a group's correct anchors,
/// held to [-1, 1]: for (nearly) identical anchors rounding can push the difference of sums a few
/// ulps past 1, which would make the cosine loss slightly negative. NaN stays NaN.
#[inline(always)]
fn pair_cosine<A: Pooled>(a: &Anchored<A>, members: &[usize]) -> A {
    let n = A::of(members.len() as f64);
    let s = sum_rows(&a.u, members);
    let self_sq: A = members
        .iter()
        .map(|&i| dot(row(&a.u, i), row(&a.u, i)))
        .sum();
    let c = (dot(&s, &s) - self_sq) / (n * (n - A::one()));
    if c > A::one() {
        A::one()
    } else if c < -A::one() {
        -A::one()
    } else {
        c
    }
}

/// Per-group loss of a valid group.
#[inline(always)]
fn group_loss<A: Pooled>(a: &Anchored<A>, cfg: &AlignConfig, g: usize) -> A {
    let members = &a.correct[g];
    let n = A::of(members.len() as f64);
    match cfg.loss_type {
        LossType::Cosine => A::one() - pair_cosine(a, members),
        LossType::Centroid => {
            let s = sum_rows(&a.u, members);
            let dir = unit(&s, A::of(cfg.eps));
            members
                .iter()
                .map(|&i| A::one() - dot(row(&a.u, i), &dir))
                .sum::<A>()
                / n
        }
        LossType::Mse => {
            let raw = a.h.as_ref().expect("mse keeps the raw states");
            let mean: Vec<A> = sum_rows(raw, members).into_iter().map(|x| x / n).collect();
            let h = A::of(raw.ncols() as f64);
            members
                .iter()
                .map(|&i| {
                    let dev: Vec<A> = row(raw, i)
                        .iter()
                        .zip(&mean)
                        .map(|(&x, &m)| x - m)
                        .collect();
                    dot(&dev, &dev)
                })
                .sum::<A>()
                / (n * h)
        }
        LossType::Contrastive => {
            let (_, logits) = contrastive_logits(a, cfg, g);
            let pos = A::one() / (n - A::one());
            logits
                .iter()
                .map(|z_i| {
                    let lse = logsumexp(z_i);
                    // The first n anchored rows are the correct ones (the positives).
                    let positive: A = z_i[..members.len()].iter().flatten().copied().sum();
                    lse - pos * positive
                })
                .sum::<A>()
                / n
        }
    }
}

#[inline(always)]
fn unit<A: Acc>(s: &[A], eps: A) -> Vec<A> {
    let norm = dot(s, s).sqrt();
    let inv = if norm > eps {
        norm.recip()
    } else {
        eps.recip()
    };
    s.iter().map(|&x| x * inv).collect()
}

/// For each correct anchor i of group g: `z_ia = u_i . u_a / tau` over the group's anchored
/// rows a (correct then incorrect), `None` on the diagonal. Returns the anchored rows too.
fn contrastive_logits<A: Pooled>(
    a: &Anchored<A>,
    cfg: &AlignConfig,
    g: usize,
) -> (Vec<usize>, Vec<Vec<Option<A>>>) {
    let anchored: Vec<usize> = a.correct[g].iter().chain(&a.negative[g]).copied().collect();
    let inv_tau = A::of(1.0 / cfg.tau);
    let logits = a.correct[g]
        .iter()
        .map(|&i| {
            anchored
                .iter()
                .map(|&k| (k != i).then(|| dot(row(&a.u, i), row(&a.u, k)) * inv_tau))
                .collect()
        })
        .collect();
    (anchored, logits)
}

fn logsumexp<A: Acc>(z: &[Option<A>]) -> A {
    let max = z.iter().flatten().fold(A::neg_infinity(), |m, &x| m.max(x));
    max + z.iter().flatten().map(|&x| (x - max).exp()).sum::<A>().ln()
}

/// Forward pass over the anchor rows of `hidden`.
pub fn forward<T: Elem>(
    hidden: &TensorRef,
    space: &RowSpace,
    plan: &AnchorPlan,
    cfg: &AlignConfig,
) -> AlignForward {
    let a = gather::<T>(hidden, space, plan, cfg);
    let work = gather_work(&a, cfg);
    let per_group: Vec<(T::Acc, bool, Option<T::Acc>)> =
        map_range(plan.num_groups, work, group_bound(cfg), |g| {
            simd::vectorized(
                #[inline(always)]
                || {
                    let n = a.correct[g].len();
                    let valid = is_valid(cfg, n, a.negative[g].len());
                    let cosine = (n >= 2).then(|| pair_cosine(&a, &a.correct[g]));
                    let loss = match (valid, cosine) {
                        (false, _) => T::Acc::zero(),
                        // The cosine loss is the statistic's complement: computed once.
                        (true, Some(c)) if cfg.loss_type == LossType::Cosine => T::Acc::one() - c,
                        (true, _) => group_loss(&a, cfg, g),
                    };
                    (loss, valid, cosine)
                },
            )
        });
    let valid_groups = per_group.iter().filter(|p| p.1).count();
    let total: T::Acc = per_group.iter().map(|p| p.0).sum();
    let loss = match cfg.reduction {
        Reduction::Mean if valid_groups > 0 => total / T::Acc::of(valid_groups as f64),
        Reduction::Mean => T::Acc::zero(),
        Reduction::Sum | Reduction::None => total,
    };
    let cosines: Vec<T::Acc> = per_group.iter().filter_map(|p| p.2).collect();
    let mean_cosine = if cosines.is_empty() {
        f64::NAN
    } else {
        (cosines.iter().copied().sum::<T::Acc>() / T::Acc::of(cosines.len() as f64)).f64()
    };
    AlignForward {
        group_loss: per_group.iter().map(|p| p.0.f64()).collect(),
        group_valid: per_group.iter().map(|p| p.1).collect(),
        loss: loss.f64(),
        mean_cosine,
        valid_groups,
        anchored_correct: a.correct.iter().map(Vec::len).sum(),
    }
}

/// Backward pass: `out` is `[B, H]` row-major; every rollout's row receives `dL/dh` at its
/// anchor (zero for rollouts that take no part).
pub fn backward<T: Elem>(
    hidden: &TensorRef,
    space: &RowSpace,
    plan: &AnchorPlan,
    cfg: &AlignConfig,
    upstream: &[f64],
    out: &mut [T::Acc],
) {
    let a = gather::<T>(hidden, space, plan, cfg);
    let valid: Vec<bool> = (0..plan.num_groups)
        .map(|g| is_valid(cfg, a.correct[g].len(), a.negative[g].len()))
        .collect();
    let valid_groups = valid.iter().filter(|&&v| v).count();
    let weight = |g: usize| -> T::Acc {
        match cfg.reduction {
            Reduction::Mean => T::Acc::of(upstream[0] / valid_groups as f64),
            Reduction::Sum => T::Acc::of(upstream[0]),
            Reduction::None => T::Acc::of(upstream[g]),
        }
    };
    // Gradient w.r.t. u (or h for mse) of every gathered row; groups own disjoint rows.
    let work = gather_work(&a, cfg);
    let per_group: Vec<Vec<(usize, Vec<T::Acc>)>> =
        map_range(plan.num_groups, work, group_bound(cfg), |g| {
            if valid[g] {
                simd::vectorized(
                    #[inline(always)]
                    || group_grad(&a, cfg, g, weight(g)),
                )
            } else {
                Vec::new()
            }
        });
    let hs = space.hidden_size;
    let mut grad_of_row: Vec<Option<Vec<T::Acc>>> = vec![None; a.rollout.len()];
    for (i, gu) in per_group.into_iter().flatten() {
        grad_of_row[i] = Some(gu);
    }
    let mut slot = vec![None; plan.batch()];
    for (i, &b) in a.rollout.iter().enumerate() {
        slot[b] = Some(i);
    }
    let raw_grad = cfg.loss_type == LossType::Mse;
    for_each_chunk(out, hs, Bound::Memory, |b, dst| {
        let gu = slot[b].and_then(|i| grad_of_row[i].as_ref().map(|gu| (i, gu)));
        let Some((i, gu)) = gu else {
            dst.iter_mut().for_each(|x| *x = T::Acc::zero());
            return;
        };
        if raw_grad {
            dst.copy_from_slice(gu);
            return;
        }
        // Chain through u = h / max(||h||, eps): (g - (u.g) u) / ||h||, or g / eps when clamped.
        let u = row(&a.u, i);
        let inv = a.inv_norm[i];
        let proj = if a.clamped[i] {
            T::Acc::zero()
        } else {
            dot(u, gu)
        };
        for ((d, &g), &ui) in dst.iter_mut().zip(gu).zip(u) {
            *d = (g - proj * ui) * inv;
        }
    });
}

/// `dL_g/du` (`dL_g/dh` for mse) of the rows of group g, scaled by `w`.
#[inline(always)]
fn group_grad<A: Pooled>(
    a: &Anchored<A>,
    cfg: &AlignConfig,
    g: usize,
    w: A,
) -> Vec<(usize, Vec<A>)> {
    let members = &a.correct[g];
    let n = A::of(members.len() as f64);
    match cfg.loss_type {
        LossType::Cosine => {
            let s = sum_rows(&a.u, members);
            let scale = -A::of(2.0) * w / (n * (n - A::one()));
            members
                .iter()
                .map(|&i| {
                    (
                        i,
                        s.iter()
                            .zip(row(&a.u, i))
                            .map(|(&sj, &uj)| scale * (sj - uj))
                            .collect(),
                    )
                })
                .collect()
        }
        LossType::Centroid => {
            let dir = unit(&sum_rows(&a.u, members), A::of(cfg.eps));
            let scale = -w / n;
            members
                .iter()
                .map(|&i| (i, dir.iter().map(|&d| scale * d).collect()))
                .collect()
        }
        LossType::Mse => {
            let raw = a.h.as_ref().expect("mse keeps the raw states");
            let mean: Vec<A> = sum_rows(raw, members).into_iter().map(|x| x / n).collect();
            let scale = A::of(2.0) * w / (n * A::of(raw.ncols() as f64));
            members
                .iter()
                .map(|&i| {
                    (
                        i,
                        row(raw, i)
                            .iter()
                            .zip(&mean)
                            .map(|(&x, &m)| scale * (x - m))
                            .collect(),
                    )
                })
                .collect()
        }
        LossType::Contrastive => {
            let (anchored, logits) = contrastive_logits(a, cfg, g);
            let hs = a.u.ncols();
            let mut grads: Vec<Vec<A>> = vec![vec![A::zero(); hs]; anchored.len()];
            let inv_tau = A::of(1.0 / cfg.tau);
            let pos = A::one() / (n - A::one());
            // dl_i/dz_ia = softmax_a(z_i) - [a positive] / (n - 1); z_ia = u_i . u_a / tau.
            for (ci, z_i) in logits.iter().enumerate() {
                let lse = logsumexp(z_i);
                for (k, z) in z_i.iter().enumerate() {
                    let Some(z) = *z else { continue };
                    let positive = if k < members.len() { pos } else { A::zero() };
                    let c = w / n * inv_tau * ((z - lse).exp() - positive);
                    let (ui, uk) = (row(&a.u, anchored[ci]), row(&a.u, anchored[k]));
                    grads[ci].iter_mut().zip(uk).for_each(|(d, &x)| *d += c * x);
                    grads[k].iter_mut().zip(ui).for_each(|(d, &x)| *d += c * x);
                }
            }
            anchored.into_iter().zip(grads).collect()
        }
    }
}
