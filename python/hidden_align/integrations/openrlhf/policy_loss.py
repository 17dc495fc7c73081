"""OpenRLHF 0.11: a drop-in ``PolicyLoss`` on the fused policy loss, and a hidden-state hook.

``PolicyLoss`` takes the constructor and ``forward`` arguments of OpenRLHF 0.11.1's
``openrlhf.models.loss.PolicyLoss`` and returns what it returns, ``(loss, clip_ratio, ppo_kl,
vllm_kl)``, computed by :func:`hidden_align.dapo.policy_loss` (one fused pass forward, one
backward). OpenRLHF 0.11.2 changed that class (``is_correction_*`` arguments, five return
values); this module follows 0.11.1, whose API 0.11.0 shares.

Deliberate differences from OpenRLHF's class:

* Masked positions are never read. NaN or inf in ``old_log_probs`` or ``rollout_log_probs``
  where ``action_mask`` is false reach neither the loss, the metrics nor the gradient; in
  OpenRLHF they make ``ppo_kl`` and ``vllm_kl`` NaN, and the loss too but with the ``icepop``
  correction (OpenRLHF issue #1240: ``x * mask`` keeps ``NaN * 0 = NaN``).
* An empty denominator (no valid token; in sample mode no non-empty sequence) gives 0 with a
  zero gradient where OpenRLHF gives NaN; so do ``clip_ratio``, ``ppo_kl`` and ``vllm_kl``.
* Invalid arguments raise :mod:`hidden_align.errors` exceptions (``ArgumentError`` is a
  ``ValueError``) when the module is built, where OpenRLHF asserts or fails in ``forward``.
  ``policy_loss_type="gspo"`` is refused (its sequence-level ratio is not this op's math).
* ``action_mask=None`` means every token is valid, in both aggregation modes (OpenRLHF's
  sample mode needs a mask).
* The loss is float32 for float32, bfloat16 and float16 inputs, float64 for float64 (OpenRLHF
  returns the inputs' dtype; its own actor feeds float32). Only ``log_probs`` gets a gradient,
  as in OpenRLHF's training step, where the other inputs are data.
* ``clip_ratio``, and in sample mode each sequence's mean, divide by the token count plus 1e-8
  in the accumulation precision; OpenRLHF adds that 1e-8 to an integer count in float32, where
  it vanishes. The relative difference, 1e-8 / count, shows in float64 only.
* ``advantages`` may also be ``[B]``, one per sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ... import dapo
from ..._args import check_choice, check_int, require_tensor, same_device
from ...errors import ArgumentError, ShapeError

__all__ = ["PolicyLossV0111"]

_IS_TYPES = ("tis", "icepop", "seq-mask-tis")

# OpenRLHF clamps the log-ratio to +-20 before exp, as verl does.
_LOG_RATIO_CLAMP = 20.0

# Without dual clip the op still takes a bound; one above e^20 (the largest ratio after the
# clamp) can never bind, so the loss and gradient are plain PPO's. 1e10 stays finite when it
# multiplies any realistic advantage in float32.
_NO_DUAL_CLIP = 1e10


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentError(f"{name}: expected a number, got {type(value).__name__}")
    return float(value)


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over ``valid``; ``torch.where`` (not a product) so masked garbage cannot leak, and
    0 when nothing is valid."""
    total = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return total.sum() / valid.sum().clamp(min=1)


class PolicyLossV0111(torch.nn.Module):
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

    Example:
        >>> loss_fn = PolicyLoss(clip_eps_high=0.28, dual_clip=3.0)
        >>> lp = torch.randn(2, 5, requires_grad=True)
        >>> loss, clip_ratio, ppo_kl, vllm_kl = loss_fn(
        ...     lp, lp.detach(), torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool)
        ... )
        >>> loss.backward()
        >>> vllm_kl is None
        True
    """

    OPENRLHF_VERSION = "0.11.1"

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
        self.clip_eps_low = _number("clip_eps_low", clip_eps_low)
        self.clip_eps_high = _number("clip_eps_high", clip_eps_high)
        if dual_clip is not None and not _number("dual_clip", dual_clip) > 1.0:
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
        check_choice("vllm_is_correction_type", vllm_is_correction_type, _IS_TYPES)
        self.vllm_is_correction_type = vllm_is_correction_type
        self.enable_vllm_is_correction = bool(enable_vllm_is_correction)
        self.vllm_is_truncated_threshold = vllm_is_truncated_threshold
        self._is_bounds = None
        if self.enable_vllm_is_correction:
            self._is_bounds = self._bounds(vllm_is_truncated_threshold)
        self._clip_c = float(dual_clip) if dual_clip is not None else _NO_DUAL_CLIP

    @staticmethod
    def _bounds(threshold) -> tuple:
        name = "vllm_is_truncated_threshold"
        if not isinstance(threshold, (list, tuple)) or len(threshold) != 2:
            raise ArgumentError(
                f"{name}: expected [low, high] when enable_vllm_is_correction is set, "
                f"got {threshold!r}"
            )
        low, high = (_number(name, v) for v in threshold)
        if not low <= high:
            raise ArgumentError(f"{name}: expected low <= high, got {threshold!r}")
        return low, high

    def extra_repr(self) -> str:
        return (
            f"clip_eps_low={self.clip_eps_low}, clip_eps_high={self.clip_eps_high}, "
            f"dual_clip={self.dual_clip}, token_level_loss={self.token_level_loss}, "
            f"enable_vllm_is_correction={self.enable_vllm_is_correction}"
        )

    def _is_weights(self, old_log_probs, rollout_log_probs, valid) -> tuple:
        """Detached per-token weights (zero at masked positions) and ``vllm_kl``."""
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
            seq_ratio = (log_ratio.sum(-1) / valid.sum(-1).clamp(min=1)).exp()
            keep = (seq_ratio >= low) & (seq_ratio <= high)
            weights = torch.where(keep[:, None], ratio, zero)
        weights = torch.where(valid, weights, zero)
        return weights, _masked_mean(-log_ratio, valid)

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
                with ``enable_vllm_is_correction``.
            dp_size: data-parallel world size; multiplies the loss when the mode's normaliser
                is given (OpenRLHF's compensation for gradient averaging across ranks).
            batch_num_tokens: global action-token count (token mode), a number or a 0-d
                tensor (read where it lives: no host synchronisation); None: this batch's.
            global_batch_size: global non-empty sequence count (sample mode), the same kinds.

        Returns:
            ``(loss, clip_ratio, ppo_kl, vllm_kl)``: the 0-d loss (float32; float64 for
            float64 inputs) with a gradient w.r.t. ``log_probs``; the fraction of valid tokens
            whose ratio was clipped (0-d float32); the mean of ``old_log_probs - log_probs``
            over valid tokens, unclamped (0-d, the inputs' dtype); and with the correction on,
            the mean of ``rollout_log_probs - old_log_probs`` over valid tokens (0-d), else
            None. The three metrics are detached.
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

        weights, vllm_kl = None, None
        if self.enable_vllm_is_correction:
            if rollout_log_probs is None:
                raise ArgumentError(
                    "rollout_log_probs: expected a tensor when enable_vllm_is_correction is set"
                )
            if rollout_log_probs.shape != log_probs.shape:
                raise ShapeError(
                    f"rollout_log_probs: expected shape {list(log_probs.shape)}, "
                    f"got {list(rollout_log_probs.shape)}"
                )
            with torch.no_grad():
                weights, vllm_kl = self._is_weights(old_log_probs, rollout_log_probs, valid)
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
        return loss, clip_ratio, ppo_kl, vllm_kl


class PolicyLossV0112(PolicyLossV0111):
    """Placeholder until OpenRLHF 0.11.2's correction arguments are implemented."""

    OPENRLHF_VERSION = "0.11.2"
