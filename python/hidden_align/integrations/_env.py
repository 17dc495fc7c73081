"""``HIDDEN_ALIGN_*`` environment variables as the integrations read them (verl's and
OpenRLHF's settings reach their Ray workers this way)."""

from __future__ import annotations

import json
from collections.abc import Mapping

__all__ = ["DEFAULT_MARKERS", "parse_flag", "parse_choice", "parse_markers", "parse_number"]

DEFAULT_MARKERS = ("Answer:", "\\boxed{")


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
