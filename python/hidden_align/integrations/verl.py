r"""verl 0.9.1: the fused policy loss and the Hidden-Align term, loaded as verl's external lib.

Importing this module (verl does, in every worker, with
``actor_rollout_ref.model.external_lib=hidden_align.integrations.verl``):

* registers :func:`policy_loss` as verl's policy loss ``hidden_align``
  (``actor_rollout_ref.actor.policy_loss.loss_mode=hidden_align``): verl's
  ``compute_policy_loss_vanilla`` (clip-higher, dual clip, every ``loss_agg_mode``, verl's
  global normalisers from ``config.global_batch_info``) as one fused op,
  :func:`hidden_align.dapo.policy_loss`;
* wraps four methods of verl's FSDP actor engine (``FSDPEngineWithLMHead``; see
  :mod:`hidden_align.integrations.verl_engine`) so that each training micro-batch adds
  ``coef * hidden_align.loss(..., reference=...)``: a forward hook captures the hidden state
  (the final norm by default), anchors come from the response tokens, correctness from the
  batch, and the full-batch group statistics from the actor's no-grad old-log-prob pass
  (merged over micro-batches, all-reduced over data-parallel ranks). The shares of all
  micro-batches and ranks sum to the full-batch loss and gradient. Metrics:
  ``actor/ha_align_loss`` (the full-batch loss; verl sums it over micro-batches),
  ``actor/ha_anchor_cosine`` (mean pairwise cosine of correct anchors over valid groups;
  absent when no group is valid) and ``actor/ha_valid_groups``.

The engine wrap is applied for the verl versions in :data:`SUPPORTED_VERL_VERSIONS` only;
another version raises at import unless ``HIDDEN_ALIGN_ALLOW_UNTESTED_VERL=1`` (then it is
applied with a warning) or the term is off (``HIDDEN_ALIGN_COEF=0``: only the policy loss is
registered). FSDP and FSDP2 actors only (not Megatron, not VeOmni).

Settings (environment variables; give them to the workers with
``+ray_kwargs.ray_init.runtime_env.env_vars.NAME=value``):

=============================  =====================================================  ==========
variable                       meaning                                                default
=============================  =====================================================  ==========
HIDDEN_ALIGN_COEF              weight of the alignment term; 0 turns it off           0.1
HIDDEN_ALIGN_MARKERS           JSON list of marker strings (matched as text under     ["Answer:",
                               the actor's tokenizer) and/or token-id lists           "\\boxed{"]
HIDDEN_ALIGN_LAYER             ``norm`` (final norm), decoder-layer index (negative   norm
                               from the end) or a module name (suffix match)
HIDDEN_ALIGN_LOSS_TYPE         cosine, centroid or mse                                 cosine
HIDDEN_ALIGN_THRESHOLD         correct means correctness value > threshold             0.5
HIDDEN_ALIGN_OFFSET            anchor = marker start + offset                          -1
HIDDEN_ALIGN_OCCURRENCE        last or first marker match in the response              last
HIDDEN_ALIGN_CORRECT           per-rollout correctness (the DAPO reward manager's      acc
                               ``acc``): the batch key; else, in the V1 trainer, the
                               key in every rollout's ``extra_fields`` ->
                               ``reward_extra_info`` (raises where a rollout lacks
                               it); else ``rm_scores`` summed
HIDDEN_ALIGN_FUSED_LOGPROBS    1: verl's fused log-prob path (``use_fused_kernels``,   0
                               torch backend) runs :func:`hidden_align.token_logprobs`
HIDDEN_ALIGN_ALLOW_UNTESTED_VERL  1: apply the engine wrap on another verl version     unset
=============================  =====================================================  ==========

Scale: each rank multiplies its share by verl's ``dp_size`` (FSDP averages gradients over
ranks, as verl's own normalisers assume) and by ``total rows / global_batch_size`` (the number
of mini-batches): each optimiser step then sees an estimate of the whole-batch loss, so
``coef`` means the same for any ``ppo_mini_batch_size``. With one mini-batch the accumulated
gradient is exactly that of ``coef * hidden_align.loss`` on the full batch. With several, the
later mini-batches use statistics of the parameters before the first step, as PPO uses old
log-probs. ``rollout_correction.bypass_mode`` skips the old-log-prob pass: the update then
raises (no statistics).
"""

from __future__ import annotations

import os
import warnings

import torch
import verl
from verl.trainer.ppo.core_algos import register_policy_loss

from .. import dapo
from .verl_settings import Settings

__all__ = ["LOSS_MODE", "SUPPORTED_VERL_VERSIONS", "Settings", "install", "policy_loss"]

SUPPORTED_VERL_VERSIONS = ("0.9.1",)
LOSS_MODE = "hidden_align"
_METRICS = ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower")


def _option(config, name: str, default):
    """``config.<name>`` of an ``ActorConfig``, an OmegaConf ``DictConfig`` or a dict."""
    get = getattr(config, "get", None)
    if callable(get):
        return get(name, default)
    return getattr(config, name, default)


def policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple:
    """verl's ``PolicyLossFn`` ``hidden_align``: ``compute_policy_loss_vanilla`` fused.

    Args:
        old_log_prob: ``[B, T]`` log-probs of the rollout policy.
        log_prob: ``[B, T]`` current log-probs (the only input that gets a gradient). bfloat16
            log-probs of verl's autocast forward with float32 old log-probs and advantages are
            computed in float32, as ``vanilla`` promotes them; the gradient comes back in
            bfloat16. First-order only: a second derivative raises.
        advantages: ``[B, T]`` advantages.
        response_mask: ``[B, T]`` valid response tokens (bool, integer or float).
        loss_agg_mode: one of verl's five aggregation modes.
        config: verl's actor config: ``clip_ratio_low`` / ``clip_ratio_high`` (None: falls back
            to ``clip_ratio``), ``clip_ratio_c`` (default 3.0, as verl) and
            ``global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
            ``loss_scale_factor``, filled by verl's ``ppo_loss`` per micro-batch).
        rollout_is_weights: optional ``[B, T]`` importance weights.

    Returns:
        ``(loss, metrics)``: the 0-d loss and verl's metrics ``actor/pg_clipfrac``,
        ``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` as Python floats (read in one host
        transfer; verl reads three).
    """
    if config is None:
        raise ValueError("config: verl's actor config is required (clip ratios, batch info)")
    clip = _option(config, "clip_ratio", 0.2)
    low = _option(config, "clip_ratio_low", None)
    high = _option(config, "clip_ratio_high", None)
    info = _option(config, "global_batch_info", None) or {}
    dp_size = info.get("dp_size", 1)
    loss, metrics = dapo.policy_loss(
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        clip_ratio_low=clip if low is None else low,
        clip_ratio_high=clip if high is None else high,
        clip_ratio_c=_option(config, "clip_ratio_c", 3.0),
        loss_agg_mode=loss_agg_mode,
        rollout_is_weights=rollout_is_weights,
        batch_num_tokens=info.get("batch_num_tokens"),
        dp_size=1 if dp_size is None else int(dp_size),
        global_batch_size=info.get("global_batch_size"),
        loss_scale_factor=info.get("loss_scale_factor"),
    )
    values = torch.stack([metrics[k] for k in _METRICS]).tolist()
    return loss, {f"actor/{k}": v for k, v in zip(_METRICS, values)}


def install() -> None:
    """Registers :func:`policy_loss` and wraps the FSDP engine (both idempotent); runs at import.

    Raises:
        RuntimeError: on a verl version outside :data:`SUPPORTED_VERL_VERSIONS` with the
            alignment term on, unless ``HIDDEN_ALIGN_ALLOW_UNTESTED_VERL=1``.
        ValueError: a malformed ``HIDDEN_ALIGN_*`` variable.
    """
    register_policy_loss(LOSS_MODE)(policy_loss)
    settings = Settings.from_env()
    version = getattr(verl, "__version__", "unknown")
    if version not in SUPPORTED_VERL_VERSIONS:
        if settings.coef == 0:
            warnings.warn(
                f"hidden_align: verl {version} is untested (supported: "
                f"{', '.join(SUPPORTED_VERL_VERSIONS)}); registered the policy loss only",
                stacklevel=2,
            )
            return
        if os.environ.get("HIDDEN_ALIGN_ALLOW_UNTESTED_VERL", "") != "1":
            raise RuntimeError(
                f"hidden_align: the alignment term patches verl's FSDP engine, written for verl "
                f"{', '.join(SUPPORTED_VERL_VERSIONS)}; this is verl {version}. Install a "
                "supported verl, set HIDDEN_ALIGN_COEF=0 for the policy loss alone, or set "
                "HIDDEN_ALIGN_ALLOW_UNTESTED_VERL=1 to patch anyway"
            )
        warnings.warn(
            f"hidden_align: patching the FSDP engine of untested verl {version}", stacklevel=2
        )
    if settings.fused_logprobs:
        from . import verl_logprobs

        verl_logprobs.patch()
    from . import verl_engine  # imports verl's engine: only where it is patched

    verl_engine.patch()


install()
