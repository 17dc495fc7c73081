//! The Hidden-Align loss: its options, results and the tensors a backend reads and fills.

use std::str::FromStr;

use crate::error::{Error, Result};
use crate::op::anchor_plan::Anchors;
use crate::op::groups::Grouping;
use crate::tensor::TensorRef;

/// The per-group loss (docs/design.md section 3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossType {
    /// Mean pairwise `1 - cos` over ordered pairs of correct anchors, in O(n H).
    Cosine,
    /// Mean `1 - cos(h_i, sg(S_g))` against the detached group centroid direction.
    Centroid,
    /// Mean squared distance of raw states to the detached group mean, divided by H.
    Mse,
    /// InfoNCE: other correct anchors are positives, incorrect anchors negatives.
    Contrastive,
}

impl FromStr for LossType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cosine" => Ok(LossType::Cosine),
            "centroid" => Ok(LossType::Centroid),
            "mse" => Ok(LossType::Mse),
            "contrastive" => Ok(LossType::Contrastive),
            other => Err(Error::value(
                "loss_type",
                "one of 'cosine', 'centroid', 'mse', 'contrastive'",
                format!("{other:?}"),
            )),
        }
    }
}

/// How per-group losses become the result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// Mean over valid groups; 0 when none is valid.
    Mean,
    /// Sum over valid groups.
    Sum,
    /// Per-group values (0 for invalid groups) plus a validity mask.
    None,
}

impl FromStr for Reduction {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(Reduction::Mean),
            "sum" => Ok(Reduction::Sum),
            "none" => Ok(Reduction::None),
            other => Err(Error::value(
                "reduction",
                "one of 'mean', 'sum', 'none'",
                format!("{other:?}"),
            )),
        }
    }
}

/// Options shared by forward and backward.
#[derive(Clone, Copy, Debug)]
pub struct AlignConfig {
    /// Per-group loss.
    pub loss_type: LossType,
    /// Reduction over groups.
    pub reduction: Reduction,
    /// Norm clamp of the normalisation `h / max(||h||, eps)`.
    pub eps: f64,
    /// Temperature of the contrastive loss.
    pub tau: f64,
}

impl AlignConfig {
    /// Parses and checks the options.
    pub fn new(loss_type: &str, reduction: &str, eps: f64, tau: f64) -> Result<Self> {
        if !(eps.is_finite() && eps > 0.0) {
            return Err(Error::value("eps", "a finite number > 0", eps));
        }
        if !(tau.is_finite() && tau > 0.0) {
            return Err(Error::value("tau", "a finite number > 0", tau));
        }
        Ok(AlignConfig {
            loss_type: loss_type.parse()?,
            reduction: reduction.parse()?,
            eps,
            tau,
        })
    }
}

/// Result of the forward pass, in the accumulator precision widened to f64.
#[derive(Clone, Debug, PartialEq)]
pub struct AlignForward {
    /// Per-group loss, 0 for invalid groups.
    pub group_loss: Vec<f64>,
    /// Per-group validity.
    pub group_valid: Vec<bool>,
    /// The reduced loss (`mean` or `sum`; for `none` the sum, unused).
    pub loss: f64,
    /// Mean pairwise cosine of correct anchors over groups with at least two of them
    /// (NaN when there is no such group).
    pub mean_cosine: f64,
    /// Number of groups that contribute to the loss.
    pub valid_groups: usize,
    /// Number of rollouts that are correct and have an anchor.
    pub anchored_correct: usize,
}

/// The anchor, reward and grouping inputs of the forward.
pub struct AlignInputs<'a, 'b> {
    /// Mask or indices.
    pub anchors: &'b Anchors<'a>,
    /// `[B]` rewards.
    pub rewards: &'b TensorRef<'a>,
    /// Correctness threshold.
    pub threshold: f64,
    /// Labels or contiguous blocks.
    pub grouping: &'b Grouping<'a>,
    /// `[B + 1]` offsets of packed hidden.
    pub cu_seqlens: Option<&'b TensorRef<'a>>,
}

/// Buffers the forward fills and the backward reads, allocated by the caller: int64 `rows`
/// and `groups`, bool `correct`, float32 `group_loss`, bool `group_valid` (all `[B]`),
/// float32 `loss` and `mean_cosine` (0-d), int64 `counts` `[2]`, float32 `work` `[8, B]`, int32
/// `links` `[4 B + 1]`.
pub struct AlignBuffers<'a, 'b> {
    /// Flat anchor row per rollout.
    pub rows: &'b TensorRef<'a>,
    /// Dense group per rollout.
    pub groups: &'b TensorRef<'a>,
    /// Correctness per rollout.
    pub correct: &'b TensorRef<'a>,
    /// Per-group loss.
    pub group_loss: &'b TensorRef<'a>,
    /// Per-group validity.
    pub group_valid: &'b TensorRef<'a>,
    /// The reduced loss.
    pub loss: &'b TensorRef<'a>,
    /// Mean pairwise cosine of correct anchors.
    pub mean_cosine: &'b TensorRef<'a>,
    /// Valid groups, anchored correct rollouts.
    pub counts: &'b TensorRef<'a>,
    /// Scratch kept for the backward.
    pub work: &'b TensorRef<'a>,
    /// Group links and the block ticket.
    pub links: &'b TensorRef<'a>,
}
