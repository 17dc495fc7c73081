"""OpenRLHF 0.11.1 and 0.11.2: drop-in ``PolicyLoss`` classes on the fused policy loss.

:class:`PolicyLossV0111` and :class:`PolicyLossV0112` take the constructor and ``forward``
arguments of that release's ``openrlhf.models.loss.PolicyLoss`` and return what it returns,
computed by :func:`hidden_align.dapo.policy_loss` (one fused pass forward, one backward):

* 0.11.1 (whose API 0.11.0 shares): the vLLM correction is ``enable_vllm_is_correction`` with
  ``vllm_is_truncated_threshold`` and ``vllm_is_correction_type`` (``tis``, ``icepop``,
  ``seq-mask-tis``); ``forward`` returns ``(loss, clip_ratio, ppo_kl, vllm_kl)``.
* 0.11.2: the correction is ``is_correction_level`` (off, token, seq), ``is_correction_mode``
  (mask, clip), ``is_correction_gating`` (ratio, binary_kl, tv) and ``is_correction_threshold``;
  ``forward`` returns ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``.

Both share everything else (:class:`_FusedPolicyLoss`): the PPO loss, the aggregation, the
normalisers and the metrics. A correction is one detached weight per token that multiplies the
token's loss, which is what the op's ``rollout_is_weights`` does.

Deliberate differences from OpenRLHF's classes (both versions unless noted):

* Masked positions are never read. NaN or inf in ``old_log_probs`` or ``rollout_log_probs``
  where ``action_mask`` is false reach neither the loss, the metrics nor the gradient. In
  OpenRLHF they make ``ppo_kl`` and ``vllm_kl`` NaN (``x * mask`` keeps ``NaN * 0 = NaN``,
  OpenRLHF issue #1240); in 0.11.1 the loss too but with the ``icepop`` correction; in 0.11.2
  with ``is_correction_level="seq"`` the NaN reaches each such sequence's statistic, which then
  fails the band, so the sequence is dropped and counted in ``is_filter_ratio``.
* An empty denominator (no valid token; in sample mode no non-empty sequence) gives 0 with a
  zero gradient where OpenRLHF gives NaN; so do ``clip_ratio``, ``ppo_kl`` and ``vllm_kl``, and
  in 0.11.2 ``is_filter_ratio`` at token level (no valid token) and at sequence level for a
  batch of no sequences. A sequence without valid tokens does count as filtered at sequence
  level, as in OpenRLHF (its mean statistic is ``0 / 0 = NaN``, inside no band): a batch whose
  sequences are all empty gives ``is_filter_ratio`` 1 in both.
* Invalid arguments raise :mod:`hidden_align.errors` exceptions (``ArgumentError`` is a
  ``ValueError``) when the module is built, where OpenRLHF asserts (``dual_clip``), raises its
  own ``ValueError`` (0.11.2's ``is_correction_*`` checks) or fails in ``forward``.
  ``policy_loss_type="gspo"`` is refused (its sequence-level ratio is not this op's math). The
  correction's threshold must be two numbers, low <= high, when the correction is on.
* ``action_mask=None`` means every token is valid, in both aggregation modes (OpenRLHF's
  sample mode needs a mask).
* The loss is float32 for float32, bfloat16 and float16 inputs, float64 for float64 (OpenRLHF
  returns the inputs' dtype; its own actor feeds float32). Only ``log_probs`` gets a gradient,
  as in OpenRLHF's training step, where the other inputs are data. The correction weights are
  cast to the loss's dtype (with float64 ``rollout_log_probs`` and float32 others, OpenRLHF's
  loss would become float64).
* ``clip_ratio``, and in sample mode each sequence's mean, divide by the token count plus 1e-8
  in the accumulation precision; OpenRLHF adds that 1e-8 to an integer count in float32, where
  it vanishes. The relative difference, 1e-8 / count, shows in float64 only.
* ``advantages`` may also be ``[B]``, one per sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ... import dapo
from ..._args import as_float, check_choice, check_int, require_tensor, same_device
from ...errors import ArgumentError, ShapeError

__all__ = ["PolicyLossV0111", "PolicyLossV0112"]

# OpenRLHF clamps the log-ratio to +-20 before exp, as verl does.
_LOG_RATIO_CLAMP = 20.0

# Without dual clip the op still takes a bound; one above e^20 (the largest ratio after the
# clamp) can never bind, so the loss and gradient are plain PPO's. 1e10 stays finite when it
# multiplies any realistic advantage in float32.
_NO_DUAL_CLIP = 1e10

# OpenRLHF 0.11.2 clamps the sampled token's probabilities to [eps, 1 - eps] before the
# divergence gates, which keeps the binary KL's logs finite.
_PROB_EPS = 1e-6


def _band(name: str, threshold, when: str) -> tuple:
    """``threshold`` as ``(low, high)`` floats: a list or tuple of two numbers, low <= high.
    OpenRLHF unpacks it without a check and so would fail in ``forward`` or gate nothing."""
    if not isinstance(threshold, (list, tuple)) or len(threshold) != 2:
        raise ArgumentError(f"{name}: expected [low, high] when {when}, got {threshold!r}")
    low, high = (as_float(name, v) for v in threshold)
    if not low <= high:
        raise ArgumentError(f"{name}: expected low <= high, got {threshold!r}")
    return low, high


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over ``valid``; ``torch.where`` (not a product) so masked garbage cannot leak, and
    0 when nothing is valid."""
    total = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return total.sum() / valid.sum().clamp(min=1)


def _row_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, 1]``: each row's mean over ``valid`` (``values`` already zero where masked), 0 for
    an empty row; OpenRLHF's ``masked_mean(x, mask, dim=-1)``, which is NaN there."""
    return (values.sum(-1) / valid.sum(-1).clamp(min=1))[:, None]


class _FusedPolicyLoss(torch.nn.Module):
    """What the OpenRLHF versions share: the PPO arguments and ``forward``.

    A version class sets :attr:`OPENRLHF_VERSION` and :attr:`_CORRECTION_METRICS` (how many
    values ``forward`` returns after ``ppo_kl``), calls :meth:`_set_ppo_arguments` from its
    constructor and implements :meth:`_correction_enabled` and :meth:`_correction`.
    """

    OPENRLHF_VERSION: str
    _CORRECTION_METRICS: int

    def _set_ppo_arguments(
        self, clip_eps_low, clip_eps_high, dual_clip, token_level_loss, policy_loss_type
    ) -> None:
        self.clip_eps_low = as_float("clip_eps_low", clip_eps_low)
        self.clip_eps_high = as_float("clip_eps_high", clip_eps_high)
        if dual_clip is not None and not as_float("dual_clip", dual_clip) > 1.0:
            raise ArgumentError(f"dual_clip: expected None or a number > 1, got {dual_clip!r}")
        self.dual_clip = dual_clip
        self.token_level_loss = bool(token_level_loss)
        if policy_loss_type == "gspo":
            raise ArgumentError(
                "policy_loss_type: 'gspo' is not supported (its sequence-level ratio is not the "
                "fused token-level loss); use openrlhf.models.loss.PolicyLoss for GSPO"
            )
        check_choice("policy_loss_type", policy_loss_type, ("ppo",))
        self.policy_loss_type = policy_loss_type
        self._clip_c = float(dual_clip) if dual_clip is not None else _NO_DUAL_CLIP

    def _correction_enabled(self) -> bool:
        raise NotImplementedError

    def _correction(self, old_log_probs, rollout_log_probs, valid) -> tuple:
        """``(weights, metrics)``: detached per-token weights, zero at masked positions (in the
        dtype of ``old_log_probs - rollout_log_probs``), and the version's correction metrics
        (``_CORRECTION_METRICS`` 0-d tensors). Called under ``torch.no_grad()``."""
        raise NotImplementedError

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens=None,
        global_batch_size=None,
    ) -> tuple:
        """The policy loss of one micro-batch, with OpenRLHF's arguments and return values.

        Args:
            log_probs: ``[B, A]`` log-probabilities of the actions under the current policy.
            old_log_probs: ``[B, A]`` log-probabilities under the policy that made the batch.
            advantages: ``[B, A]`` (or ``[B]``, ``[B, 1]``) advantages.
            action_mask: ``[B, A]`` bool (or 0/1) mask of the action tokens; None: all valid.
            rollout_log_probs: ``[B, A]`` log-probabilities from the rollout engine, needed
                when the vLLM correction is on.
            dp_size: data-parallel world size; multiplies the loss when the mode's normaliser
                is given (OpenRLHF's compensation for gradient averaging across ranks).
            batch_num_tokens: global action-token count (token mode), a number or a 0-d
                tensor (read where it lives: no host synchronisation); None: this batch's.
            global_batch_size: global non-empty sequence count (sample mode), the same kinds.

        Returns:
            ``(loss, clip_ratio, ppo_kl, vllm_kl)`` (0.11.1) or ``(loss, clip_ratio, ppo_kl,
            vllm_kl, is_filter_ratio)`` (0.11.2): the 0-d loss (float32; float64 for float64
            inputs) with a gradient w.r.t. ``log_probs``; the fraction of valid tokens whose
            ratio was clipped (0-d float32); the mean of ``old_log_probs - log_probs`` over
            valid tokens, unclamped (0-d, the inputs' dtype); with the correction on, the mean
            of ``rollout_log_probs - old_log_probs`` over valid tokens (0-d) and (0.11.2) the
            fraction of tokens or sequences the correction's gate filtered (0-d float32), else
            None for each. The metrics are detached.
        """
        for name, t in (
            ("log_probs", log_probs),
            ("old_log_probs", old_log_probs),
            ("advantages", advantages),
        ):
            require_tensor(name, t)
        require_tensor("action_mask", action_mask, optional=True)
        require_tensor("rollout_log_probs", rollout_log_probs, optional=True)
        same_device(
            ("log_probs", log_probs),
            ("old_log_probs", old_log_probs),
            ("advantages", advantages),
            ("action_mask", action_mask),
            ("rollout_log_probs", rollout_log_probs),
        )
        if log_probs.dim() != 2:
            raise ShapeError(f"log_probs: expected [B, A], got {list(log_probs.shape)}")
        check_int("dp_size", dp_size, optional=False)
        if dp_size < 1:
            raise ArgumentError(f"dp_size: expected an int >= 1, got {dp_size}")

        if action_mask is None:
            valid = torch.ones(log_probs.shape, dtype=torch.bool, device=log_probs.device)
        else:
            valid = action_mask if action_mask.dtype == torch.bool else action_mask != 0
        if valid.shape != log_probs.shape:
            raise ShapeError(
                f"action_mask: expected shape {list(log_probs.shape)} (that of log_probs), "
                f"got {list(valid.shape)}"
            )

        # OpenRLHF computes in torch's promoted dtype of its inputs. dapo.policy_loss promotes
        # floating dtypes alone and refuses integer ones, which OpenRLHF's arithmetic takes
        # (integer advantages), so the promotion over these three stays here.
        dtype = torch.promote_types(log_probs.dtype, old_log_probs.dtype)
        dtype = torch.promote_types(dtype, advantages.dtype)
        adv = advantages.to(dtype)
        if adv.dim() == 2 and adv.shape[1] == 1 and log_probs.shape[1] != 1:
            adv = adv[:, 0]

        weights, correction_metrics = None, (None,) * self._CORRECTION_METRICS
        if self._correction_enabled():
            if rollout_log_probs is None:
                raise ArgumentError(
                    "rollout_log_probs: expected a tensor when the vLLM correction is on"
                )
            if rollout_log_probs.shape != log_probs.shape:
                raise ShapeError(
                    f"rollout_log_probs: expected shape {list(log_probs.shape)}, "
                    f"got {list(rollout_log_probs.shape)}"
                )
            with torch.no_grad():
                weights, correction_metrics = self._correction(
                    old_log_probs.detach(), rollout_log_probs.detach(), valid
                )
            weights = weights.to(dtype)

        # Each mode reads its own normaliser and OpenRLHF ignores dp_size when that one is None;
        # the op refuses dp_size > 1 without it, so it gets 1 there.
        if self.token_level_loss:
            mode, norm = "token-mean", {"batch_num_tokens": batch_num_tokens}
        else:
            mode, norm = "seq-mean-token-mean", {"global_batch_size": global_batch_size}
        scaled = next(iter(norm.values())) is not None
        loss, metrics = dapo.policy_loss(
            log_probs.to(dtype),
            old_log_probs.to(dtype),
            adv,
            valid,
            clip_ratio_low=self.clip_eps_low,
            clip_ratio_high=self.clip_eps_high,
            clip_ratio_c=self._clip_c,
            log_ratio_clamp=_LOG_RATIO_CLAMP,
            loss_agg_mode=mode,
            rollout_is_weights=weights,
            dp_size=dp_size if scaled else 1,
            **norm,
        )
        clip_ratio = metrics["pg_clipfrac"].float()
        # OpenRLHF reports the unclamped log-ratio; the op's ppo_kl is the clamped one.
        with torch.no_grad():
            ppo_kl = _masked_mean(old_log_probs.to(dtype) - log_probs.detach().to(dtype), valid)
        return (loss, clip_ratio, ppo_kl, *correction_metrics)


class PolicyLossV0111(_FusedPolicyLoss):
    """OpenRLHF 0.11.1's ``PolicyLoss``, computed by :func:`hidden_align.dapo.policy_loss`.

    The clipped PPO loss with clip-higher, optional dual clip, the log-ratio clamped to
    +-20, token-level or sample-level aggregation with OpenRLHF's global normalisers, and
    OpenRLHF's vLLM importance-sampling corrections as per-token weights. See the module
    docstring for the deliberate differences.

    Args:
        clip_eps_low: the ratio is clipped below at ``1 - clip_eps_low``.
        clip_eps_high: the ratio is clipped above at ``1 + clip_eps_high``.
        dual_clip: dual-clip bound (> 1) on the loss of negative advantages; None disables it.
        token_level_loss: True: masked sum over the tokens divided by the token count (or
            ``batch_num_tokens``); False: each sequence's token mean, averaged over the non-empty
            sequences (or summed and divided by ``global_batch_size``).
        policy_loss_type: ``"ppo"`` (``"gspo"`` is refused).
        enable_vllm_is_correction: weight each token's loss by the importance ratio between the
            old policy and the rollout engine (``exp(old_log_probs - rollout_log_probs)``).
        vllm_is_truncated_threshold: ``[low, high]`` for the correction.
        vllm_is_correction_type: ``"tis"`` (the ratio clamped to ``[low, high]``), ``"icepop"``
            (tokens whose ratio lies outside ``[low, high]`` get weight 0) or ``"seq-mask-tis"``
            (the ratio, for sequences whose geometric-mean ratio lies in ``[low, high]``, else
            0; OpenRLHF 0.11.1 does not clamp these weights, so neither does this).

    ``forward`` returns ``(loss, clip_ratio, ppo_kl, vllm_kl)``.

    Example:
        >>> loss_fn = PolicyLossV0111(clip_eps_high=0.28, dual_clip=3.0)
        >>> lp = torch.randn(2, 5, requires_grad=True)
        >>> loss, clip_ratio, ppo_kl, vllm_kl = loss_fn(
        ...     lp, lp.detach(), torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool)
        ... )
        >>> loss.backward()
        >>> vllm_kl is None
        True
    """

    OPENRLHF_VERSION = "0.11.1"
    _CORRECTION_METRICS = 1  # vllm_kl

    _IS_TYPES = ("tis", "icepop", "seq-mask-tis")

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        enable_vllm_is_correction: bool = False,
        vllm_is_truncated_threshold: Sequence[float] | None = None,
        vllm_is_correction_type: str = "tis",
    ) -> None:
        super().__init__()
        self._set_ppo_arguments(
            clip_eps_low, clip_eps_high, dual_clip, token_level_loss, policy_loss_type
        )
        check_choice("vllm_is_correction_type", vllm_is_correction_type, self._IS_TYPES)
        self.vllm_is_correction_type = vllm_is_correction_type
        self.enable_vllm_is_correction = bool(enable_vllm_is_correction)
        self.vllm_is_truncated_threshold = vllm_is_truncated_threshold
        self._is_bounds = None
        if self.enable_vllm_is_correction:
            self._is_bounds = _band(
                "vllm_is_truncated_threshold",
                vllm_is_truncated_threshold,
                "enable_vllm_is_correction is set",
            )

    def extra_repr(self) -> str:
        return (
            f"clip_eps_low={self.clip_eps_low}, clip_eps_high={self.clip_eps_high}, "
            f"dual_clip={self.dual_clip}, token_level_loss={self.token_level_loss}, "
            f"enable_vllm_is_correction={self.enable_vllm_is_correction}"
        )

    def _correction_enabled(self) -> bool:
        return self.enable_vllm_is_correction

    def _correction(self, old_log_probs, rollout_log_probs, valid) -> tuple:
        low, high = self._is_bounds
        log_ratio = old_log_probs - rollout_log_probs
        zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
        log_ratio = torch.where(valid, log_ratio, zero)
        ratio = log_ratio.exp()
        if self.vllm_is_correction_type == "tis":
            weights = ratio.clamp(min=low, max=high)
        elif self.vllm_is_correction_type == "icepop":
            weights = torch.where((ratio >= low) & (ratio <= high), ratio, zero)
        else:
            seq_ratio = _row_mean(log_ratio, valid).exp()
            keep = (seq_ratio >= low) & (seq_ratio <= high)
            weights = torch.where(keep, ratio, zero)
        weights = torch.where(valid, weights, zero)
        return weights, (_masked_mean(-log_ratio, valid),)


class PolicyLossV0112(_FusedPolicyLoss):
    """OpenRLHF 0.11.2's ``PolicyLoss``, computed by :func:`hidden_align.dapo.policy_loss`.

    The PPO loss of :class:`PolicyLossV0111`, with 0.11.2's train/rollout mismatch correction:
    a gate reads a statistic per unit (a token, or a sequence's mean over its valid tokens)
    and drops (``mask``) or clamps (``clip``) the units outside ``[low, high]``. See the module
    docstring for the deliberate differences.

    Args:
        clip_eps_low, clip_eps_high, dual_clip, token_level_loss, policy_loss_type: as in
            :class:`PolicyLossV0111`.
        is_correction_level: ``"off"`` (no correction), ``"token"`` (each token is gated) or
            ``"seq"`` (each sequence, by its mean statistic; ``mask`` mode only).
        is_correction_mode: ``"mask"``: units outside the band get weight 0, the others keep
            their per-token ratio ``exp(old_log_probs - rollout_log_probs)``; ``"clip"``
            (token level, ``ratio`` gating only): the weight is the ratio clamped to the band.
        is_correction_gating: the statistic: ``"ratio"`` (the per-token ratio; at sequence
            level its geometric mean), ``"binary_kl"`` or ``"tv"`` (the divergence between the
            sampled token's probabilities ``p`` under the rollout engine and ``q`` under the
            old policy, both clamped to ``[1e-6, 1 - 1e-6]``: ``p log(p/q) + (1-p)
            log((1-p)/(1-q))`` or ``|p - q|``; at sequence level their mean). A divergence takes
            an upper bound only: its low must be <= 0.
        is_correction_threshold: ``(low, high)``, read when the correction is on.

    ``forward`` returns ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``:
    ``is_filter_ratio`` is the fraction of valid tokens (token level) or of all the batch's
    sequences (sequence level; an empty one counts as filtered, as in OpenRLHF) that the gate
    filtered; in ``clip`` mode the tokens whose ratio was clamped.

    Example:
        >>> loss_fn = PolicyLossV0112(is_correction_level="seq", is_correction_threshold=(0.9, 1.1))
        >>> lp = torch.randn(2, 5, requires_grad=True)
        >>> old = lp.detach()
        >>> loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio = loss_fn(
        ...     lp, old, torch.randn(2, 5), rollout_log_probs=old + torch.tensor([[0.0], [1.0]])
        ... )
        >>> loss.backward()
        >>> is_filter_ratio.item()  # the second sequence's ratio, e^-1, is outside [0.9, 1.1]
        0.5
    """

    OPENRLHF_VERSION = "0.11.2"
    _CORRECTION_METRICS = 2  # vllm_kl, is_filter_ratio

    _LEVELS = ("off", "token", "seq")
    _MODES = ("mask", "clip")
    _GATINGS = ("ratio", "binary_kl", "tv")

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: Sequence[float] = (0.5, 5.0),
    ) -> None:
        super().__init__()
        self._set_ppo_arguments(
            clip_eps_low, clip_eps_high, dual_clip, token_level_loss, policy_loss_type
        )
        # OpenRLHF's checks, in its order, with the argument named.
        check_choice("is_correction_level", is_correction_level, self._LEVELS)
        check_choice("is_correction_mode", is_correction_mode, self._MODES)
        check_choice("is_correction_gating", is_correction_gating, self._GATINGS)
        # Only the per-token ratio is a weight that can be clamped; a sequence's statistic or a
        # divergence can only filter. OpenRLHF checks this whether or not the correction is on.
        if is_correction_mode == "clip" and (
            is_correction_level == "seq" or is_correction_gating != "ratio"
        ):
            raise ArgumentError(
                "is_correction_mode: 'clip' requires is_correction_level 'token' (or 'off') and "
                f"is_correction_gating 'ratio', got level {is_correction_level!r} and gating "
                f"{is_correction_gating!r}"
            )
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold
        self._bounds = None
        if is_correction_level != "off":
            self._bounds = _band(
                "is_correction_threshold",
                is_correction_threshold,
                f"is_correction_level is {is_correction_level!r}",
            )
            # A divergence is >= 0 and is bounded from above only: OpenRLHF refuses a low > 0
            # (its default ratio band (0.5, 5.0) would drop every token).
            if is_correction_gating != "ratio" and self._bounds[0] > 0:
                raise ArgumentError(
                    f"is_correction_threshold: is_correction_gating {is_correction_gating!r} "
                    f"takes an upper bound only (low <= 0, e.g. (0.0, delta)), got "
                    f"{is_correction_threshold!r}"
                )

    def extra_repr(self) -> str:
        return (
            f"clip_eps_low={self.clip_eps_low}, clip_eps_high={self.clip_eps_high}, "
            f"dual_clip={self.dual_clip}, token_level_loss={self.token_level_loss}, "
            f"is_correction_level={self.is_correction_level!r}, "
            f"is_correction_mode={self.is_correction_mode!r}, "
            f"is_correction_gating={self.is_correction_gating!r}, "
            f"is_correction_threshold={self.is_correction_threshold!r}"
        )

    def _correction_enabled(self) -> bool:
        return self.is_correction_level != "off"

    def _correction(self, old_log_probs, rollout_log_probs, valid) -> tuple:
        low, high = self._bounds
        seq_level = self.is_correction_level == "seq"
        # log(pi_train / pi_rollout), zero where masked so that garbage there reaches neither a
        # sequence's statistic nor a weight (OpenRLHF multiplies by the mask: NaN * 0 = NaN).
        log_ratio = old_log_probs - rollout_log_probs
        zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
        log_ratio = torch.where(valid, log_ratio, zero)
        token_ratio = log_ratio.exp()
        # The gated statistic per unit, with OpenRLHF's operations in its order and dtypes, so
        # that a unit near a bound lands on the same side.
        if self.is_correction_gating == "ratio":
            stat = (_row_mean(log_ratio, valid) if seq_level else log_ratio).exp()
        else:
            p = rollout_log_probs.exp().clamp(_PROB_EPS, 1 - _PROB_EPS)
            q = old_log_probs.exp().clamp(_PROB_EPS, 1 - _PROB_EPS)
            if self.is_correction_gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:  # tv
                stat = (p - q).abs()
            stat = torch.where(valid, stat, torch.zeros((), dtype=stat.dtype, device=stat.device))
            if seq_level:
                stat = _row_mean(stat, valid)
        if self.is_correction_mode == "clip":  # token level, ratio gating
            weights = stat.clamp(min=low, max=high)
            filtered = (stat < low) | (stat > high)
        else:
            keep = (stat >= low) & (stat <= high)
            if seq_level:
                # OpenRLHF's statistic of an empty sequence is 0 / 0 = NaN, inside no band: it
                # is filtered, and counts in is_filter_ratio. (It has no token to weight.)
                keep = keep & valid.any(-1, keepdim=True)
            weights = torch.where(keep, token_ratio, zero)
            filtered = ~keep
        weights = torch.where(valid, weights, zero)
        if seq_level:  # the fraction of the batch's sequences, empty ones included
            is_filter_ratio = filtered.float().sum() / max(filtered.shape[0], 1)
        else:  # the fraction of the valid tokens
            is_filter_ratio = _masked_mean(filtered.float(), valid)
        vllm_kl = _masked_mean(-log_ratio, valid)
        return weights, (vllm_kl, is_filter_ratio)
