"""``hidden_align.loss(..., reference=...)``: one micro-batch's share of the full-batch loss,
from the group statistics of the whole batch (:mod:`hidden_align.stats`)."""

from __future__ import annotations

import torch

from ._args import accumulator, same_device
from ._row_grad import attach_delivery_hook
from ._share import resolve_anchors, share_loss
from .errors import ArgumentError, ShapeError
from .row_reference import RowReference
from .stats import _SUM_OF, GROUP_IDS_REMEDY, GroupAnchorStats, _take

__all__ = ["loss_with_reference"]


_CONTRASTIVE_REFUSED = (
    "reference: loss_type='contrastive' cannot be split across micro-batches: each anchor's "
    "log-sum-exp runs over every anchored rollout of its group, incorrect ones included, "
    "which no per-group sum carries; compute it on whole groups, without a reference"
)
# group_size numbers the blocks of this call's rows from 0, whatever rows the micro-batch holds:
# looked up in full-batch statistics, every micro-batch but one starting at row 0 would be
# compared with the wrong groups, silently.
_GROUP_SIZE_REFUSED = (
    "group_size: not accepted with a reference: it numbers the blocks of this call's rows from "
    "0, which are the full batch's groups only for a micro-batch that starts at row 0; "
    + GROUP_IDS_REMEDY
)


# Run eagerly under torch.compile (a graph break): the row-only gradient and the CPU-side
# checks are not traceable, and the share is O(B H) torch work with nothing to fuse.
@torch.compiler.disable
def loss_with_reference(
    hidden,
    mask,
    rewards,
    reference,
    *,
    group_ids,
    group_size,
    loss_type,
    reduction,
    threshold,
    eps,
    return_stats,
    cu_seqlens,
):
    """``hidden_align.loss(..., reference=...)``: this micro-batch's share of the full-batch
    loss. Arguments are checked by the caller except the reference itself."""
    if loss_type == "contrastive":
        raise ArgumentError(_CONTRASTIVE_REFUSED)
    if group_size is not None:
        per_row = not isinstance(reference, GroupAnchorStats)
        extra = " (or none: a per-row reference carries them)" if per_row else ""
        raise ArgumentError(_GROUP_SIZE_REFUSED + extra)
    if isinstance(reference, GroupAnchorStats):
        stats, refrows = reference, None
        if (stats.eps, stats.threshold) != (eps, threshold):
            raise ArgumentError(
                f"reference: computed with eps={stats.eps}, threshold={stats.threshold}, "
                f"but the loss uses eps={eps}, threshold={threshold}"
            )
        same_device(("hidden", hidden), ("reference", stats.unit_sum))
        width = stats.hidden_size
    else:
        if not isinstance(reference, RowReference):
            if not hasattr(reference, "keys"):
                raise ArgumentError(
                    "reference: expected GroupAnchorStats, RowReference or a mapping of "
                    f"RowReference.to_dict() entries, got {type(reference).__name__}"
                )
            reference = RowReference.from_dict(reference)
        stats, refrows = None, reference
        if reduction == "none":
            raise ArgumentError(
                "reduction: 'none' with a per-row reference has no group list to report "
                "per-group values in: pass the GroupAnchorStats instead"
            )
        if getattr(refrows, _SUM_OF[loss_type]) is None:
            raise ArgumentError(
                f"reference: loss_type={loss_type!r} needs {_SUM_OF[loss_type]}, which this "
                "reference left out (GroupAnchorStats.rows(..., loss_type=...))"
            )
        same_device(("hidden", hidden), ("reference", refrows.group_id))
        width = refrows.hidden_size
    if hidden.dim() in (2, 3) and hidden.shape[-1] != width:
        raise ShapeError(
            f"reference: computed for hidden size {width}, but hidden has {hidden.shape[-1]}"
        )
    if refrows is not None and rewards.dim() == 1 and len(refrows) != rewards.shape[0]:
        raise ShapeError(
            f"reference: expected {rewards.shape[0]} rows (one per rollout), got {len(refrows)}"
        )

    resolve_groups = group_ids if refrows is None or group_ids is not None else refrows.group_id
    rows, correct = resolve_anchors(
        hidden, mask, rewards, resolve_groups, None, cu_seqlens, threshold, eps
    )
    batch, dev = rows.shape[0], hidden.device
    acc = accumulator(hidden.dtype)
    part = (rows >= 0) & correct
    if refrows is None:
        labels = group_ids
        pos, found = stats.lookup(labels)
        count = _take(stats.count, pos, found)
        ref_sum = _take(getattr(stats, _SUM_OF[loss_type]), pos, found)
        valid_groups = stats.valid_groups.expand(batch)
        slot = torch.where(found, pos, torch.full_like(pos, -1))
        mismatch = torch.zeros_like(part)
        num_slots = stats.num_groups
        labels_of = labels
        report = (stats.mean_cosine, stats.valid_groups, stats.anchored_correct)
    else:
        count = refrows.count
        ref_sum = getattr(refrows, _SUM_OF[loss_type])
        valid_groups = refrows.valid_groups
        slot = torch.zeros_like(count)
        if group_ids is None:
            mismatch = torch.zeros_like(part)
        else:
            mismatch = group_ids != refrows.group_id
        num_slots = 0
        labels_of = refrows.group_id
        if batch:
            report = (refrows.mean_cosine[0], refrows.valid_groups[0], refrows.anchored_correct[0])
        else:
            # No row carries a copy of the full-batch values.
            report = (
                torch.full((), float("nan"), dtype=acc, device=dev),
                torch.zeros((), dtype=torch.int64, device=dev),
                torch.zeros((), dtype=torch.int64, device=dev),
            )
    missing = part & ((count < 1) | mismatch)
    if hidden.device.type == "cpu" and bool(missing.any()):
        b = int(missing.nonzero()[0, 0])
        raise ArgumentError(
            f"reference: rollout {b} (group id {int(labels_of[b])}) is a correct anchored "
            "rollout, but the reference has no correct anchored rollout in its group"
            + (" or was looked up with another group id" if refrows is not None else "")
            + ": the reference must come from the same rows (all micro-batches, all ranks)"
        )
    poison = missing | (rows < -1)
    if reduction == "mean":
        scale = valid_groups.to(acc).reciprocal()
    else:
        scale = torch.ones(batch, dtype=acc, device=dev)
    scale = scale.expand(batch)
    if torch.is_grad_enabled():
        attach_delivery_hook(hidden)
    options = (loss_type, reduction, eps, num_slots)
    value = share_loss(hidden, rows, part, ref_sum, count, scale, slot, poison, options)
    result = (value, stats.valid) if reduction == "none" else value
    if not return_stats:
        return result
    mean_cosine, valid_count, anchored = report
    return result, {
        "mean_cosine": mean_cosine.to(acc),
        "valid_groups": valid_count,
        "anchored_correct": anchored,
    }
