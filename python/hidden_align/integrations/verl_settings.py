"""Settings of the verl integration, read from ``HIDDEN_ALIGN_*`` environment variables.

verl's ``ActorConfig`` is a frozen dataclass that refuses keys it does not know, so the
alignment term cannot be configured there; environment variables reach every Ray worker
through ``+ray_kwargs.ray_init.runtime_env.env_vars.<NAME>=<value>``. The table is in the
docstring of :mod:`hidden_align.integrations.verl`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ._env import TermSettings, parse_flag

__all__ = ["Settings"]


@dataclass(frozen=True)
class Settings(TermSettings):
    """What the engine patch does; :meth:`from_env` reads it.

    Attributes:
        coef: weight of the alignment term (0 turns the term, the hook and the statistics
            pass off; the policy loss is registered regardless).
        markers: answer markers: strings (matched as text under the actor's tokenizer,
            :func:`hidden_align.text_markers`) and/or token-id tuples (matched token for
            token).
        layer: ``"norm"`` (the final norm: the last hidden state), an int as a string (the
            output of decoder layer i; negative counts from the end) or a module name (the
            output of the module whose qualified name is it or ends with ``"." + it``).
        loss_type: ``cosine``, ``centroid`` or ``mse`` (``contrastive`` cannot be split
            across micro-batches).
        threshold: a rollout is correct when its correctness value is above it.
        offset: anchor = marker start + offset (-1: the token before the marker).
        occurrence: ``last`` or ``first`` match of a marker in the response.
        correct_key: the correctness of each rollout: a batch key (non-tensor list or
            tensor; a ``[B, T]`` tensor is summed over T); else, in verl's V1 trainer, this
            key of every rollout's ``extra_fields["reward_extra_info"]`` (a rollout without
            it raises); else verl's ``rm_scores``
            (:func:`hidden_align.integrations.verl_inputs._correctness`).
        fused_logprobs: route verl's fused log-prob path (``use_fused_kernels=True``, torch
            backend) through :func:`hidden_align.token_logprobs`
            (:mod:`hidden_align.integrations.verl_logprobs`).
    """

    correct_key: str = "acc"
    fused_logprobs: bool = False

    @classmethod
    def from_env(cls, environ: Mapping | None = None) -> Settings:
        """Settings from ``HIDDEN_ALIGN_*`` variables (defaults where unset).

        Args:
            environ: the variables; default ``os.environ``.

        Returns:
            A :class:`Settings`. Raises ``ValueError`` naming the variable on a bad value.
        """
        env, term = cls._term_from_env(environ)
        return cls(
            **term,
            correct_key=env.get("HIDDEN_ALIGN_CORRECT", "").strip() or cls.correct_key,
            fused_logprobs=parse_flag(env, "HIDDEN_ALIGN_FUSED_LOGPROBS"),
        )
