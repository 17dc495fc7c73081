"""Settings of the verl integration, read from ``HIDDEN_ALIGN_*`` environment variables.

verl's ``ActorConfig`` is a frozen dataclass that refuses keys it does not know, so the
alignment term cannot be configured there; environment variables reach every Ray worker
through ``+ray_kwargs.ray_init.runtime_env.env_vars.<NAME>=<value>``. The table is in the
docstring of :mod:`hidden_align.integrations.verl`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Settings"]

_LOSS_TYPES = ("cosine", "centroid", "mse")
_OCCURRENCES = ("last", "first")
DEFAULT_MARKERS = ("Answer:", "\\boxed{")


def _parse_markers(text: str) -> tuple:
    """``HIDDEN_ALIGN_MARKERS``: a JSON list whose items are marker strings (spelled by the
    tokenizer) or token-id lists; a bare string that is not JSON is one marker."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(
            "HIDDEN_ALIGN_MARKERS: expected a JSON list of strings and/or token-id lists, "
            f"got {text!r}"
        )
    out = []
    for item in value:
        if isinstance(item, str) and item:
            out.append(item)
        elif (
            isinstance(item, list)
            and item
            and all(isinstance(i, int) and not isinstance(i, bool) for i in item)
        ):
            out.append(tuple(item))
        else:
            raise ValueError(
                "HIDDEN_ALIGN_MARKERS: each item must be a non-empty string or a non-empty "
                f"list of token ids, got {item!r}"
            )
    return tuple(out)


def _number(environ: Mapping, name: str, default, kind):
    text = environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name}: expected {kind.__name__}, got {text!r}") from None


def _choice(environ: Mapping, name: str, default: str, choices: tuple) -> str:
    value = environ.get(name, "").strip() or default
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def _flag(environ: Mapping, name: str) -> bool:
    text = environ.get(name, "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name}: expected 1 or 0, got {environ[name]!r}")


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
            coef=_number(env, "HIDDEN_ALIGN_COEF", cls.coef, float),
            markers=_parse_markers(markers) if markers else DEFAULT_MARKERS,
            layer=layer,
            loss_type=_choice(env, "HIDDEN_ALIGN_LOSS_TYPE", cls.loss_type, _LOSS_TYPES),
            threshold=_number(env, "HIDDEN_ALIGN_THRESHOLD", cls.threshold, float),
            offset=_number(env, "HIDDEN_ALIGN_OFFSET", cls.offset, int),
            occurrence=_choice(env, "HIDDEN_ALIGN_OCCURRENCE", cls.occurrence, _OCCURRENCES),
            correct_key=env.get("HIDDEN_ALIGN_CORRECT", "").strip() or cls.correct_key,
            fused_logprobs=_flag(env, "HIDDEN_ALIGN_FUSED_LOGPROBS"),
        )

    @property
    def layer_index(self) -> int | None:
        """The decoder-layer index when :attr:`layer` is an int, else None."""
        try:
            return int(self.layer)
        except ValueError:
            return None
