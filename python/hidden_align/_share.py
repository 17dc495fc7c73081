"""One micro-batch's share of the full-batch alignment loss, given full-group reference sums.

With ``S_g`` (sum of unit anchors), ``R_g`` (sum of raw anchors) and ``n_g`` (count) of every
group's correct anchored rollouts over the *whole* batch, the loss splits into per-rollout
terms (docs/design.md section 4): summing the terms of the rows of any partition of the batch gives
the full-batch value, and the hand-written gradient of each row is its full-batch gradient.
For ``cosine`` that gradient is *not* the derivative of the row's term with ``S_g`` held
fixed (``S_g`` contains ``u_i`` and every other row's term depends on ``u_i`` too), which is
why the backward is written out rather than left to autograd.

Everything after anchor resolution is plain torch with no host synchronisation, so the same
code serves every device.
"""

from __future__ import annotations

import torch

from ._align_native import align_forward
from ._args import accumulator
from ._double_backward import first_order_only
from ._row_grad import AnchorRowGrad

__all__ = ["gather_anchor_rows", "resolve_anchors", "share_loss", "unit_rows"]

_NO_DOUBLE_BACKWARD = (
    b"hidden_align.loss with a reference supports first-order gradients only: its gradient "
    b"cannot be differentiated again (double backward through create_graph=True)"
)
# The kernel backend marks a malformed anchor with this row (an index out of range, two anchors
# in one mask row, bad cu_seqlens) instead of raising, which would need a host read.
ROW_INVALID = -2


def resolve_anchors(hidden, mask, rewards, group_ids, group_size, cu_seqlens, threshold, eps):
    """``(rows, correct)``: each rollout's flat anchor row (``b * T + t`` padded, ``n`` packed;
    -1 none, ``ROW_INVALID`` for a malformed anchor on the kernel backend) and its correctness,
    resolved and validated (``eps`` included) exactly as :func:`hidden_align.loss` does.

    This runs the native forward of the cosine loss and keeps only its resolution outputs: one
    extra pass over the B anchor rows, in one place so that a leaner native entry point can
    replace it.
    """
    out = align_forward(
        hidden,
        mask,
        rewards,
        group_ids,
        group_size,
        cu_seqlens,
        "cosine",
        "sum",
        threshold,
        eps,
        0.1,
    )
    return out.rows, out.correct


def gather_anchor_rows(hidden: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype):
    """``[B, H]`` anchor rows of ``hidden`` (any strides) in ``dtype``; rollouts without a
    valid row (``rows < 0``) get row 0's values, which callers mask out."""
    width = hidden.shape[-1]
    if hidden.dim() == 3:
        seq = hidden.shape[1]
        if hidden.shape[0] * seq == 0:
            return torch.zeros(rows.shape[0], width, dtype=dtype, device=hidden.device)
        r = rows.clamp_min(0)
        # Advanced indexing reads only the B rows, whatever the strides of hidden.
        return hidden.detach()[r // seq, r % seq].to(dtype)
    if hidden.shape[0] == 0:
        return torch.zeros(rows.shape[0], width, dtype=dtype, device=hidden.device)
    return hidden.detach()[rows.clamp_min(0)].to(dtype)


def unit_rows(h: torch.Tensor, eps: float):
    """``(u, inv, clamped)``: ``u = h * inv`` with ``inv = 1 / max(||h||, eps)`` per row and
    whether the clamp was hit, as the native backends compute them."""
    norm = torch.linalg.vector_norm(h, dim=-1)
    clamped = norm <= eps
    inv = torch.where(clamped, torch.full_like(norm, 1.0 / eps), norm.reciprocal())
    return h * inv[:, None], inv, clamped


def _direction(s: torch.Tensor, eps: float) -> torch.Tensor:
    """``s / max(||s||, eps)`` per row: the centroid direction of the native backends."""
    norm = torch.linalg.vector_norm(s, dim=-1)
    inv = torch.where(norm > eps, norm.reciprocal(), torch.full_like(norm, 1.0 / eps))
    return s * inv[:, None]


def _per_slot(values: torch.Tensor, slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    """``out[g] = sum of values[b] with slot[b] == g``, in row order for every g: a dense
    comparison (O(G B) scalars) rather than a scatter, so the sums are reproducible on every
    device and need no host read."""
    ids = torch.arange(num_slots, device=values.device)
    hit = slot[None, :] == ids[:, None]
    return torch.where(hit, values[None, :], torch.zeros_like(values[None, :])).sum(1)


class _AlignShare(torch.autograd.Function):
    """This micro-batch's share of the full-batch loss; backward returns an
    :class:`AnchorRowGrad` holding each participating row's full-batch gradient."""

    @staticmethod
    def forward(ctx, hidden, rows, part, ref_sum, count, scale, slot, poison, options):
        loss_type, reduction, eps, num_slots = options
        acc = accumulator(hidden.dtype)
        h = gather_anchor_rows(hidden, rows, acc)
        n = count.to(acc)
        ref_sum = ref_sum.to(acc)
        active = part & (count >= 2)
        if loss_type == "mse":
            centre = ref_sum / n[:, None]
            dev = h - centre
            term = (dev * dev).sum(-1) / (n * h.shape[-1])
            ctx.state = (dev,)
        else:
            u, inv, clamped = unit_rows(h, eps)
            if loss_type == "cosine":
                others = ref_sum - u  # S_g - u_i: the other correct anchors of the group
                term = (1 - (u * others).sum(-1) / (n - 1)) / n
                ctx.state = (u, inv, clamped, others)
            else:
                direction = _direction(ref_sum, eps)
                term = (1 - (u * direction).sum(-1)) / n
                ctx.state = (u, inv, clamped, direction)
        zero = torch.zeros((), dtype=acc, device=h.device)
        share = torch.where(active, term * scale, zero)
        share = torch.where(poison, torch.full_like(share, float("nan")), share)
        if reduction == "none":
            value = _per_slot(share, slot, num_slots)
        else:
            value = share.sum()
        # A malformed anchor or a missing group anywhere in the micro-batch poisons every value,
        # as a malformed anchor does in the full-batch loss.
        value = torch.where(poison.any(), torch.full_like(value, float("nan")), value)
        ctx.save_for_backward(hidden, rows, active, poison, n, scale, slot)
        ctx.options = options
        return value

    @staticmethod
    def backward(ctx, grad_value):
        hidden, rows, active, poison, n, scale, slot = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        loss_type, reduction, eps, _ = ctx.options
        grad_value = grad_value.detach().to(n.dtype)
        if reduction == "none":
            # No slot at all means no group in the reference, hence no active row.
            empty = grad_value.numel() == 0
            upstream = torch.zeros_like(scale) if empty else grad_value[slot.clamp_min(0)]
        else:
            upstream = grad_value
        w = scale * upstream
        if loss_type == "mse":
            (dev,) = ctx.state
            vals = dev * (2 * w / (n * dev.shape[-1]))[:, None]
        else:
            u, inv, clamped, ref = ctx.state
            if loss_type == "cosine":
                g = ref * (-2 * w / (n * (n - 1)))[:, None]
            else:
                g = ref * (-w / n)[:, None]
            # Chain through u = h / max(||h||, eps); a clamped norm makes du/dh = I / eps.
            proj = torch.where(clamped, torch.zeros_like(inv), (u * g).sum(-1))
            vals = (g - proj[:, None] * u) * inv[:, None]
        vals = torch.where(active[:, None], vals, torch.zeros_like(vals))
        vals = torch.where(poison[:, None], torch.full_like(vals, float("nan")), vals)
        keep = (active | poison) & (rows >= 0)
        grad = AnchorRowGrad(hidden, torch.where(keep, rows, torch.full_like(rows, -1)), vals)
        if torch.is_grad_enabled():
            # create_graph=True: first-order values stay exact, but differentiating them again
            # must fail loudly rather than silently treat this gradient as a constant.
            dense = grad.materialize().detach()
            (grad,) = first_order_only(_NO_DOUBLE_BACKWARD, (dense,), (hidden,))
        return grad, None, None, None, None, None, None, None, None


def share_loss(hidden, rows, part, ref_sum, count, scale, slot, poison, options):
    """Applies :class:`_AlignShare`; see :func:`hidden_align.stats.loss_with_reference`.

    ``part``: correct anchored rollouts; ``ref_sum`` ``[B, H]``: ``S_g`` (``R_g`` for mse) of
    each row's group; ``count`` ``[B]``: ``n_g``; ``scale`` ``[B]``: the group weight (``1 /
    valid groups`` for mean, else 1); ``slot`` ``[B]``: the group's position in the result of
    ``reduction="none"``; ``poison`` ``[B]``: rows that make the result NaN.
    """
    return _AlignShare.apply(hidden, rows, part, ref_sum, count, scale, slot, poison, options)
