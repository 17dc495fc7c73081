"""The Hidden-Align loss: ``hidden_align.loss``."""

from __future__ import annotations

import torch

from . import _compiled, _native
from ._align_native import align_forward
from ._args import (
    accumulator,
    as_float,
    check_anchor_inputs,
    check_bool,
    check_choice,
)
from ._backend import stream_of
from ._double_backward import first_order_only
from ._reference_loss import loss_with_reference
from ._row_grad import AnchorRowGrad, attach_delivery_hook
from .row_reference import RowReference
from .stats import GroupAnchorStats

__all__ = ["loss"]

_LOSS_TYPES = ("cosine", "centroid", "mse", "contrastive")
_REDUCTIONS = ("mean", "sum", "none")
_NO_DOUBLE_BACKWARD = (
    b"hidden_align.loss supports first-order gradients only: its gradient cannot be "
    b"differentiated again (double backward through create_graph=True)"
)


class _AlignLoss(torch.autograd.Function):
    """Fused anchor gather + group alignment; backward returns an :class:`AnchorRowGrad`."""

    @staticmethod
    def forward(ctx, hidden, mask, rewards, group_ids, group_size, cu_seqlens, options):
        reduction = options[1]
        out = align_forward(hidden, mask, rewards, group_ids, group_size, cu_seqlens, *options)
        num_groups = out.num_groups
        if out.on_kernels and reduction == "none" and group_ids is not None:
            # The group count shapes the result: the one host read of the kernel path.
            num_groups = int(torch.unique(group_ids).numel())
        ctx.save_for_backward(hidden, out.rows, out.groups, out.correct)
        ctx.options = options
        ctx.num_groups = num_groups
        state = (
            out.group_loss,
            out.group_valid,
            out.value,
            out.mean_cosine,
            out.counts,
            out.work,
            out.links,
        )
        ctx.kernel_state = state if out.on_kernels else None
        value = out.group_loss[:num_groups] if reduction == "none" else out.value
        valid = out.group_valid[:num_groups]
        ctx.mark_non_differentiable(valid, out.mean_cosine, out.counts)
        return value, valid, out.mean_cosine, out.counts

    @staticmethod
    def backward(ctx, grad_value, _grad_valid, _grad_cosine, _grad_counts):
        hidden, rows, groups, correct = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        loss_type, reduction, _, eps, tau = ctx.options
        shape = (rows.shape[0], hidden.shape[-1])
        vals = torch.empty(shape, dtype=accumulator(hidden.dtype), device=hidden.device)
        state = ctx.kernel_state
        centre = None if state is None else torch.empty_like(vals)
        _native.align_backward(
            hidden.detach(),
            rows,
            groups,
            correct,
            ctx.num_groups,
            grad_value.detach(),
            loss_type,
            reduction,
            eps,
            tau,
            vals,
            state,
            centre,
            stream_of(hidden),
        )
        grad = AnchorRowGrad(hidden, rows, vals)
        if torch.is_grad_enabled():
            # create_graph=True: first-order values stay exact, but differentiating them again
            # must fail loudly rather than silently treat this gradient as a constant.
            dense = grad.materialize().detach()
            (grad,) = first_order_only(_NO_DOUBLE_BACKWARD, (dense,), (hidden,))
        return grad, None, None, None, None, None, None


def loss(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    *,
    group_ids: torch.Tensor | None = None,
    group_size: int | None = None,
    loss_type: str = "cosine",
    reduction: str = "mean",
    threshold: float = 0.5,
    eps: float = 1e-8,
    tau: float = 0.1,
    return_stats: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    reference: GroupAnchorStats | RowReference | dict | None = None,
) -> torch.Tensor | tuple:
    """Hidden-Align loss: pulls together the anchor hidden states of each prompt's correct rollouts.

    Reads only the B anchor rows of ``hidden`` (one fused gather + normalise + group reduction);
    the backward adds its gradient rows into the gradient ``hidden`` already receives, so the
    term costs O(B H) even when ``hidden`` is ``[B, T, H]``.

    Args:
        hidden: last-layer hidden states, ``[B, T, H]`` (padded) or ``[N, H]`` (packed), float32,
            bfloat16, float16 or float64, any strides, any autograd position.
        mask: the anchors, either a bool/uint8 mask with at most one true element per rollout
            (``[B, T]`` padded; ``[N]`` packed, with ``cu_seqlens``) or int64 indices ``[B]``
            (position in ``T`` padded, row in ``N`` packed; -1 for no anchor).
        rewards: ``[B]`` scores, accuracies or bools; correct means ``rewards > threshold``
            for every numeric dtype, uint8 included (bool: ``True``). NaN counts as incorrect.
        group_ids: int64 ``[B]`` prompt labels in any order. Exactly one of ``group_ids`` and
            ``group_size`` is required. On the device of ``hidden``, or on the CPU for CUDA
            ``hidden`` (as ``dapo.group_ids_from_uids`` makes them): then they are copied to
            the device with ``non_blocking=True``, without waiting for it. Pass them on the
            device under CUDA graph capture, where a copy from host memory is not allowed.
        group_size: rollouts per prompt when groups are contiguous blocks, numbered from this
            call's first row. Refused with ``reference`` (see there).
        loss_type: ``"cosine"`` (mean pairwise ``1 - cos``, default), ``"centroid"``,
            ``"mse"`` or ``"contrastive"`` (InfoNCE, temperature ``tau``).
        reduction: ``"mean"`` over valid groups (0 when none), ``"sum"`` or ``"none"``.
        threshold: correctness threshold for non-bool rewards.
        eps: norm clamp, ``u = h / max(||h||, eps)``.
        tau: contrastive temperature.
        return_stats: also return a dict of 0-d tensors (no host synchronisation):
            ``mean_cosine`` (mean pairwise cosine of correct anchors over groups with at least
            two of them; NaN when there is none), ``valid_groups``, ``anchored_correct``.
        cu_seqlens: ``[B + 1]`` sequence offsets of packed ``hidden`` (needed with a bool mask;
            with indices it checks each anchor lies in its own sequence).
        reference: full-batch group statistics (:func:`hidden_align.group_anchor_stats`,
            merged over micro-batches and all-reduced over ranks), their per-row form
            (:class:`hidden_align.RowReference`, its rows matching this call's rollouts) or a
            mapping of :meth:`RowReference.to_dict` entries (e.g. a verl batch). The result is
            then this micro-batch's *share* of the full-batch loss: the shares of any split of
            the batch (rows reordered, groups across micro-batches and ranks) sum to the
            full-batch value and gradient, for ``cosine``, ``centroid`` and ``mse``;
            ``contrastive`` is refused (``ArgumentError``). ``reduction="mean"`` divides by
            the full-batch number of valid groups; ``"none"`` needs the statistics form and
            gives ``(share per group [G], valid [G])`` in the order of its ``group_ids``.
            ``return_stats`` reports the full-batch values. With statistics, the rollouts'
            groups come from ``group_ids``; with the per-row form from the reference
            (``group_ids``, if given, must agree). ``group_size`` is refused with either
            (``ArgumentError``): it numbers the blocks of this call's rows from 0, the full
            batch's groups only for a micro-batch that starts at row 0; pass
            ``group_ids=torch.arange(start, start + B) // group_size`` instead, ``start``
            being the micro-batch's first row in the full batch (this also serves statistics
            made with ``group_size`` on the whole batch). ``eps`` and ``threshold`` must be
            the statistics'.
            A correct anchored rollout whose group has no correct anchored rollout in the
            reference raises ``ArgumentError`` on the CPU and makes the loss NaN on CUDA.
            Under ``torch.compile`` this path runs eagerly (one graph break).

    Returns:
        The loss (a float32 0-d tensor, float64 for float64 ``hidden``); for ``reduction="none"``
        a tuple ``(per_group_loss [G], valid [G])`` with groups in sorted label order. With
        ``return_stats=True``, ``(result, stats)``.

    A NaN or inf in a participating anchor row makes the loss NaN; no other element of
    ``hidden`` is read. Double backward is not supported and raises.

    Under ``torch.compile`` the loss is a custom op (``torch.ops.hidden_align.align_forward``,
    no graph break) and its gradient w.r.t. ``hidden`` a dense tensor shaped like ``hidden``
    (zeros plus the anchor rows) that autograd adds to the rest of its gradient: same values,
    without the in-place row delivery. There ``reduction="none"`` with ``group_ids`` gives
    results of a data-dependent size (the number of distinct labels).

    CUDA tensors run the CUDA kernels without host synchronisation. Checks that need the data
    (an index out of range, two anchors in one mask row, malformed ``cu_seqlens``) then make the
    loss NaN instead of raising. ``reduction="none"`` with ``group_ids`` reads the number of
    groups on the host.

    Example:
        >>> h = torch.randn(4, 6, 8, requires_grad=True)
        >>> anchors = torch.tensor([2, 3, -1, 5])
        >>> value = loss(h, anchors, torch.tensor([1.0, 1.0, 0.0, 1.0]), group_size=2)
        >>> value.backward()
    """
    group_ids = check_anchor_inputs(hidden, mask, rewards, group_ids, group_size, cu_seqlens)
    return_stats = check_bool("return_stats", return_stats)
    check_choice("loss_type", loss_type, _LOSS_TYPES)
    check_choice("reduction", reduction, _REDUCTIONS)
    if reference is not None:
        return loss_with_reference(
            hidden,
            mask,
            rewards,
            reference,
            group_ids=group_ids,
            group_size=group_size,
            loss_type=loss_type,
            reduction=reduction,
            threshold=as_float("threshold", threshold),
            eps=as_float("eps", eps),
            return_stats=return_stats,
            cu_seqlens=cu_seqlens,
        )
    compiling = torch.compiler.is_compiling()
    if torch.is_grad_enabled() and not compiling:
        attach_delivery_hook(hidden)
    options = (
        loss_type,
        reduction,
        as_float("threshold", threshold),
        as_float("eps", eps),
        as_float("tau", tau),
    )
    # Traced by torch.compile: custom ops instead (the gradient of hidden is then dense).
    apply = _compiled.align_loss if compiling else _AlignLoss.apply
    value, valid, mean_cosine, counts = apply(
        hidden, mask, rewards, group_ids, group_size, cu_seqlens, options
    )
    result = (value, valid) if reduction == "none" else value
    if not return_stats:
        return result
    return result, {
        "mean_cosine": mean_cosine,
        "valid_groups": counts[0],
        "anchored_correct": counts[1],
    }
