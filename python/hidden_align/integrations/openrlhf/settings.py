"""Settings of the alignment term inside OpenRLHF: ``--align.*`` options of the launcher, carried
to every Ray worker as ``HIDDEN_ALIGN_*`` environment variables.

OpenRLHF's argument parser refuses options it does not know, so the launcher takes its own
options out of the command line before OpenRLHF parses the rest; the values travel to the
workers in the Ray job's ``runtime_env`` (:mod:`hidden_align.integrations.openrlhf.worker`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from .._env import TermSettings, parse_choice

__all__ = ["Settings"]

CORRECT_FIELDS = ("scores", "rewards")
SCOPES = ("rollout", "micro_batch")

# field name -> (environment variable, launcher option, help)
_OPTIONS = {
    "coef": (
        "HIDDEN_ALIGN_COEF",
        "--align.coef",
        "weight of the alignment term (0: off; the fused policy loss stays on)",
    ),
    "markers": (
        "HIDDEN_ALIGN_MARKERS",
        "--align.markers",
        "answer markers: strings (matched as text under the actor's tokenizer) or token-id "
        "lists in JSON, e.g. 'Answer:' '\\boxed{' '[15, 16]'",
    ),
    "layer": (
        "HIDDEN_ALIGN_LAYER",
        "--align.layer",
        "'norm' (the last hidden state), a decoder-layer index, or a module name",
    ),
    "loss_type": ("HIDDEN_ALIGN_LOSS_TYPE", "--align.loss_type", "cosine, centroid or mse"),
    "threshold": (
        "HIDDEN_ALIGN_THRESHOLD",
        "--align.threshold",
        "a rollout is correct when its score is above this",
    ),
    "offset": (
        "HIDDEN_ALIGN_OFFSET",
        "--align.offset",
        "anchor = marker start + offset (-1: the token before the marker)",
    ),
    "occurrence": (
        "HIDDEN_ALIGN_OCCURRENCE",
        "--align.occurrence",
        "which marker match of a response: last or first",
    ),
    "correct": (
        "HIDDEN_ALIGN_CORRECT",
        "--align.correct",
        "the Experience field that tells correct rollouts: scores (the reward function's "
        "'scores') or rewards",
    ),
    "scope": (
        "HIDDEN_ALIGN_SCOPE",
        "--align.scope",
        "rollout: the loss of the whole rollout batch, shared out over micro-batches and ranks "
        "(statistics from the experience maker's forward); micro_batch: each micro-batch's "
        "own groups only",
    ),
}


@dataclass(frozen=True)
class Settings(TermSettings):
    """What the OpenRLHF patches do.

    Attributes:
        coef: weight of the alignment term; 0 turns the term, its hook and its statistics off.
        markers: answer markers: strings (matched as text under the actor's tokenizer) and/or
            token-id tuples.
        layer: ``"norm"`` (the final norm's output: the last hidden state), a decoder-layer
            index as a string, or a module name.
        loss_type: ``cosine``, ``centroid`` or ``mse`` (``contrastive`` cannot be shared out
            over micro-batches).
        threshold: a rollout is correct when its score is above it.
        offset: anchor = marker start + offset.
        occurrence: ``last`` or ``first`` match.
        correct: the ``Experience`` field read for correctness, ``scores`` or ``rewards``
            (read in the experience maker, before OpenRLHF's length penalties).
        scope: ``rollout`` (the exact loss of the rollout batch) or ``micro_batch`` (each
            micro-batch's groups alone, no statistics pass).
    """

    correct: str = "scores"
    scope: str = "rollout"

    @classmethod
    def from_env(cls, environ: Mapping | None = None) -> Settings:
        """Settings from ``HIDDEN_ALIGN_*`` variables (defaults where unset); ``ValueError``
        naming the variable on a bad value."""
        env, term = cls._term_from_env(environ)
        return cls(
            **term,
            correct=parse_choice(env, "HIDDEN_ALIGN_CORRECT", cls.correct, CORRECT_FIELDS),
            scope=parse_choice(env, "HIDDEN_ALIGN_SCOPE", cls.scope, SCOPES),
        )

    def to_env(self) -> dict:
        """The ``HIDDEN_ALIGN_*`` variables that :meth:`from_env` reads back as these
        settings."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "markers":
                value = json.dumps([m if isinstance(m, str) else list(m) for m in value])
            out[_OPTIONS[f.name][0]] = str(value)
        return out

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The ``--align.*`` options, defaults from the environment's ``HIDDEN_ALIGN_*``."""
        group = parser.add_argument_group("hidden_align (the alignment term)")
        for name, (_env, option, text) in _OPTIONS.items():
            if name == "markers":
                group.add_argument(option, nargs="+", default=None, help=text)
            else:
                group.add_argument(option, default=None, help=text)

    @classmethod
    def from_arguments(cls, namespace: argparse.Namespace, environ: Mapping | None = None):
        """Settings from parsed ``--align.*`` options over those of the environment."""
        env = dict(os.environ if environ is None else environ)
        for name, (variable, option, _text) in _OPTIONS.items():
            value = getattr(namespace, option[2:])
            if value is None:
                continue
            if name == "markers":
                value = json.dumps([_marker_item(v) for v in value])
            env[variable] = str(value)
        return cls.from_env(env)


def _marker_item(text: str):
    """A command-line marker: a JSON list of ints is token ids, anything else is text."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return text
        if isinstance(value, list):
            return value
    return text
