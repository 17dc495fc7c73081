"""Settings of the verl integration, read from ``HIDDEN_ALIGN_*`` environment variables.

verl's ``ActorConfig`` is a frozen dataclass that refuses keys it does not know, so the
alignment term cannot be configured there; environment variables reach every Ray worker
through ``+ray_kwargs.ray_init.runtime_env.env_vars.<NAME>=<value>``. The table is in the
docstring of :mod:`hidden_align.integrations.verl`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ._env import DEFAULT_MARKERS, parse_choice, parse_flag, parse_markers, parse_number

__all__ = ["Settings"]

_LOSS_TYPES = ("cosine", "centroid", "mse")
_OCCURRENCES = ("last", "first")


@dataclass(frozen=True)
class Settings:
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
        correct_key: batch key with one correctness value per rollout (non-tensor list or
            tensor; a ``[B, T]`` tensor is summed over T); verl's ``rm_scores`` when absent.
        fused_logprobs: route verl's fused log-prob path (``use_fused_kernels=True``, torch
            backend) through :func:`hidden_align.token_logprobs`
            (:mod:`hidden_align.integrations.verl_logprobs`).
    """

    coef: float = 0.1
    markers: tuple = DEFAULT_MARKERS
    layer: str = "norm"
    loss_type: str = "cosine"
    threshold: float = 0.5
    offset: int = -1
    occurrence: str = "last"
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
        env = os.environ if environ is None else environ
        markers = env.get("HIDDEN_ALIGN_MARKERS", "").strip()
        layer = env.get("HIDDEN_ALIGN_LAYER", "").strip() or "norm"
        return cls(
            coef=parse_number(env, "HIDDEN_ALIGN_COEF", cls.coef, float),
            markers=parse_markers(markers) if markers else DEFAULT_MARKERS,
            layer=layer,
            loss_type=parse_choice(env, "HIDDEN_ALIGN_LOSS_TYPE", cls.loss_type, _LOSS_TYPES),
            threshold=parse_number(env, "HIDDEN_ALIGN_THRESHOLD", cls.threshold, float),
            offset=parse_number(env, "HIDDEN_ALIGN_OFFSET", cls.offset, int),
            occurrence=parse_choice(env, "HIDDEN_ALIGN_OCCURRENCE", cls.occurrence, _OCCURRENCES),
            correct_key=env.get("HIDDEN_ALIGN_CORRECT", "").strip() or cls.correct_key,
            fused_logprobs=parse_flag(env, "HIDDEN_ALIGN_FUSED_LOGPROBS"),
        )

    @property
    def layer_index(self) -> int | None:
        """The decoder-layer index when :attr:`layer` is an int, else None."""
        try:
            return int(self.layer)
        except ValueError:
            return None
