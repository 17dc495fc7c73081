"""The ops as ``torch.library`` custom ops, for code traced by ``torch.compile``.

Eager calls go through :class:`torch.autograd.Function` wrappers that Dynamo cannot trace: the
native calls take tensors through DLPack, and the alignment backward hands autograd a row-only
gradient (:class:`~hidden_align._row_grad.AnchorRowGrad`) finished by a tensor hook. While a
graph is being traced (``torch.compiler.is_compiling()``) the public functions call the ops
below instead. Each is a single opaque node of the graph: it allocates its outputs, calls the
same native function as the eager path and returns them; a fake implementation gives the
shapes and dtypes to the tracer, and the gradients go through backward ops of their own.

What differs from eager: the gradient of the alignment loss w.r.t. ``hidden`` is a dense tensor
shaped like ``hidden`` (zeros plus the anchor rows), which autograd adds to the rest of
``hidden``'s gradient; the policy-loss backward recomputes the per-token derivative from the
inputs instead of keeping it from the forward (an op may not write into a tensor it received),
so a bfloat16/float16 gradient is rounded once rather than twice. Values and gradients are
otherwise the same.

The schemas are written out rather than inferred from annotations, which Python 3.9 cannot
evaluate in their ``X | None`` form.
"""

from __future__ import annotations

import torch

from . import _native
from ._align_native import align_forward
from ._args import accumulator, detached
from ._backend import stream_of
from ._row_grad import _add_rows_

__all__ = [
    "align_loss",
    "dynamic_sampling_mask",
    "group_advantages",
    "overlong_penalty",
    "policy_loss",
]


def _batch(t: torch.Tensor, dims: int = 1) -> int:
    """Rows of a ``dims``-dimensional tensor, 0 for any other rank (the native call then
    raises the shape error, at run time), as the eager wrappers size their outputs."""
    return t.shape[0] if t.dim() == dims else 0


def _rows(t: torch.Tensor) -> int:
    """Rows of a tensor of any rank but 0 (the native call judges the rank)."""
    return t.shape[0] if t.dim() else 0


def _on_kernels(t: torch.Tensor) -> bool:
    """Whether the native ops run the kernel backend for data like ``t`` (CUDA data, or CPU
    data with the emulated kernels selected); the CPU backend otherwise."""
    return t.is_cuda or _native.get_backend() == "cuda-emulated"


# ---------------------------------------------------------------------------------------------
# Alignment loss


@torch.library.custom_op(
    "hidden_align::align_forward",
    mutates_args=(),
    schema="(Tensor hidden, Tensor mask, Tensor rewards, Tensor? group_ids, int? group_size, "
    "Tensor? cu_seqlens, str loss_type, str reduction, float threshold, float eps, float tau) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
    "Tensor, Tensor)",
)
def _align_forward(
    hidden,
    mask,
    rewards,
    group_ids,
    group_size,
    cu_seqlens,
    loss_type,
    reduction,
    threshold,
    eps,
    tau,
):
    """Returns ``(loss, per_group, valid, mean_cosine, counts, rows, groups, correct,
    group_loss, group_valid, work, links)``.

    ``per_group``/``valid`` are the ``[G]`` results of ``reduction="none"`` (empty otherwise);
    ``rows``, ``groups``, ``correct`` are the anchor plan the backward needs; ``group_loss``
    to ``links`` are the ``[B]``-sized buffers the kernel backend's backward reads.
    """
    # The CPU backend writes neither the kernel scratch nor the group entries past G: zeros
    # there keep every output a function of the inputs, as the compilers (and opcheck) assume.
    out = align_forward(
        hidden,
        mask,
        rewards,
        group_ids,
        group_size,
        cu_seqlens,
        loss_type,
        reduction,
        threshold,
        eps,
        tau,
        scratch=torch.empty if _on_kernels(hidden) else torch.zeros,
    )
    num_groups, on_kernels = out.num_groups, out.on_kernels
    value, group_loss, group_valid = out.value, out.group_loss, out.group_valid
    if reduction == "none":
        if on_kernels and group_ids is not None:
            # As in eager: the group count shapes the result, the kernel path's one host read.
            num_groups = int(torch.unique(group_ids).numel())
        # Copies: an op's outputs may not alias one another.
        per_group = group_loss[:num_groups].clone()
        valid = group_valid[:num_groups].clone()
    else:
        per_group = group_loss.new_empty(0)
        valid = group_valid.new_empty(0)
    return (
        value,
        per_group,
        valid,
        out.mean_cosine,
        out.counts,
        out.rows,
        out.groups,
        out.correct,
        group_loss,
        group_valid,
        out.work,
        out.links,
    )


@_align_forward.register_fake
def _align_forward_fake(
    hidden,
    mask,
    rewards,
    group_ids,
    group_size,
    cu_seqlens,
    loss_type,
    reduction,
    threshold,
    eps,
    tau,
):
    batch = _batch(rewards)
    acc = accumulator(hidden.dtype)
    if reduction != "none":
        num_groups = 0
    elif group_ids is None:
        num_groups = batch // group_size if group_size is not None and group_size > 0 else 0
    else:
        # The number of distinct labels: known only once the op has run.
        num_groups = torch.library.get_ctx().new_dynamic_size()

    def new(*shape, dtype):
        return hidden.new_empty(shape, dtype=dtype)

    return (
        new(dtype=acc),
        new(num_groups, dtype=acc),
        new(num_groups, dtype=torch.bool),
        new(dtype=acc),
        new(2, dtype=torch.int64),
        new(batch, dtype=torch.int64),
        new(batch, dtype=torch.int64),
        new(batch, dtype=torch.bool),
        new(batch, dtype=acc),
        new(batch, dtype=torch.bool),
        new(_native.ALIGN_WORK_ROWS, batch, dtype=torch.float32),
        new(_native.ALIGN_LINK_ROWS * batch + 1, dtype=torch.int32),
    )


@torch.library.custom_op(
    "hidden_align::align_backward",
    mutates_args=(),
    schema="(Tensor hidden, Tensor rows, Tensor groups, Tensor correct, Tensor grad, "
    "Tensor loss, Tensor mean_cosine, Tensor counts, Tensor group_loss, Tensor group_valid, "
    "Tensor work, Tensor links, str loss_type, str reduction, float eps, float tau) -> Tensor",
)
def _align_backward(
    hidden,
    rows,
    groups,
    correct,
    grad,
    loss,
    mean_cosine,
    counts,
    group_loss,
    group_valid,
    work,
    links,
    loss_type,
    reduction,
    eps,
    tau,
):
    """The dense gradient w.r.t. ``hidden``: zeros plus the anchor rows. ``grad`` is the
    upstream gradient of the loss (``[G]`` for ``reduction="none"``, 0-d otherwise)."""
    batch = rows.shape[0]
    vals = torch.empty(
        batch, hidden.shape[-1], dtype=accumulator(hidden.dtype), device=hidden.device
    )
    kernels = _on_kernels(hidden)
    if reduction == "none":
        num_groups = grad.shape[0]
    elif kernels:
        # What the kernel forward reports too: B, an upper bound the kernels do not read.
        num_groups = batch
    else:
        # Dense group indices of the CPU plan: every index below the count occurs.
        num_groups = int(groups.max()) + 1 if batch else 0
    # Detached: the forward's loss is among them and requires grad, which DLPack refuses.
    state = tuple(
        detached(t) for t in (group_loss, group_valid, loss, mean_cosine, counts, work, links)
    )
    _native.align_backward(
        hidden.detach(),
        rows,
        groups,
        correct,
        num_groups,
        grad.detach().contiguous(),
        loss_type,
        reduction,
        eps,
        tau,
        vals,
        state if kernels else None,
        torch.empty_like(vals) if kernels else None,
        stream_of(hidden),
    )
    dense = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    return _add_rows_(dense, rows, vals)


@_align_backward.register_fake
def _align_backward_fake(
    hidden,
    rows,
    groups,
    correct,
    grad,
    loss,
    mean_cosine,
    counts,
    group_loss,
    group_valid,
    work,
    links,
    loss_type,
    reduction,
    eps,
    tau,
):
    return hidden.new_empty(hidden.shape)


def _align_setup_context(ctx, inputs, output):
    hidden = inputs[0]
    loss_type, reduction, _, eps, tau = inputs[6:]
    value, per_group, _, mean_cosine, counts, rows, groups, correct = output[:8]
    group_loss, group_valid, work, links = output[8:]
    # The kernel backend's backward reads the forward's buffers; the CPU backend ignores them.
    state = (value, mean_cosine, counts, group_loss, group_valid, work, links)
    ctx.save_for_backward(hidden, rows, groups, correct, *state)
    ctx.options = (loss_type, reduction, eps, tau)
    # Only the loss carries a gradient: the scalar for mean/sum, the per-group values for none.
    unused = value if reduction == "none" else per_group
    ctx.mark_non_differentiable(unused, mean_cosine, group_loss, work)


def _align_backward_rule(ctx, grad_value, grad_per_group, *_unused):
    hidden, rows, groups, correct, *state = ctx.saved_tensors
    loss_type, reduction, eps, tau = ctx.options
    grad = None
    if ctx.needs_input_grad[0]:
        upstream = grad_per_group if reduction == "none" else grad_value
        grad = _align_backward(
            hidden, rows, groups, correct, upstream, *state, loss_type, reduction, eps, tau
        )
    return (grad,) + (None,) * 10


_align_forward.register_autograd(_align_backward_rule, setup_context=_align_setup_context)


def align_loss(hidden, mask, rewards, group_ids, group_size, cu_seqlens, options) -> tuple:
    """``(value, valid, mean_cosine, counts)`` as the eager ``_AlignLoss.apply`` returns them
    (``value`` is ``[G]`` for ``reduction="none"``, ``valid`` is only meaningful there)."""
    loss_type, reduction, threshold, eps, tau = options
    out = _align_forward(
        hidden,
        mask,
        rewards,
        group_ids,
        group_size,
        cu_seqlens,
        loss_type,
        reduction,
        threshold,
        eps,
        tau,
    )
    value, per_group, valid, mean_cosine, counts = out[:5]
    return (per_group if reduction == "none" else value), valid, mean_cosine, counts


# ---------------------------------------------------------------------------------------------
# DAPO


@torch.library.custom_op(
    "hidden_align::group_advantages",
    mutates_args=(),
    schema="(Tensor scores, Tensor? group_ids, int? group_size, float eps, bool norm_by_std) "
    "-> Tensor",
)
def _group_advantages(scores, group_ids, group_size, eps, norm_by_std):
    out = torch.empty(_rows(scores), dtype=torch.float32, device=scores.device)
    totals = torch.empty(out.shape[0], dtype=torch.float64, device=scores.device)
    order = torch.empty(2 * out.shape[0], dtype=torch.int32, device=scores.device)
    _native.group_advantages(
        scores.detach(),
        detached(group_ids),
        group_size,
        eps,
        norm_by_std,
        out,
        totals,
        order,
        stream_of(scores),
    )
    return out


@_group_advantages.register_fake
def _group_advantages_fake(scores, group_ids, group_size, eps, norm_by_std):
    return scores.new_empty(_rows(scores), dtype=torch.float32)


def group_advantages(scores, group_ids, group_size, eps, norm_by_std) -> torch.Tensor:
    # Advantages are constants of the policy loss: no gradient flows into the scores, as in eager.
    return _group_advantages(scores.detach(), detached(group_ids), group_size, eps, norm_by_std)


@torch.library.custom_op(
    "hidden_align::dynamic_sampling_mask",
    mutates_args=(),
    schema="(Tensor metric, Tensor? group_ids, int? group_size) -> Tensor",
)
def _dynamic_sampling_mask(metric, group_ids, group_size):
    out = torch.empty(_rows(metric), dtype=torch.bool, device=metric.device)
    order = torch.empty(2 * out.shape[0], dtype=torch.int32, device=metric.device)
    ids = detached(group_ids)
    _native.dynamic_sampling_mask(metric.detach(), ids, group_size, out, order, stream_of(metric))
    return out


@_dynamic_sampling_mask.register_fake
def _dynamic_sampling_mask_fake(metric, group_ids, group_size):
    return metric.new_empty(_rows(metric), dtype=torch.bool)


def dynamic_sampling_mask(metric, group_ids, group_size) -> torch.Tensor:
    return _dynamic_sampling_mask(metric.detach(), detached(group_ids), group_size)


@torch.library.custom_op(
    "hidden_align::overlong_penalty",
    mutates_args=(),
    schema="(Tensor response_lengths, float max_response_length, float buffer_length, "
    "float penalty_factor) -> Tensor",
)
def _overlong_penalty(response_lengths, max_response_length, buffer_length, penalty_factor):
    lengths = response_lengths
    out = torch.empty(_rows(lengths), dtype=torch.float32, device=lengths.device)
    _native.overlong_penalty(
        lengths.detach(),
        max_response_length,
        buffer_length,
        penalty_factor,
        out,
        stream_of(lengths),
    )
    return out


@_overlong_penalty.register_fake
def _overlong_penalty_fake(response_lengths, max_response_length, buffer_length, penalty_factor):
    lengths = response_lengths
    return lengths.new_empty(_rows(lengths), dtype=torch.float32)


def overlong_penalty(response_lengths, max_response_length, buffer_length, penalty_factor):
    return _overlong_penalty(
        response_lengths.detach(), max_response_length, buffer_length, penalty_factor
    )


def _policy_inputs(*tensors) -> tuple:
    # An op receives its inputs as they are, requires_grad included, which DLPack refuses.
    return tuple(detached(t) for t in tensors)


_POLICY_INPUTS = (
    "Tensor log_prob, Tensor old_log_prob, Tensor advantages, Tensor response_mask, "
    "Tensor? weights, float clip_ratio_low, float clip_ratio_high, float clip_ratio_c, "
    "float? log_ratio_clamp"
)


@torch.library.custom_op(
    "hidden_align::policy_loss_forward",
    mutates_args=(),
    schema=f"({_POLICY_INPUTS}, str loss_agg_mode, float? batch_num_tokens, int dp_size, "
    "float? global_batch_size, float? loss_scale_factor, Tensor? batch_num_tokens_tensor, "
    "Tensor? global_batch_size_tensor, Tensor? loss_scale_factor_tensor) "
    "-> (Tensor, Tensor, Tensor)",
)
def _policy_forward(
    log_prob,
    old_log_prob,
    advantages,
    response_mask,
    weights,
    clip_low,
    clip_high,
    clip_c,
    clamp,
    mode,
    bnt,
    dp_size,
    gbs,
    lsf,
    bnt_tensor,
    gbs_tensor,
    lsf_tensor,
):
    """Returns ``(loss, metrics, row_scale)``; ``row_scale`` (the aggregation's weight of each
    row) is what the backward needs besides the inputs."""
    acc = accumulator(log_prob.dtype)
    dev = log_prob.device
    batch, cols = (log_prob.shape[0], log_prob.shape[1]) if log_prob.dim() == 2 else (0, 0)
    loss = torch.empty((), dtype=acc, device=dev)
    metrics = torch.empty(3, dtype=acc, device=dev)
    row_scale = torch.empty(batch, dtype=acc, device=dev)
    chunks = max(1, -(-cols // _native.POLICY_CHUNK))
    partials = torch.empty(batch, chunks, 5, dtype=torch.float64, device=dev)
    _native.policy_loss_forward(
        _policy_inputs(log_prob, old_log_prob, advantages, response_mask, weights),
        (clip_low, clip_high, clip_c, clamp),
        mode,
        bnt,
        dp_size,
        gbs,
        lsf,
        loss,
        metrics,
        row_scale,
        # No derivative kept for the backward op, which recomputes it (module docstring).
        None,
        (detached(bnt_tensor), detached(gbs_tensor), detached(lsf_tensor)),
        partials,
        stream_of(log_prob),
    )
    return loss, metrics, row_scale


@_policy_forward.register_fake
def _policy_forward_fake(log_prob, *args):
    acc = accumulator(log_prob.dtype)
    batch = _batch(log_prob, 2)
    return (
        log_prob.new_empty((), dtype=acc),
        log_prob.new_empty(3, dtype=acc),
        log_prob.new_empty(batch, dtype=acc),
    )


@torch.library.custom_op(
    "hidden_align::policy_loss_backward",
    mutates_args=(),
    schema=f"({_POLICY_INPUTS}, Tensor row_scale, Tensor grad) -> Tensor",
)
def _policy_backward(
    log_prob,
    old_log_prob,
    advantages,
    response_mask,
    weights,
    clip_low,
    clip_high,
    clip_c,
    clamp,
    row_scale,
    grad,
):
    """The gradient w.r.t. ``log_prob`` (contiguous, ``log_prob``'s dtype)."""
    out = torch.empty_like(log_prob, memory_format=torch.contiguous_format)
    _native.policy_loss_backward(
        _policy_inputs(log_prob, old_log_prob, advantages, response_mask, weights),
        (clip_low, clip_high, clip_c, clamp),
        row_scale.detach(),
        grad.detach(),
        out,
        False,
        stream_of(log_prob),
    )
    return out


@_policy_backward.register_fake
def _policy_backward_fake(log_prob, *args):
    return torch.empty_like(log_prob, memory_format=torch.contiguous_format)


def _policy_setup_context(ctx, inputs, output):
    log_prob, old_log_prob, advantages, response_mask, weights = inputs[:5]
    ctx.clip = tuple(inputs[5:9])
    ctx.save_for_backward(log_prob, old_log_prob, advantages, response_mask, weights, output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _policy_backward_rule(ctx, grad_loss, *_unused):
    log_prob, old_log_prob, advantages, response_mask, weights, row_scale = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _policy_backward(
            log_prob,
            old_log_prob,
            advantages,
            response_mask,
            weights,
            *ctx.clip,
            row_scale,
            grad_loss,
        )
    return (grad,) + (None,) * 16


_policy_forward.register_autograd(_policy_backward_rule, setup_context=_policy_setup_context)


def policy_loss(log_prob, old_log_prob, advantages, response_mask, weights, clip, agg) -> tuple:
    """``(loss, metrics)`` as the eager ``_PolicyLoss.apply`` returns them."""
    (mode, bnt, dp_size, gbs, lsf), norm_tensors = agg
    loss, metrics, _ = _policy_forward(
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        weights,
        *clip,
        mode,
        bnt,
        dp_size,
        gbs,
        lsf,
        *norm_tensors,
    )
    return loss, metrics
