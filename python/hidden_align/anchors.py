"""Anchors from tokens and packed rows.

The anchor of a rollout is the token right before the first token of its answer marker
(``Answer:``, ``\\boxed{``). Finding it takes the marker's token ids, which depend on what
precedes the marker (a tokenizer may spell it several ways); and in the packed layout
(verl's ``use_remove_padding``) a position in the padded ``[B, T]`` grid must become a row of the
unpadded ``[N, H]`` hidden states.

* :func:`hidden_align.text_markers` (module :mod:`hidden_align.text_markers`): markers matched
  as text, whatever tokens spell them; the way to find anchors under a real tokenizer.
* :func:`marker_token_ids`: the spellings of a marker under a Hugging Face tokenizer in the
  contexts it is shown, for matching token ids exactly.
* :func:`find_anchors`: per rollout, the anchor next to the marker's last (or first) match.
* :func:`unpadded_rows`: padded positions to rows of ``hidden[attention_mask.bool()]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _native
from ._args import check_choice, check_int, require_tensor, same_device
from ._backend import stream_of
from .errors import ArgumentError, DeviceError, DtypeError, ShapeError
from .text_markers import TextMarkers

__all__ = ["find_anchors", "marker_token_ids", "unpadded_rows"]


# ---- marker spellings ------------------------------------------------------------------------

# What a marker is tried after: the start of a text, a space, a newline, and glued to a word.
# Prefixes carry a word where it matters so that the separator sits between two words, as in
# real text (some tokenizers treat the very start of a text specially).
DEFAULT_BEFORE = ("", "x ", "x\n", "x")
DEFAULT_AFTER = ("",)


def _strings(name: str, value, allow_empty: bool) -> list:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not items:
        raise ArgumentError(f"{name}: expected a str or a non-empty list of str, got {value!r}")
    for s in items:
        if not isinstance(s, str):
            raise ArgumentError(f"{name}: expected str elements, got {type(s).__name__}")
        if not s and not allow_empty:
            raise ArgumentError(f"{name}: expected non-empty strings, got ''")
    return list(items)


def _encoder(tokenizer):
    """``text -> (ids, offsets or None)`` without special tokens; offsets are character spans."""
    if getattr(tokenizer, "is_fast", False) and callable(tokenizer):
        # transformers fast tokenizer (PreTrainedTokenizerFast and its successors).
        def encode(text):
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

        return encode
    if not callable(getattr(tokenizer, "encode", None)):
        raise ArgumentError(
            "tokenizer: expected a tokenizers.Tokenizer or a transformers tokenizer "
            f"(something with .encode), got {type(tokenizer).__name__}"
        )

    def encode(text):
        enc = tokenizer.encode(text, add_special_tokens=False)
        if hasattr(enc, "ids") and hasattr(enc, "offsets"):  # tokenizers.Encoding
            return list(enc.ids), [tuple(o) for o in enc.offsets]
        return [int(i) for i in enc], None  # a slow tokenizer: ids only

    return encode


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _spelling(encode, before: str, marker: str, after: str) -> list[int]:
    r"""The tokens of ``before + marker + after`` that cover the marker's characters.

    A token that straddles a boundary (`` Answer`` after a space, `` $\`` in ``is $\boxed{``,
    ``:\n`` when a newline follows ``Answer:``) is kept. It is the token the model emits as it
    starts (or ends) the marker, so the token before the sequence, the anchor, is the state from
    which the marker is emitted, and the sequence occurs in every text with the same characters
    around the marker. Dropping it instead would match more texts but put the anchor one token
    late, on a token that already spells part of the marker, and only in some rollouts. The
    price: a spelling whose first token takes in part of the preceding word matches only after
    that word, so ``before`` must name the contexts that matter in the data.
    """
    start, stop = len(before), len(before) + len(marker)
    ids, offsets = encode(before + marker + after)
    if offsets is not None:
        # An empty span on the marker's first character is a separator whose offsets were
        # trimmed (a lone "Ġ" under ByteLevel trim_offsets): it precedes the marker, as it does
        # untrimmed.
        hit = [
            i
            for i, (s, e) in enumerate(offsets)
            if (s < stop and e > start) or (s == e and start < s < stop)
        ]
        return ids[hit[0] : hit[-1] + 1] if hit else []
    # Without offsets: the tokens that differ from the encoding of the text before the marker
    # (the first of them may straddle the boundary) up to those that differ from the encoding
    # without the text after it. Exact unless a boundary changes tokens further away.
    lead, _ = encode(before)
    first = _common_prefix(lead, ids)
    if not after:
        return ids[first:]
    head, _ = encode(before + marker)
    last = _common_prefix(head, ids)
    last = len(head) if last == len(head) else last + 1
    return ids[first:last]


def marker_token_ids(
    tokenizer,
    strings: str | Sequence[str],
    *,
    before: str | Sequence[str] = DEFAULT_BEFORE,
    after: str | Sequence[str] = DEFAULT_AFTER,
) -> list[list[int]]:
    r"""The distinct token-id sequences a tokenizer produces for answer markers in context.

    A BPE tokenizer spells ``Answer:`` differently at the start of a text (``Answer``, ``:``),
    after a space (``ĠAnswer``, ``:``), after a newline or glued to a word, so the ids of a
    single ``tokenizer.encode("Answer:")`` miss most occurrences. Each marker is encoded after
    each text of ``before`` and before each of ``after``, without special tokens, and the
    tokens that cover the marker's characters (by the tokenizer's character offsets) form one
    spelling. A token that also covers characters around the marker is kept (the space of
    ``ĠAnswer``, the `` $`` of a `` $\`` token): it is the token the model emits to start the
    marker, so the token before a spelling is the anchor. Tokenizers without offsets (slow
    ``transformers`` tokenizers) are compared with the encodings of the surrounding texts
    instead, which is exact unless a boundary changes the tokens further away from it.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``, a ``transformers`` tokenizer, or anything with
            ``encode(text, add_special_tokens=False)`` returning ids.
        strings: a marker or a list of markers (non-empty strings).
        before: the texts a marker is tried after; by default (``DEFAULT_BEFORE``) the start
            of a text, a space, a newline, and glued to a word (``"x"``). Add the texts that
            merge with the marker's first character in your data: a byte-level tokenizer may
            spell ``is $\boxed{`` with a `` $\`` token, found with ``"x $"`` here.
        after: the texts a marker is tried before; by default nothing. Add the texts that
            merge with its last character (``\`` for ``\boxed{\frac``, a newline after
            ``Answer:`` under GPT-4 or Qwen pre-tokenization).

    Returns:
        A list of distinct spellings, each a list of token ids, in first-seen order (markers in
        order, then ``before``, then ``after``): the ``markers`` of ``find_anchors``.

    Raises:
        ArgumentError: an empty marker or list, a non-string, an object that cannot encode,
            or a marker that encodes to no token.

    Example:
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> vocab = {t: i for i, t in enumerate("A n s : x Ġ Ċ An Ans ĠAns".split())}
        >>> merges = [("A", "n"), ("An", "s"), ("Ġ", "Ans")]
        >>> tok = Tokenizer(models.BPE(vocab, merges))
        >>> tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        >>> marker_token_ids(tok, "Ans:")  # [Ans, :] and [ĠAns, :]
        [[8, 3], [9, 3]]
    """
    markers = _strings("strings", strings, allow_empty=False)
    befores = _strings("before", before, allow_empty=True)
    afters = _strings("after", after, allow_empty=True)
    encode = _encoder(tokenizer)
    seen, out = set(), []
    for marker in markers:
        found = False
        for b in befores:
            for a in afters:
                ids = _spelling(encode, b, marker, a)
                if not ids:
                    continue
                found = True
                if tuple(ids) not in seen:
                    seen.add(tuple(ids))
                    out.append(ids)
        if not found:
            raise ArgumentError(f"strings: {marker!r} encodes to no token in any context")
    return out


# ---- packed rows -----------------------------------------------------------------------------

_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def unpadded_rows(positions: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions in the padded ``[B, T]`` grid to rows of the unpadded ``[N, H]`` tensor.

    The unpadded tensor is ``hidden[attention_mask.bool()]``: the kept tokens in row-major order,
    as flash-attention's ``unpad_input`` and verl's remove-padding build it (any padding side).
    Computed with tensor ops only (a cumulative sum of the mask), on the device of the inputs,
    without synchronising with the host.

    Args:
        positions: int64 ``[B]`` or ``[B, K]`` positions in ``T``; -1 for none.
        attention_mask: ``[B, T]``, bool or integer, nonzero where a token is kept.

    Returns:
        int64 tensor shaped like ``positions``: the row in ``N`` of each position. -1 for -1,
        for any position outside ``[0, T)`` and for a pad position (mask 0): raising there would
        need a host read of the data.

    Example:
        >>> mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
        >>> unpadded_rows(torch.tensor([2, 0]), mask)
        tensor([1, 2])
        >>> unpadded_rows(torch.tensor([[1, 3], [-1, 3]]), mask)
        tensor([[ 0, -1],
                [-1,  5]])
    """
    require_tensor("positions", positions)
    require_tensor("attention_mask", attention_mask)
    # Torch ops alone, no data read: meta tensors give a meta result (shape inference).
    same_device(("attention_mask", attention_mask), ("positions", positions), allow_meta=True)
    if attention_mask.dim() != 2:
        raise ShapeError(
            f"attention_mask: expected a [B, T] tensor, got shape {list(attention_mask.shape)}"
        )
    if attention_mask.dtype not in _MASK_DTYPES:
        raise DtypeError(f"attention_mask: expected bool or integer, got {attention_mask.dtype}")
    if positions.dtype != torch.int64:
        raise DtypeError(f"positions: expected int64, got {positions.dtype}")
    batch, seq = attention_mask.shape
    if positions.dim() not in (1, 2) or positions.shape[0] != batch:
        raise ShapeError(
            f"positions: expected [B] or [B, K] with B = {batch} (the rows of attention_mask), "
            f"got shape {list(positions.shape)}"
        )
    grid = positions if positions.dim() == 2 else positions[:, None]
    if seq == 0:
        return torch.full_like(positions, -1)
    kept = attention_mask != 0
    rows = kept.reshape(-1).cumsum(0, dtype=torch.int64).view(batch, seq) - 1
    rows = rows.masked_fill(~kept, -1)
    inside = (grid >= 0) & (grid < seq)
    out = rows.gather(1, grid.clamp(0, seq - 1)).masked_fill(~inside, -1)
    return out if positions.dim() == 2 else out[:, 0]


# ---- anchors from tokens ---------------------------------------------------------------------


def _marker_tensors(markers) -> tuple:
    """``markers`` as (every spelling's ids one after another, offsets ``[M + 1]``), int64 on
    the CPU; every spelling checked to be a non-empty sequence of integers."""
    if isinstance(markers, (str, bytes, torch.Tensor)) or not isinstance(markers, Sequence):
        raise ArgumentError(
            "markers: expected a list of token-id sequences (lists of ints or 1-D integer "
            f"tensors), got {type(markers).__name__}"
        )
    if not markers:
        raise ArgumentError("markers: expected at least one token-id sequence, got an empty list")
    flat, offsets = [], [0]
    for m, spelling in enumerate(markers):
        if isinstance(spelling, torch.Tensor):
            if spelling.dim() != 1 or spelling.dtype.is_floating_point or spelling.is_complex():
                raise ArgumentError(
                    f"markers[{m}]: expected a 1-D integer tensor, got dtype {spelling.dtype} "
                    f"and shape {list(spelling.shape)}"
                )
            if spelling.device.type == "meta":
                raise DeviceError(
                    f"markers[{m}]: expected a tensor on cpu or cuda, got one on meta (its "
                    "ids are read on the host)"
                )
            ids = spelling.tolist()
        elif isinstance(spelling, Sequence) and not isinstance(spelling, (str, bytes)):
            ids = list(spelling)
        else:
            raise ArgumentError(
                f"markers[{m}]: expected a sequence of token ids (a list of ints or a 1-D "
                f"integer tensor), got {type(spelling).__name__}; wrap a single spelling in a "
                "list"
            )
        if not ids:
            raise ArgumentError(f"markers[{m}]: expected a non-empty token-id sequence, got []")
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int):
                raise ArgumentError(
                    f"markers[{m}]: expected integer token ids, got {type(i).__name__}"
                )
            if not -(2**63) <= i < 2**63:
                raise ArgumentError(f"markers[{m}]: expected ids that fit int64, got {i}")
        flat.extend(ids)
        offsets.append(len(flat))
    return torch.tensor(flat, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)


def _marker_kinds(markers) -> tuple:
    """``(text markers or None, token-id spellings or None)`` of ``markers``: a
    :class:`TextMarkers`, or a list of token-id sequences and at most one :class:`TextMarkers`."""
    if isinstance(markers, TextMarkers):
        return markers, None
    if isinstance(markers, Sequence) and not isinstance(markers, (str, bytes)):
        texts = [m for m in markers if isinstance(m, TextMarkers)]
        if len(texts) > 1:
            raise ArgumentError(
                "markers: expected at most one TextMarkers (give every marker text to one "
                f"text_markers call), got {len(texts)}"
            )
        if texts:
            ids = [m for m in markers if not isinstance(m, TextMarkers)]
            return texts[0], (ids or None)
    return None, markers


def _place(start: torch.Tensor, offset: int, cols: int) -> torch.Tensor:
    """``start + offset`` where ``start >= 0`` and the sum lies in ``[0, cols)``, else -1;
    never forming a sum outside ``[0, cols)``."""
    lo, hi = max(0, -offset), min(cols - offset, 2**63 - 1)  # valid starts: lo <= s < hi
    if hi <= lo:
        return torch.full_like(start, -1)
    valid = (start >= lo) & (start < hi)
    return torch.where(valid, start.clamp(lo, hi - 1) + offset, -1)


def _native_find(token_ids, response_mask, text, spellings, occurrence, offset, out):
    """One native scan, over marker texts or over token-id spellings (``_marker_tensors``)."""
    stream = stream_of(token_ids)
    if text is not None:
        tensors = text.tensors(token_ids.device)
        _native.find_text_anchors(
            token_ids, response_mask, *tensors, occurrence, offset, out, stream
        )
        return
    flat, offsets = spellings
    if token_ids.device.type != "cpu":
        flat = flat.to(token_ids.device, non_blocking=True)
        offsets = offsets.to(token_ids.device, non_blocking=True)
    _native.find_anchors(token_ids, response_mask, flat, offsets, occurrence, offset, out, stream)


def find_anchors(
    token_ids: torch.Tensor,
    response_mask: torch.Tensor,
    markers,
    *,
    occurrence: str = "last",
    offset: int = -1,
) -> torch.Tensor:
    """Per rollout, the anchor position next to its answer marker, found from the token ids.

    A match is a spelling of the marker whose tokens all lie inside the response
    (``response_mask`` nonzero), or, for markers given as text (:func:`hidden_align.text_markers`,
    the way under a real tokenizer), a run of response tokens whose bytes hold the marker's
    text, starting at the token that holds its first character. ``occurrence="last"`` takes
    the match with the greatest start over all markers, ``"first"`` the smallest.
    The result is ``start + offset`` in ``token_ids``' own coordinates: ``offset=-1`` (default)
    is the token right before the marker, the paper's anchor; ``0`` is the marker's first
    token; any int is allowed (the paper ablates the anchor position). A rollout without a
    match, or whose ``start + offset`` falls outside ``[0, T)``, gets -1 (no anchor: it takes
    no part in :func:`hidden_align.loss`).

    One fused pass: Rust on the CPU (rows in parallel for large batches), a CUDA kernel on the
    GPU (a block per row, no host synchronisation); each row is scanned from the end for
    ``"last"`` (from the start for ``"first"``) and the scan stops at the first match. The
    kernel takes rows of up to 2**31 - 1 tokens (``ShapeError`` beyond); the CPU any length.

    Args:
        token_ids: int64 or int32 ``[B, T]`` (prompt + response, or the response alone), any
            strides.
        response_mask: ``[B, T]`` bool, integer or float (nonzero: a response token), on the
            device of ``token_ids``.
        markers: a :class:`~hidden_align.TextMarkers` (marker texts under a tokenizer, from
            :func:`hidden_align.text_markers`), or a list of token-id sequences (lists of ints
            or 1-D integer tensors, any lengths: spellings matched token for token, see
            :func:`marker_token_ids`; read on the host), which may also hold one
            ``TextMarkers``: then the earliest or latest match of either kind wins.
        occurrence: ``"last"`` (default) or ``"first"``.
        offset: the anchor's distance from the match start.

    Returns:
        int64 ``[B]`` on the device of ``token_ids``: positions in ``[0, T)``, -1 for none. For
        the packed layout map them with :func:`unpadded_rows`.

    Example:
        >>> ids = torch.tensor([[5, 9, 7, 8, 1], [7, 8, 3, 3, 3]])
        >>> response = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
        >>> find_anchors(ids, response, [[7, 8]])
        tensor([ 1, -1])
    """
    require_tensor("token_ids", token_ids)
    require_tensor("response_mask", response_mask)
    same_device(("token_ids", token_ids), ("response_mask", response_mask))
    if token_ids.dtype not in (torch.int64, torch.int32):
        raise DtypeError(f"token_ids: expected dtype int64 or int32, got {token_ids.dtype}")
    if response_mask.dtype in (torch.int8, torch.int16):
        # The native side reads bool, uint8, int32, int64 and floats; narrower ints as flags.
        response_mask = response_mask != 0
    check_choice("occurrence", occurrence, ("last", "first"))
    check_int("offset", offset, optional=False)
    if not -(2**63) <= offset < 2**63:
        raise ArgumentError(f"offset: expected an int that fits int64, got {offset}")
    text, spellings = _marker_kinds(markers)
    if text is None or spellings is not None:
        spellings = _marker_tensors(spellings)  # checked: anything but TextMarkers lands here
    token_ids, response_mask = token_ids.detach(), response_mask.detach()
    rows = token_ids.shape[0] if token_ids.dim() else 0
    out = torch.empty(rows, dtype=torch.int64, device=token_ids.device)
    if text is None or spellings is None:  # one kind of marker
        _native_find(token_ids, response_mask, text, spellings, occurrence, offset, out)
        return out
    # Both kinds: each scan gives its match start; the winner is shifted by the offset here.
    other = torch.empty_like(out)
    _native_find(token_ids, response_mask, text, None, occurrence, 0, out)
    _native_find(token_ids, response_mask, None, spellings, occurrence, 0, other)
    if occurrence == "last":
        start = torch.maximum(out, other)
    else:
        start = torch.where((out < 0) | ((other >= 0) & (other < out)), other, out)
    return _place(start, offset, token_ids.shape[1])
