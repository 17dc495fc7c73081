"""Answer markers as the integrations take them: strings, matched as text under the trainer's
tokenizer (:func:`hidden_align.text_markers`), and token-id lists, matched token for token."""

from __future__ import annotations

import torch

from ..anchors import find_anchors
from ..errors import ArgumentError
from ..text_markers import text_markers


def resolve_markers(items, tokenizer, arg: str):
    """The ``markers`` of :func:`hidden_align.find_anchors` for ``items``.

    Args:
        items: marker strings and/or token-id sequences (lists, tuples or 1-D tensors).
        tokenizer: the tokenizer that spells the strings, or None when every marker is ids.
        arg: the name of the setting, for errors.

    Returns:
        A :class:`hidden_align.TextMarkers` (strings only), a list of id lists (ids only), or a
        list of both kinds (the text markers first).

    Raises:
        ArgumentError: strings without a tokenizer, or a malformed id list.
    """
    strings = [m for m in items if isinstance(m, str)]
    spellings = []
    for m in items:
        if isinstance(m, str):
            continue
        ids = m.tolist() if isinstance(m, torch.Tensor) and m.dim() == 1 else m
        ids = list(ids) if isinstance(ids, (list, tuple)) else ids
        if ids not in spellings:
            spellings.append(ids)
    try:
        if spellings:
            # Checked by the function that will read them, on an empty batch.
            find_anchors(torch.zeros(1, 0, dtype=torch.int64), torch.zeros(1, 0), spellings)
    except ArgumentError as exc:
        raise ArgumentError(f"{arg}: {exc}") from exc
    if not strings:
        return spellings
    if tokenizer is None:
        raise ArgumentError(
            f"{arg}: the marker strings {strings} need the tokenizer, and there is none; give "
            "them as token-id lists instead"
        )
    text = text_markers(tokenizer, strings)
    return [text, *spellings] if spellings else text
