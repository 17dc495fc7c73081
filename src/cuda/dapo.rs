//! Launch code of `kernels/dapo.cu`.

use super::{Executor, Family, Grid, Side, ptr, stride, suffix};
use crate::error::Result;
use crate::op::dapo::{
    AggConfig, AggMode, ClipConfig, NormaliserTensors, PolicyForwardBuffers, PolicyInputs,
};
use crate::op::groups::Grouping;
use crate::tensor::TensorRef;

/// Columns of `[B, T]` one block of the policy kernels covers: 4 tokens per thread, and enough
/// blocks to fill a GPU at typical shapes (B = 64, T = 8192: 512 blocks).
pub const POLICY_CHUNK: usize = 1024;
/// Sums per block of the policy forward (`POLICY_SUMS`).
pub const POLICY_SUMS: usize = 5;

/// Number of column chunks of a row of `t` columns.
pub fn policy_chunks(t: usize) -> usize {
    t.div_ceil(POLICY_CHUNK).max(1)
}

/// `struct Grouping` of `kernels/dapo.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct GroupingParams {
    labels: Side,
    size: i64,
    order: u64,
}

/// `struct ResolveParams` of `kernels/dapo.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct ResolveParams {
    labels: Side,
    batch: i64,
    order: u64,
}

impl GroupingParams {
    /// With labels, first sorts the rollouts into `order` (int32 `[2 B]`, one launch of one
    /// block): the group kernels then find each group as a run of the sorted order.
    fn resolve(exec: &Executor, g: &Grouping, batch: usize, order: &TensorRef) -> Result<Self> {
        match g {
            Grouping::Ids(t) => {
                let params = ResolveParams {
                    labels: Side::of(t),
                    batch: batch as i64,
                    order: ptr(order),
                };
                if batch > 0 {
                    exec.launch(
                        Family::Dapo,
                        "dapo_resolve_groups",
                        Grid::blocks(1)?,
                        &params,
                    )?;
                }
                Ok(GroupingParams {
                    labels: params.labels,
                    size: 0,
                    order: params.order,
                })
            }
            Grouping::Size(s) => Ok(GroupingParams {
                labels: Side::NONE,
                size: *s as i64,
                order: 0,
            }),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RowSumParams {
    scores: Side,
    col_stride: i64,
    cols: i64,
    totals: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct AdvantageParams {
    totals: u64,
    groups: GroupingParams,
    batch: i64,
    eps: f64,
    norm_by_std: i64,
    out: u64,
}

/// Group advantages: per-rollout score sums into `totals` (float64 `[B]` scratch), the label
/// sort into `order` (int32 `[2 B]` scratch) when groups come as labels, then one thread per
/// group. Shapes were checked by the caller.
#[allow(clippy::too_many_arguments)]
pub fn group_advantages(
    exec: &Executor,
    scores: &TensorRef,
    grouping: &Grouping,
    eps: f64,
    norm_by_std: bool,
    totals: &TensorRef,
    order: &TensorRef,
    out: &TensorRef,
) -> Result<()> {
    let batch = scores.shape()[0];
    let sums = RowSumParams {
        scores: Side::of(scores),
        col_stride: stride(scores, 1),
        cols: scores.shape().get(1).copied().unwrap_or(1) as i64,
        totals: ptr(totals),
    };
    exec.launch(Family::Dapo, "dapo_row_sums", Grid::blocks(batch)?, &sums)?;
    let adv = AdvantageParams {
        totals: ptr(totals),
        groups: GroupingParams::resolve(exec, grouping, batch, order)?,
        batch: batch as i64,
        eps,
        norm_by_std: norm_by_std as i64,
        out: ptr(out),
    };
    exec.launch(
        Family::Dapo,
        "dapo_group_advantages",
        Grid::threads(batch)?,
        &adv,
    )
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SamplingParams {
    metric: Side,
    groups: GroupingParams,
    batch: i64,
    out: u64,
}

/// Dynamic-sampling mask: the label sort into `order` (int32 `[2 B]` scratch) when groups come
/// as labels, then one thread per group.
pub fn dynamic_sampling_mask(
    exec: &Executor,
    metric: &TensorRef,
    grouping: &Grouping,
    order: &TensorRef,
    out: &TensorRef,
) -> Result<()> {
    let batch = metric.shape()[0];
    let params = SamplingParams {
        metric: Side::of(metric),
        groups: GroupingParams::resolve(exec, grouping, batch, order)?,
        batch: batch as i64,
        out: ptr(out),
    };
    exec.launch(
        Family::Dapo,
        "dapo_dynamic_sampling",
        Grid::threads(batch)?,
        &params,
    )
}

#[repr(C)]
#[derive(Clone, Copy)]
struct OverlongParams {
    lengths: Side,
    batch: i64,
    expected: f64,
    buffer_length: f64,
    penalty_factor: f64,
    out: u64,
}

/// Overlong penalty: one launch, one thread per rollout.
pub fn overlong_penalty(
    exec: &Executor,
    lengths: &TensorRef,
    max_response_length: f64,
    buffer_length: f64,
    penalty_factor: f64,
    out: &TensorRef,
) -> Result<()> {
    let batch = lengths.shape()[0];
    let params = OverlongParams {
        lengths: Side::of(lengths),
        batch: batch as i64,
        expected: max_response_length - buffer_length,
        buffer_length,
        penalty_factor,
        out: ptr(out),
    };
    exec.launch(
        Family::Dapo,
        "dapo_overlong_penalty",
        Grid::threads(batch)?,
        &params,
    )
}

/// `struct PolicyParams` of `kernels/dapo.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct PolicyParams {
    log_prob: u64,
    lp_s0: i64,
    lp_s1: i64,
    old_log_prob: u64,
    old_s0: i64,
    old_s1: i64,
    advantages: u64,
    adv_s0: i64,
    adv_s1: i64,
    mask: Side,
    mask_s1: i64,
    weights: u64,
    w_s0: i64,
    w_s1: i64,
    batch: i64,
    cols: i64,
    chunk: i64,
    clip_lo: f64,
    clip_hi: f64,
    clip_c: f64,
    clamp: f64,
    factor: u64,
    partials: u64,
    row_scale: u64,
    upstream: Side,
    saved: i64,
}

impl PolicyParams {
    fn of(inputs: &PolicyInputs, (b, t): (usize, usize), clip: &ClipConfig) -> Self {
        let w = inputs.rollout_is_weights.as_ref();
        PolicyParams {
            log_prob: ptr(&inputs.log_prob),
            lp_s0: stride(&inputs.log_prob, 0),
            lp_s1: stride(&inputs.log_prob, 1),
            old_log_prob: ptr(&inputs.old_log_prob),
            old_s0: stride(&inputs.old_log_prob, 0),
            old_s1: stride(&inputs.old_log_prob, 1),
            advantages: ptr(&inputs.advantages),
            adv_s0: stride(&inputs.advantages, 0),
            // Per-rollout advantages [B] broadcast over T.
            adv_s1: stride(&inputs.advantages, 1),
            mask: Side::of(&inputs.response_mask),
            mask_s1: stride(&inputs.response_mask, 1),
            weights: w.map_or(0, ptr),
            w_s0: w.map_or(0, |w| stride(w, 0)),
            w_s1: w.map_or(0, |w| stride(w, 1)),
            batch: b as i64,
            cols: t as i64,
            chunk: POLICY_CHUNK as i64,
            clip_lo: 1.0 - clip.low,
            clip_hi: 1.0 + clip.high,
            clip_c: clip.c,
            clamp: clip.log_ratio_clamp.unwrap_or(f64::INFINITY),
            factor: 0,
            partials: 0,
            row_scale: 0,
            upstream: Side::NONE,
            saved: 0,
        }
    }

    fn grid(&self) -> Result<Grid> {
        Grid::blocks_2d(self.batch as usize, policy_chunks(self.cols as usize))
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct PolicyReduceParams {
    partials: u64,
    batch: i64,
    chunks: i64,
    cols: i64,
    mode: i64,
    dp_size: f64,
    batch_num_tokens: f64,
    batch_num_tokens_tensor: Side,
    global_batch_size: f64,
    global_batch_size_tensor: Side,
    loss_scale_factor: f64,
    loss_scale_factor_tensor: Side,
    loss: u64,
    metrics: u64,
    row_scale: u64,
}

/// Policy forward in two launches: per (row, column chunk) token math and sums, then one
/// block reducing them as verl's `agg_loss`.
pub fn policy_forward(
    exec: &Executor,
    inputs: &PolicyInputs,
    shape: (usize, usize),
    clip: &ClipConfig,
    agg: &AggConfig,
    norms: &NormaliserTensors,
    out: &PolicyForwardBuffers,
) -> Result<()> {
    let dtype = inputs.log_prob.dtype();
    let mut p = PolicyParams::of(inputs, shape, clip);
    p.factor = out.factor.map_or(0, ptr);
    p.partials = ptr(out.partials);
    exec.launch(
        Family::Dapo,
        &format!("policy_forward_{}", suffix(dtype)),
        p.grid()?,
        &p,
    )?;
    let mode = match agg.mode {
        AggMode::TokenMean => 0,
        AggMode::TokenSum => 1,
        AggMode::SeqMeanTokenSum => 2,
        AggMode::SeqMeanTokenMean => 3,
        AggMode::SeqMeanTokenSumNorm => 4,
    };
    let reduce = PolicyReduceParams {
        partials: ptr(out.partials),
        batch: shape.0 as i64,
        chunks: policy_chunks(shape.1) as i64,
        cols: shape.1 as i64,
        mode,
        dp_size: agg.dp_size,
        batch_num_tokens: agg.batch_num_tokens.unwrap_or(-1.0),
        batch_num_tokens_tensor: Side::of_opt(norms.batch_num_tokens.as_ref()),
        global_batch_size: agg.global_batch_size.unwrap_or(-1.0),
        global_batch_size_tensor: Side::of_opt(norms.global_batch_size.as_ref()),
        loss_scale_factor: agg.loss_scale_factor.unwrap_or(-1.0),
        loss_scale_factor_tensor: Side::of_opt(norms.loss_scale_factor.as_ref()),
        loss: ptr(out.loss),
        metrics: ptr(out.metrics),
        row_scale: ptr(out.row_scale),
    };
    exec.launch(
        Family::Dapo,
        "dapo_policy_reduce",
        Grid::blocks(1)?,
        &reduce,
    )
}

/// Policy backward in one launch: `grad` is scaled in place when it holds the saved factor,
/// else recomputed from the inputs; `upstream` is the 0-d gradient of the loss, read by the
/// kernel.
#[allow(clippy::too_many_arguments)]
pub fn policy_backward(
    exec: &Executor,
    inputs: &PolicyInputs,
    shape: (usize, usize),
    clip: &ClipConfig,
    row_scale: &TensorRef,
    upstream: &TensorRef,
    grad: &TensorRef,
    saved_factor: bool,
) -> Result<()> {
    let dtype = inputs.log_prob.dtype();
    let mut p = PolicyParams::of(inputs, shape, clip);
    p.factor = ptr(grad);
    p.row_scale = ptr(row_scale);
    p.upstream = Side::of(upstream);
    p.saved = saved_factor as i64;
    exec.launch(
        Family::Dapo,
        &format!("policy_backward_{}", suffix(dtype)),
        p.grid()?,
        &p,
    )
}
