//! Launch code of `kernels/anchor_align.cu`.

use super::{Executor, Family, Grid, Side, ptr, stride, suffix};
use crate::error::Result;
use crate::op::align::{AlignBuffers, AlignConfig, AlignInputs, LossType, Reduction};
use crate::op::anchor_plan::{Anchors, RowSpace};
use crate::op::groups::Grouping;
use crate::tensor::TensorRef;

/// Float32 scratch rows of `work` (`[WORK_ROWS, B]`).
pub const WORK_ROWS: usize = 8;

/// Int32 entries of `links` per rollout (`[LINK_ROWS * B + 1]`): next member, leader flag and
/// the two buffers of the label sort, plus the block ticket.
pub const LINK_ROWS: usize = 4;

/// `struct AlignParams` of `kernels/anchor_align.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct AlignParams {
    hidden: u64,
    outer_stride: i64,
    inner_stride: i64,
    feature_stride: i64,
    inner: i64,
    num_rows: i64,
    hidden_size: i64,
    packed: i64,
    anchors: u64,
    anchor_code: i64,
    anchor_is_mask: i64,
    anchor_s0: i64,
    anchor_s1: i64,
    anchor_cols: i64,
    cu_seqlens: Side,
    rewards: Side,
    threshold: f64,
    labels: Side,
    group_size: i64,
    batch: i64,
    loss_type: i64,
    reduction: i64,
    eps: f64,
    tau: f64,
    rows: u64,
    groups: u64,
    correct: u64,
    group_loss: u64,
    group_valid: u64,
    loss: u64,
    mean_cosine: u64,
    counts: u64,
    work: u64,
    links: u64,
    upstream: Side,
    centre: u64,
    grad_rows: u64,
}

fn loss_code(t: LossType) -> i64 {
    match t {
        LossType::Cosine => 0,
        LossType::Centroid => 1,
        LossType::Mse => 2,
        LossType::Contrastive => 3,
    }
}

fn reduction_code(r: Reduction) -> i64 {
    match r {
        Reduction::Mean => 0,
        Reduction::Sum => 1,
        Reduction::None => 2,
    }
}

fn base_params(
    hidden: &TensorRef,
    space: &RowSpace,
    batch: usize,
    cfg: &AlignConfig,
    bufs: &AlignBuffers,
) -> AlignParams {
    AlignParams {
        hidden: ptr(hidden),
        outer_stride: space.outer_stride as i64,
        inner_stride: space.inner_stride as i64,
        feature_stride: space.feature_stride as i64,
        inner: space.inner.max(1) as i64,
        num_rows: space.rows as i64,
        hidden_size: space.hidden_size as i64,
        packed: space.packed as i64,
        anchors: 0,
        anchor_code: 0,
        anchor_is_mask: 0,
        anchor_s0: 0,
        anchor_s1: 0,
        anchor_cols: 0,
        cu_seqlens: Side::NONE,
        rewards: Side::NONE,
        threshold: 0.0,
        labels: Side::NONE,
        group_size: 0,
        batch: batch as i64,
        loss_type: loss_code(cfg.loss_type),
        reduction: reduction_code(cfg.reduction),
        eps: cfg.eps,
        tau: cfg.tau,
        rows: ptr(bufs.rows),
        groups: ptr(bufs.groups),
        correct: ptr(bufs.correct),
        group_loss: ptr(bufs.group_loss),
        group_valid: ptr(bufs.group_valid),
        loss: ptr(bufs.loss),
        mean_cosine: ptr(bufs.mean_cosine),
        counts: ptr(bufs.counts),
        work: ptr(bufs.work),
        links: ptr(bufs.links),
        upstream: Side::NONE,
        centre: 0,
        grad_rows: 0,
    }
}

/// Forward in two launches (`align_prepare`, `align_groups`), both over max(B, 1) blocks, after
/// `align_resolve_groups` (one block) when groups come as labels. Shapes and dtypes were
/// checked by the caller.
pub fn forward(
    exec: &Executor,
    hidden: &TensorRef,
    space: &RowSpace,
    inputs: &AlignInputs,
    cfg: &AlignConfig,
    bufs: &AlignBuffers,
) -> Result<()> {
    let batch = inputs.rewards.shape()[0];
    let mut p = base_params(hidden, space, batch, cfg, bufs);
    let (anchors, is_mask) = match inputs.anchors {
        Anchors::Mask(t) => (t, true),
        Anchors::Index(t) => (t, false),
    };
    p.anchors = ptr(anchors);
    // A mask marks anchors with any nonzero byte, bool or uint8 alike.
    p.anchor_code = super::code_of(anchors.dtype());
    p.anchor_is_mask = is_mask as i64;
    p.anchor_s0 = stride(anchors, 0);
    p.anchor_s1 = stride(anchors, 1);
    p.anchor_cols = anchors.shape().get(1).copied().unwrap_or(0) as i64;
    p.cu_seqlens = Side::of_opt(inputs.cu_seqlens);
    p.rewards = Side::of(inputs.rewards);
    p.threshold = inputs.threshold;
    match inputs.grouping {
        Grouping::Ids(t) => p.labels = Side::of(t),
        Grouping::Size(g) => p.group_size = *g as i64,
    }
    let dtype = suffix(hidden.dtype());
    if matches!(inputs.grouping, Grouping::Ids(_)) && batch > 0 {
        exec.launch(
            Family::AnchorAlign,
            "align_resolve_groups",
            Grid::blocks(1)?,
            &p,
        )?;
    }
    // One block even for B = 0, so that the loss and counts are written.
    let grid = Grid::blocks(batch.max(1))?;
    exec.launch(
        Family::AnchorAlign,
        &format!("align_prepare_{dtype}"),
        grid,
        &p,
    )?;
    exec.launch(
        Family::AnchorAlign,
        &format!("align_groups_{dtype}"),
        grid,
        &p,
    )
}

/// Backward in one launch over B blocks: fills `grad_rows` (float32 `[B, H]`), using
/// `centre` (float32 `[B, H]`) as scratch; `upstream` holds one value (`mean`/`sum`) or one
/// per group (`none`).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    exec: &Executor,
    hidden: &TensorRef,
    space: &RowSpace,
    cfg: &AlignConfig,
    bufs: &AlignBuffers,
    upstream: &TensorRef,
    centre: &TensorRef,
    grad_rows: &TensorRef,
) -> Result<()> {
    let batch = bufs.rows.shape()[0];
    let mut p = base_params(hidden, space, batch, cfg, bufs);
    p.upstream = Side::of(upstream);
    p.centre = ptr(centre);
    p.grad_rows = ptr(grad_rows);
    let kernel = format!("align_backward_{}", suffix(hidden.dtype()));
    exec.launch(Family::AnchorAlign, &kernel, Grid::blocks(batch)?, &p)
}
