"""DAPO token-level computations with verl's semantics: ``hidden_align.dapo``.

Every function matches the verl function it names to float32 rounding; the deliberate
differences are documented where they apply: an empty denominator gives 0 where verl gives NaN,
garbage at masked positions never reaches a result, and a group whose scores are all equal is
constant (advantages exactly 0, dropped by dynamic sampling) where verl's float32 arithmetic
can see a spread of one rounding error (see :func:`group_advantages`).
"""

from __future__ import annotations

import torch

from . import _compiled, _native
from ._args import (
    accumulator,
    as_float,
    check_bool,
    check_choice,
    check_data_device,
    check_int,
    detached,
    group_ids_on,
    require_tensor,
    same_device,
    saveable,
)
from ._backend import stream_of
from ._double_backward import first_order_only
from ._groups import group_ids_from_uids
from .errors import ArgumentError, DtypeError

__all__ = [
    "dynamic_sampling_mask",
    "group_advantages",
    "group_ids_from_uids",
    "overlong_penalty",
    "policy_loss",
]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_NO_DOUBLE_BACKWARD = (
    b"hidden_align.dapo.policy_loss supports first-order gradients only: its gradient cannot be "
    b"differentiated again (double backward through create_graph=True)"
)
_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


def _optional_number(name: str, value) -> float | None:
    """A Python number as float (None stays None)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentError(f"{name}: expected a number, got {type(value).__name__}")
    return float(value)


def _normaliser(name: str, value) -> tuple:
    """``(number, None)`` or ``(None, tensor)``: a one-element tensor is passed as it is and
    read where it lives (on the device by the CUDA kernels: no host synchronisation)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ArgumentError(f"{name}: expected a number or a 1-element tensor")
        check_data_device(name, value)
        return None, value.detach()
    return _optional_number(name, value), None


def group_advantages(
    scores: torch.Tensor,
    *,
    group_ids: torch.Tensor | None = None,
    group_size: int | None = None,
    eps: float = 1e-6,
    norm_by_std: bool = True,
) -> torch.Tensor:
    """GRPO/DAPO outcome advantages, as verl's ``compute_grpo_outcome_advantage``.

    Per group: mean and unbiased (N-1) std of the scores; ``A = (r - mean) / (std + eps)``, or
    ``r - mean`` with ``norm_by_std=False`` (Dr.GRPO). A singleton group has mean 0 and std 1.

    Matches verl to float32 rounding, with one deliberate difference: a group whose scores are
    all equal gets advantages exactly 0. The group sums are float64, in which the sum of n equal
    float32 scores is exact, so the mean is the score and the std 0. verl averages in float32:
    for a score that is not dyadic (``1 - 0.37`` after an overlong penalty) its mean can be off
    by one rounding error, its std is then ~6e-8 instead of 0, and every rollout of the group
    gets the same advantage of about -0.056 (e.g. 6 or 8 rollouts): a bias from rounding, not a
    signal between the rollouts.

    Args:
        scores: ``[B]`` per-rollout scores, or token-level rewards ``[B, T]`` (summed over T).
        group_ids: int64 ``[B]`` prompt labels in any order (see :func:`group_ids_from_uids`),
            on the device of ``scores`` or, for CUDA ``scores``, on the CPU (then copied to the
            device with ``non_blocking=True``; pass them on the device under graph capture).
        group_size: rollouts per prompt for contiguous groups (exactly one of the two).
        eps: added to the std (verl 1e-6; OpenRLHF uses 1e-9, TRL 1e-4).
        norm_by_std: divide by the std (a bool).

    Returns:
        float32 ``[B]`` advantages (verl returns them broadcast over the response mask).

    Example:
        >>> group_advantages(torch.tensor([1.0, -1.0, 1.0, 1.0]), group_size=2)
        tensor([ 0.7071, -0.7071,  0.0000,  0.0000])
    """
    require_tensor("scores", scores)
    check_int("group_size", group_size)
    group_ids = group_ids_on(group_ids, scores)
    same_device(("scores", scores), ("group_ids", group_ids))
    norm_by_std = check_bool("norm_by_std", norm_by_std)
    if torch.compiler.is_compiling():
        eps = as_float("eps", eps)
        return _compiled.group_advantages(scores, group_ids, group_size, eps, norm_by_std)
    out = torch.empty(
        scores.shape[0] if scores.dim() else 0, dtype=torch.float32, device=scores.device
    )
    stream = stream_of(scores)
    # Scratch of the CUDA kernels (unused on the CPU backend): float64 per-rollout sums and the
    # rollouts sorted by group label.
    totals = torch.empty(out.shape[0], dtype=torch.float64, device=scores.device)
    order = torch.empty(2 * out.shape[0], dtype=torch.int32, device=scores.device)
    _native.group_advantages(
        scores.detach(),
        detached(group_ids),
        group_size,
        as_float("eps", eps),
        norm_by_std,
        out,
        totals,
        order,
        stream,
    )
    return out


def dynamic_sampling_mask(
    metric: torch.Tensor, *, group_ids: torch.Tensor | None = None, group_size: int | None = None
) -> torch.Tensor:
    """DAPO dynamic sampling: which rollouts to keep.

    A rollout is kept when its group's metric (e.g. accuracy or score) is not constant, or the
    group has one member, as verl's filter (``std > 0 or len == 1``). A group containing a NaN
    or infinite metric is dropped (``np.std`` is NaN there).

    One deliberate difference: "constant" means all values equal, exactly. verl's ``np.std`` of
    float32 values can be one rounding error above 0 for equal values that are not dyadic (six
    scores of ``1 - 0.37``), and keeps that group, whose advantages are then rounding noise (see
    :func:`group_advantages`); this drops it.

    Args:
        metric: ``[B]`` per-rollout metric, any numeric dtype.
        group_ids: int64 ``[B]`` prompt labels (on the CPU for CUDA ``metric`` they are copied
            over, as in :func:`group_advantages`); or ``group_size`` for contiguous groups.

    Returns:
        bool ``[B]``.

    Example:
        >>> dynamic_sampling_mask(torch.tensor([1.0, 1.0, 0.0, 1.0]), group_size=2)
        tensor([False, False,  True,  True])
    """
    require_tensor("metric", metric)
    check_int("group_size", group_size)
    group_ids = group_ids_on(group_ids, metric)
    same_device(("metric", metric), ("group_ids", group_ids))
    if torch.compiler.is_compiling():
        return _compiled.dynamic_sampling_mask(metric, group_ids, group_size)
    out = torch.empty(
        metric.shape[0] if metric.dim() else 0, dtype=torch.bool, device=metric.device
    )
    # Scratch of the CUDA kernels: the rollouts sorted by group label.
    order = torch.empty(2 * out.shape[0], dtype=torch.int32, device=metric.device)
    _native.dynamic_sampling_mask(
        metric.detach(), detached(group_ids), group_size, out, order, stream_of(metric)
    )
    return out


def overlong_penalty(
    response_lengths: torch.Tensor,
    max_response_length: int,
    buffer_length: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """DAPO overlong reward shaping, added to the score of each rollout.

    ``min(-(L - (max_response_length - buffer_length)) / buffer_length * penalty_factor, 0)``.

    Args:
        response_lengths: ``[B]`` valid response lengths (integer or float).
        max_response_length: the generation limit.
        buffer_length: the soft-punishment interval at its end (> 0).
        penalty_factor: the penalty at the limit.

    Returns:
        float32 ``[B]``, zero or negative; NaN for a NaN length (as verl's ``min``).

    Example:
        >>> overlong_penalty(torch.tensor([10, 18, 20]), 20, 4)
        tensor([ 0.0000, -0.5000, -1.0000])
    """
    require_tensor("response_lengths", response_lengths)
    check_data_device("response_lengths", response_lengths)
    if torch.compiler.is_compiling():
        return _compiled.overlong_penalty(
            response_lengths,
            as_float("max_response_length", max_response_length),
            as_float("buffer_length", buffer_length),
            as_float("penalty_factor", penalty_factor),
        )
    n = response_lengths.shape[0] if response_lengths.dim() else 0
    out = torch.empty(n, dtype=torch.float32, device=response_lengths.device)
    _native.overlong_penalty(
        response_lengths.detach(),
        as_float("max_response_length", max_response_length),
        as_float("buffer_length", buffer_length),
        as_float("penalty_factor", penalty_factor),
        out,
        stream_of(response_lengths),
    )
    return out


def _promoted_dtype(*named: tuple) -> torch.dtype:
    """The widest of the dtypes of the ``(name, tensor)`` pairs (None skipped), as PyTorch
    promotes them; each must be one of the op's four float dtypes. Checked here, before any
    cast: an integer tensor would otherwise be cast to a float one, and a wrong dtype would be
    reported as the promoted dtype rather than the caller's."""
    dtype = None
    for name, t in named:
        if t is None:
            continue
        if t.dtype not in _FLOATS:
            raise DtypeError(
                f"{name}: expected dtype float32 or bfloat16 or float16 or float64, "
                f"got {str(t.dtype).replace('torch.', '')}"
            )
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    first_name, first = named[0]
    wide = [name for name, t in named if t is not None and t.dtype == torch.float64]
    if (
        wide
        and first.dtype != torch.float64
        and not torch.compiler.is_compiling()
        and (first.is_cuda or _native.get_backend() == "cuda-emulated")
    ):
        # The kernels have no float64. Name the argument that widened the loss to it: after
        # the cast the kernels would blame log_prob, which the caller passed in a dtype they
        # take.
        raise DtypeError(
            f"{wide[0]}: expected dtype float32, bfloat16 or float16 with "
            f"{str(first.dtype).replace('torch.', '')} {first_name} (float64 would promote the "
            "loss to float64, which runs on the CPU backend only), got float64"
        )
    return dtype


def _dense_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised row-major buffer shaped like ``t``. The strides are the row-major ones
    of the shape even where a dimension is 0 (``[B, 0]`` gets ``(0, 1)``): torch gives an
    empty tensor strides ``(1, 1)``, which the native side, comparing each stride with the
    product of the sizes after it, refuses as a strided view."""
    strides, step = [], 1
    for n in reversed(t.shape):
        strides.append(step)
        step *= n
    return torch.empty_strided(t.shape, strides[::-1], dtype=t.dtype, device=t.device)


class _PolicyLoss(torch.autograd.Function):
    """Fused clipped policy loss; gradient w.r.t. ``log_prob`` only.

    The forward also writes the per-token derivative (``m w dl/dlogp``) into the buffer that
    becomes the gradient, so the backward is one scaling pass; a second backward
    (``retain_graph=True``) recomputes from the inputs. For bfloat16/float16 that buffer holds
    the derivative rounded to the input dtype, so the gradient is rounded twice (within one
    unit in the last place of the rounded-once value). That gradient is computed outside
    autograd: under ``create_graph=True`` it is exact but refuses a second derivative.
    """

    @staticmethod
    def forward(ctx, log_prob, old_log_prob, advantages, response_mask, weights, clip, agg):
        agg, norm_tensors = agg
        acc = accumulator(log_prob.dtype)
        dev = log_prob.device
        batch = log_prob.shape[0] if log_prob.dim() == 2 else 0
        cols = log_prob.shape[1] if log_prob.dim() == 2 else 0
        loss = torch.empty((), dtype=acc, device=dev)
        metrics = torch.empty(3, dtype=acc, device=dev)
        row_scale = torch.empty(batch, dtype=acc, device=dev)
        factor = None
        if log_prob.requires_grad:
            factor = _dense_like(log_prob)
        w = detached(weights)
        inputs = (log_prob.detach(), old_log_prob.detach(), advantages.detach())
        inputs += (response_mask.detach(), w)
        stream = stream_of(log_prob)
        # Per-(row, column chunk) sums: scratch of the CUDA kernels (unused on the CPU backend).
        chunks = max(1, -(-cols // _native.POLICY_CHUNK))
        partials = torch.empty(batch, chunks, 5, dtype=torch.float64, device=dev)
        _native.policy_loss_forward(
            inputs, clip, *agg, loss, metrics, row_scale, factor, norm_tensors, partials, stream
        )
        saved = (old_log_prob, advantages, response_mask)
        if ctx.needs_input_grad[0]:
            saved = tuple(saveable(t) for t in saved)
        ctx.save_for_backward(log_prob, *saved, row_scale)
        ctx.weights = w
        ctx.clip = clip
        ctx.factor = factor
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        log_prob, old, adv, mask, row_scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        # The saved factor is handed out once; dropping our reference makes it the caller's.
        grad, ctx.factor = ctx.factor, None
        saved = grad is not None
        if not saved:
            grad = _dense_like(log_prob)
        _native.policy_loss_backward(
            (log_prob.detach(), old.detach(), adv.detach(), mask.detach(), ctx.weights),
            ctx.clip,
            row_scale,
            # A one-element tensor: the CUDA kernels read it on the device.
            grad_loss.detach(),
            grad,
            saved,
            stream_of(log_prob),
        )
        (grad,) = first_order_only(_NO_DOUBLE_BACKWARD, (grad,), (log_prob,))
        return grad, None, None, None, None, None, None


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_c: float = 10.0,
    log_ratio_clamp: float | None = 20.0,
    loss_agg_mode: str = "token-mean",
    rollout_is_weights: torch.Tensor | None = None,
    batch_num_tokens=None,
    dp_size: int = 1,
    global_batch_size=None,
    loss_scale_factor=None,
) -> tuple:
    """DAPO's clipped policy loss, as verl's ``compute_policy_loss_vanilla`` + ``agg_loss``.

    One fused pass forward, one fused pass backward (gradient w.r.t. ``log_prob`` only).
    Clip-higher (``clip_ratio_low`` / ``clip_ratio_high``), dual clip (``clip_ratio_c``) and
    every verl aggregation mode, with verl's optional global normalisers.

    Args:
        log_prob: ``[B, T]`` current log-probabilities (float32, bfloat16, float16, float64).
        old_log_prob: ``[B, T]`` log-probabilities of the rollout policy (the same four dtypes).
        advantages: ``[B, T]`` or per rollout ``[B]`` (the same four dtypes).
        response_mask: ``[B, T]``, bool, integer or float.
        clip_ratio_low, clip_ratio_high: the ratio is clipped to ``[1 - low, 1 + high]``.
        clip_ratio_c: dual-clip bound (> 1) on the loss of negative advantages.
        log_ratio_clamp: clamp of ``log_prob - old_log_prob`` before ``exp``; None disables it.
        loss_agg_mode: ``token-mean``, ``token-sum``, ``seq-mean-token-sum``,
            ``seq-mean-token-mean`` or ``seq-mean-token-sum-norm``.
        rollout_is_weights: optional ``[B, T]`` importance weights multiplying each token loss
            (the same four dtypes).
        batch_num_tokens: global valid-token count for ``token-mean`` (required if dp_size > 1).
        dp_size: data-parallel world size.
        global_batch_size: global sequence count for ``seq-mean-*`` (required if dp_size > 1).
        loss_scale_factor: divisor of ``seq-mean-token-sum-norm`` (default T).

    The three normalisers take a number or a one-element tensor; on CUDA a tensor is read by
    the kernel on the device (no host synchronisation; its value is not validated there).

    Mixed dtypes are promoted as PyTorch (hence verl's ``vanilla`` loss) promotes them: the
    loss is computed in the widest of the dtypes of ``log_prob``, ``old_log_prob``,
    ``advantages`` and ``rollout_is_weights`` (bfloat16 with float16 gives float32), and the
    gradient comes back in ``log_prob``'s dtype. bfloat16 log-probs from an autocast forward
    with float32 old log-probs and advantages are thus computed in float32. Integer, bool or
    complex tensors among them raise :class:`DtypeError`.

    Returns:
        ``(loss, metrics)``: a 0-d float32 loss (float64 when the widest dtype is float64) and
        a dict of 0-d tensors ``pg_clipfrac``, ``ppo_kl``, ``pg_clipfrac_lower`` (no
        ``.item()``).

    Masked positions are never read: NaN or inf there cannot reach the loss, the metrics or the
    gradient. Where verl divides by an empty count (no valid token, no non-empty sequence) and
    returns NaN, this returns 0 with a zero gradient.

    The gradient is first-order only: under ``create_graph=True`` it is exact, and
    differentiating it again raises (rather than silently dropping the second-order terms).

    Example:
        >>> lp = torch.randn(2, 5, requires_grad=True)
        >>> loss, m = policy_loss(lp, lp.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 5))
        >>> loss.backward()
    """
    for name, t in (
        ("log_prob", log_prob),
        ("old_log_prob", old_log_prob),
        ("advantages", advantages),
        ("response_mask", response_mask),
    ):
        require_tensor(name, t)
    require_tensor("rollout_is_weights", rollout_is_weights, optional=True)
    same_device(
        ("log_prob", log_prob),
        ("old_log_prob", old_log_prob),
        ("advantages", advantages),
        ("response_mask", response_mask),
        ("rollout_is_weights", rollout_is_weights),
    )
    check_choice("loss_agg_mode", loss_agg_mode, _AGG_MODES)
    check_int("dp_size", dp_size, optional=False)
    clamp = _optional_number("log_ratio_clamp", log_ratio_clamp)
    clip = (
        as_float("clip_ratio_low", clip_ratio_low),
        as_float("clip_ratio_high", clip_ratio_high),
        as_float("clip_ratio_c", clip_ratio_c),
        clamp,
    )
    bnt, bnt_tensor = _normaliser("batch_num_tokens", batch_num_tokens)
    gbs, gbs_tensor = _normaliser("global_batch_size", global_batch_size)
    lsf, lsf_tensor = _normaliser("loss_scale_factor", loss_scale_factor)
    agg = ((loss_agg_mode, bnt, dp_size, gbs, lsf), (bnt_tensor, gbs_tensor, lsf_tensor))
    # The fused op reads one dtype. Casting here, before the eager/compiled fork, gives both
    # paths verl's promotion, and autograd's backward of the cast returns the gradient in
    # log_prob's own dtype (the widest-dtype gradient rounded once).
    dtype = _promoted_dtype(
        ("log_prob", log_prob),
        ("old_log_prob", old_log_prob),
        ("advantages", advantages),
        ("rollout_is_weights", rollout_is_weights),
    )
    log_prob, old_log_prob, advantages = (t.to(dtype) for t in (log_prob, old_log_prob, advantages))
    if rollout_is_weights is not None:
        rollout_is_weights = rollout_is_weights.to(dtype)
    # Traced by torch.compile: custom ops instead of the autograd.Function.
    apply = _compiled.policy_loss if torch.compiler.is_compiling() else _PolicyLoss.apply
    loss, metrics = apply(
        log_prob, old_log_prob, advantages, response_mask, rollout_is_weights, clip, agg
    )
    return loss, {"pg_clipfrac": metrics[0], "ppo_kl": metrics[1], "pg_clipfrac_lower": metrics[2]}
