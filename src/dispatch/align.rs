//! The Hidden-Align loss dispatched to a backend, forward and backward. Forward and backward
//! read only the anchor rows named by the plan (see `op::anchor_plan`).

use crate::cpu;
use crate::cuda::{self, Executor};
use crate::error::{Error, Result};
use crate::op::align::{AlignBuffers, AlignConfig, AlignForward, AlignInputs, Reduction};
use crate::op::anchor_plan::{self, AnchorPlan, RowSpace};
use crate::tensor::{DType, TensorRef};

/// Forward pass on the backend of `hidden`.
pub fn forward(hidden: &TensorRef, plan: &AnchorPlan, cfg: &AlignConfig) -> Result<AlignForward> {
    let space = RowSpace::of(hidden)?;
    check_plan_rows(plan, &space)?;
    crate::dispatch_float!(hidden.dtype(), T => Ok(cpu::align::forward::<T>(hidden, &space, plan, cfg)))
}

/// Backward pass: writes `dL/dh` of every rollout's anchor row into `grad_rows`
/// (`[B, H]`, the accumulator dtype; rows of non-participating rollouts are zero).
/// `upstream` holds one value for `mean`/`sum`, one per group for `none`.
pub fn backward(
    hidden: &TensorRef,
    plan: &AnchorPlan,
    cfg: &AlignConfig,
    upstream: &[f64],
    grad_rows: &mut TensorRef,
) -> Result<()> {
    let space = RowSpace::of(hidden)?;
    check_plan_rows(plan, &space)?;
    let want = if cfg.reduction == Reduction::None {
        plan.num_groups
    } else {
        1
    };
    if upstream.len() != want {
        return Err(Error::value(
            "grad_output",
            format!("{want} values"),
            upstream.len(),
        ));
    }
    if grad_rows.shape() != [plan.batch(), space.hidden_size] {
        return Err(Error::shape(
            "grad_rows",
            format!("[{}, {}]", plan.batch(), space.hidden_size),
            grad_rows.shape(),
        ));
    }
    crate::dispatch_float!(hidden.dtype(), T => {
        // SAFETY: grad_rows is a fresh output owned by this call.
        let out = unsafe { grad_rows.as_mut_slice::<<T as cpu::float::Elem>::Acc>()? };
        cpu::align::backward::<T>(hidden, &space, plan, cfg, upstream, out);
        Ok(())
    })
}

/// Forward on the kernel backend: validates what needs no element read, fills `bufs` on the
/// device (no host synchronisation) and returns the number of groups (B, an upper bound, when
/// groups come as labels: counting them would need a read).
pub fn forward_kernels(
    exec: &Executor,
    hidden: &TensorRef,
    inputs: &AlignInputs,
    cfg: &AlignConfig,
    bufs: &AlignBuffers,
) -> Result<usize> {
    let space = RowSpace::of(hidden)?;
    cuda::expect_kernel_float(hidden)?;
    let batch = anchor_plan::check_metadata(
        hidden,
        &space,
        inputs.anchors,
        inputs.rewards,
        inputs.grouping,
        inputs.threshold,
        inputs.cu_seqlens,
    )?;
    check_buffers(bufs, batch)?;
    cuda::align::forward(exec, hidden, &space, inputs, cfg, bufs)?;
    Ok(inputs.grouping.check_metadata(batch)?.unwrap_or(batch))
}

/// Backward on the kernel backend: `grad_rows` (float32 `[B, H]`) receives `dL/dh` at each
/// rollout's anchor row; `centre` (float32 `[B, H]`) is scratch; `upstream` is the gradient of
/// the result, read on the device.
#[allow(clippy::too_many_arguments)]
pub fn backward_kernels(
    exec: &Executor,
    hidden: &TensorRef,
    cfg: &AlignConfig,
    bufs: &AlignBuffers,
    num_groups: usize,
    upstream: &TensorRef,
    centre: &TensorRef,
    grad_rows: &TensorRef,
) -> Result<()> {
    let space = RowSpace::of(hidden)?;
    cuda::expect_kernel_float(hidden)?;
    let batch = bufs.rows.shape().first().copied().unwrap_or(0);
    check_buffers(bufs, batch)?;
    if num_groups > batch {
        return Err(Error::value(
            "num_groups",
            format!("at most the number of rollouts ({batch})"),
            num_groups,
        ));
    }
    let want: &[usize] = if cfg.reduction == Reduction::None {
        &[num_groups]
    } else {
        &[]
    };
    if upstream.shape() != want && upstream.numel() != 1 {
        return Err(Error::shape(
            "grad_output",
            format!("{want:?}"),
            upstream.shape(),
        ));
    }
    upstream.expect_dtype(&[DType::F32])?;
    for t in [centre, grad_rows] {
        cuda::expect_buffer(t, &[batch, space.hidden_size], DType::F32)?;
    }
    cuda::align::backward(exec, hidden, &space, cfg, bufs, upstream, centre, grad_rows)
}

fn check_buffers(bufs: &AlignBuffers, batch: usize) -> Result<()> {
    use cuda::expect_buffer;
    expect_buffer(bufs.rows, &[batch], DType::I64)?;
    expect_buffer(bufs.groups, &[batch], DType::I64)?;
    expect_buffer(bufs.correct, &[batch], DType::Bool)?;
    expect_buffer(bufs.group_loss, &[batch], DType::F32)?;
    expect_buffer(bufs.group_valid, &[batch], DType::Bool)?;
    expect_buffer(bufs.loss, &[], DType::F32)?;
    expect_buffer(bufs.mean_cosine, &[], DType::F32)?;
    expect_buffer(bufs.counts, &[2], DType::I64)?;
    expect_buffer(bufs.work, &[cuda::align::WORK_ROWS, batch], DType::F32)?;
    expect_buffer(
        bufs.links,
        &[cuda::align::LINK_ROWS * batch + 1],
        DType::I32,
    )
}

fn check_plan_rows(plan: &AnchorPlan, space: &RowSpace) -> Result<()> {
    let n = plan.batch();
    for (name, len) in [
        ("groups", plan.group.len()),
        ("correct", plan.correct.len()),
    ] {
        if len != n {
            return Err(Error::shape(
                name,
                format!("[B] = [{n}] (one per rollout, as rows)"),
                &[len][..],
            ));
        }
    }
    // Every group holds a rollout: more groups than rollouts cannot come from a forward pass
    // (and would size the per-group buffers beyond anything the batch needs).
    if plan.num_groups > n {
        return Err(Error::value(
            "num_groups",
            format!("at most the number of rollouts ({n})"),
            plan.num_groups,
        ));
    }
    for (b, &r) in plan.rows.iter().enumerate() {
        if r < -1 || r >= space.rows as i64 {
            return Err(Error::value(
                "rows",
                format!("-1 or a row below {}", space.rows),
                format!("{r} for rollout {b}"),
            ));
        }
    }
    if plan.group.iter().any(|&g| g >= plan.num_groups) {
        return Err(Error::value(
            "groups",
            format!("indices below {}", plan.num_groups),
            "a larger index",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forward of the cosine loss against explicit pairwise loops, backward against central
    /// finite differences.
    #[test]
    fn cosine_matches_pairwise_loops_and_finite_differences() {
        let (b, t, h) = (6usize, 3usize, 4usize);
        let mut data: Vec<f64> = (0..b * t * h)
            .map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0)
            .collect();
        let rows_in_t = [0i64, 2, 1, -1, 2, 0];
        let correct = [true, true, true, true, false, true];
        let plan = AnchorPlan {
            rows: rows_in_t
                .iter()
                .enumerate()
                .map(|(i, &a)| if a < 0 { -1 } else { (i * t) as i64 + a })
                .collect(),
            group: vec![0, 0, 0, 1, 1, 1],
            correct: correct.to_vec(),
            num_groups: 2,
        };
        let cfg = AlignConfig::new("cosine", "mean", 1e-8, 0.1).unwrap();
        let loss_of = |data: &mut [f64]| {
            let hv = TensorRef::from_slice("hidden", data, &[b, t, h]);
            forward(&hv, &plan, &cfg).unwrap().loss
        };
        // Only group 0 is valid (group 1 has one anchored correct rollout).
        let unit = |data: &[f64], i: usize| -> Vec<f64> {
            let r = plan.rows[i] as usize * h;
            let v = &data[r..r + h];
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter().map(|x| x / n).collect()
        };
        let mut pair_sum = 0.0;
        for i in 0..3 {
            for j in 0..3 {
                if i != j {
                    let (ui, uj) = (unit(&data, i), unit(&data, j));
                    pair_sum += 1.0 - ui.iter().zip(&uj).map(|(a, b)| a * b).sum::<f64>();
                }
            }
        }
        let got = loss_of(&mut data);
        assert!(
            (got - pair_sum / 6.0).abs() < 1e-12,
            "{got} vs {}",
            pair_sum / 6.0
        );

        let mut grad = vec![0f64; b * h];
        {
            let hv = TensorRef::from_slice("hidden", &mut data, &[b, t, h]);
            let mut gv = TensorRef::from_slice("grad_rows", &mut grad, &[b, h]);
            backward(&hv, &plan, &cfg, &[1.0], &mut gv).unwrap();
        }
        for (rollout, &row) in plan.rows.iter().enumerate() {
            for k in 0..h {
                let numeric = if row < 0 {
                    0.0
                } else {
                    let at = row as usize * h + k;
                    let keep = data[at];
                    data[at] = keep + 1e-6;
                    let up = loss_of(&mut data);
                    data[at] = keep - 1e-6;
                    let down = loss_of(&mut data);
                    data[at] = keep;
                    (up - down) / 2e-6
                };
                let analytic = grad[rollout * h + k];
                assert!(
                    (numeric - analytic).abs() < 1e-6,
                    "rollout {rollout} k {k}: {numeric} vs {analytic}"
                );
            }
        }
    }
}
