"""``HIDDEN_ALIGN_*`` environment variables as the integrations read them (verl's and
OpenRLHF's settings reach their Ray workers this way)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MARKERS",
    "LOSS_TYPES",
    "OCCURRENCES",
    "TermSettings",
    "parse_choice",
    "parse_flag",
    "parse_markers",
    "parse_number",
]

DEFAULT_MARKERS = ("Answer:", "\\boxed{")
# contrastive is left out: its loss cannot be shared out over micro-batches.
LOSS_TYPES = ("cosine", "centroid", "mse")
OCCURRENCES = ("last", "first")


def parse_markers(text: str) -> tuple:
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


def parse_number(environ: Mapping, name: str, default, kind):
    text = environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name}: expected {kind.__name__}, got {text!r}") from None


def parse_choice(environ: Mapping, name: str, default: str, choices: tuple) -> str:
    value = environ.get(name, "").strip() or default
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def parse_flag(environ: Mapping, name: str) -> bool:
    text = environ.get(name, "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name}: expected 1 or 0, got {environ[name]!r}")


@dataclass(frozen=True)
class TermSettings:
    """The settings of the alignment term that every integration reads the same way; each
    integration's ``Settings`` adds its own. See those for what each means."""

    coef: float = 0.1
    markers: tuple = DEFAULT_MARKERS
    layer: str = "norm"
    loss_type: str = "cosine"
    threshold: float = 0.5
    offset: int = -1
    occurrence: str = "last"

    @classmethod
    def _term_from_env(cls, environ: Mapping | None) -> tuple:
        """``(variables, the shared fields as keyword arguments)``."""
        env = os.environ if environ is None else environ
        markers = env.get("HIDDEN_ALIGN_MARKERS", "").strip()
        return env, {
            "coef": parse_number(env, "HIDDEN_ALIGN_COEF", cls.coef, float),
            "markers": parse_markers(markers) if markers else DEFAULT_MARKERS,
            "layer": env.get("HIDDEN_ALIGN_LAYER", "").strip() or cls.layer,
            "loss_type": parse_choice(env, "HIDDEN_ALIGN_LOSS_TYPE", cls.loss_type, LOSS_TYPES),
            "threshold": parse_number(env, "HIDDEN_ALIGN_THRESHOLD", cls.threshold, float),
            "offset": parse_number(env, "HIDDEN_ALIGN_OFFSET", cls.offset, int),
            "occurrence": parse_choice(env, "HIDDEN_ALIGN_OCCURRENCE", cls.occurrence, OCCURRENCES),
        }

    @property
    def layer_index(self) -> int | None:
        """The decoder-layer index when :attr:`layer` is an int, else None."""
        try:
            return int(self.layer)
        except ValueError:
            return None
