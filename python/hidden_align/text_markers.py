r"""Answer markers as text: anchors found whatever tokens spell the marker.

A BPE tokenizer merges a marker's first or last character with the text around it: under
Qwen2.5's vocabulary ``\boxed{-3}`` ends in the tokens ``boxed`` ``{-``, ``**Answer:**`` in
``Answer`` ``:**`` and ``done.Answer:`` in ``.An`` ``swer`` ``:``. No fixed list of token-id
spellings covers every neighbour, so :func:`text_markers` matches the marker's *text* instead:
it reads the bytes every token of the vocabulary spells (once per tokenizer, cached), and
:func:`hidden_align.find_anchors` finds, per row, the token that holds the marker's first byte,
scanning token ids in Rust (or a CUDA kernel) through a per-token filter, so only the few tokens
a marker can start in are looked at more closely. The anchor is the token before it, as with
token-id spellings.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Sequence

import torch

from . import _native
from .errors import ArgumentError

__all__ = ["TextMarkers", "text_markers", "token_bytes"]


# ---- the bytes of each token -----------------------------------------------------------------


def _byte_level_alphabet() -> dict:
    """The inverse of the byte-level BPE alphabet (GPT-2, Qwen, Llama 3): each byte is shown as
    one printable character, bytes that are not printable as the characters from U+0100 on."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shown, extra = {}, 0
    for b in range(256):
        if b in printable:
            shown[chr(b)] = b
        else:
            shown[chr(256 + extra)] = b
            extra += 1
    return shown


_BYTE_OF = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _component_types(backend) -> set:
    """The types of a ``tokenizers`` decoder and pre-tokenizer, ``Sequence`` parts flattened
    (``{"ByteLevel"}``): a tokenizer built without a decoder still says by its pre-tokenizer
    that its tokens are byte-level."""
    found, todo = set(), []
    for part in (backend.decoder, backend.pre_tokenizer):
        if part is not None:
            todo.append(json.loads(part.__getstate__()))
    while todo:
        d = todo.pop()
        found.add(d.get("type"))
        todo.extend(d.get("decoders") or d.get("pretokenizers") or [])
        if d.get("type") == "Replace" and d.get("pattern", {}).get("String") == "▁":
            found.add("Metaspace")
    return found


def _backend_bytes(backend) -> list:
    """Token bytes of a ``tokenizers.Tokenizer``: exact for byte-level BPE and for
    SentencePiece-style vocabularies (``▁`` for a space, ``<0xNN>`` byte tokens); other
    decoders (WordPiece, ...) through decoding each token alone."""
    kinds = _component_types(backend)
    size = backend.get_vocab_size(with_added_tokens=True)
    added = {}
    getter = getattr(backend, "get_added_tokens_decoder", None)
    if callable(getter):
        added = {i: t.content for i, t in getter().items()}
    out = []
    for i in range(size):
        if i in added:
            out.append(added[i].encode())  # added tokens are stored as plain text
            continue
        tok = backend.id_to_token(i)
        if tok is None:
            out.append(b"")
        elif "ByteLevel" in kinds:
            try:
                out.append(bytes(_BYTE_OF[c] for c in tok))
            except KeyError:
                out.append(tok.encode())
        elif "Metaspace" in kinds:
            fallback = _BYTE_FALLBACK.fullmatch(tok) if "ByteFallback" in kinds else None
            out.append(
                bytes([int(fallback.group(1), 16)]) if fallback else tok.replace("▁", " ").encode()
            )
        else:
            out.append(backend.decode([i], skip_special_tokens=False).encode())
    return out


def token_bytes(tokenizer) -> list:
    r"""The bytes each token id of ``tokenizer`` spells, ``[b"...", ...]`` indexed by id.

    Args:
        tokenizer: a ``transformers`` tokenizer (fast: exact for byte-level BPE such as Qwen,
            Llama 3 and GPT-2, and for SentencePiece-style vocabularies such as Llama 2 and
            Mistral; slow ones and other decoders: each token decoded alone), a
            ``tokenizers.Tokenizer``, a ``tiktoken.Encoding``, or a processor carrying one of
            them as ``.tokenizer``.

    Returns:
        A list of ``bytes``, one per id up to the vocabulary size with added tokens; an id
        that names no token spells ``b""``. Added (special) tokens spell their text.

    Example:
        >>> from tokenizers import Tokenizer, models, pre_tokenizers, decoders
        >>> tok = Tokenizer(models.BPE({"A": 0, "Ġ": 1, "ĠA": 2}, [("Ġ", "A")]))
        >>> tok.decoder = decoders.ByteLevel()
        >>> token_bytes(tok)
        [b'A', b' ', b' A']
    """
    if hasattr(tokenizer, "decode_single_token_bytes") and hasattr(tokenizer, "n_vocab"):
        out = []
        for i in range(tokenizer.n_vocab):  # tiktoken: the bytes themselves
            try:
                out.append(tokenizer.decode_single_token_bytes(i))
            except KeyError:
                out.append(b"")
        return out
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and callable(getattr(tokenizer, "id_to_token", None)):
        backend = tokenizer  # a tokenizers.Tokenizer
    if backend is not None:
        return _backend_bytes(backend)
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and inner is not tokenizer:
        return token_bytes(inner)  # a processor
    if callable(getattr(tokenizer, "convert_ids_to_tokens", None)) and hasattr(
        tokenizer, "__len__"
    ):
        # A slow transformers tokenizer: each token turned into text on its own.
        return [
            tokenizer.convert_tokens_to_string([t]).encode() if t is not None else b""
            for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        ]
    raise ArgumentError(
        "tokenizer: expected a transformers tokenizer, a tokenizers.Tokenizer or a "
        f"tiktoken.Encoding, got {type(tokenizer).__name__}"
    )


def _packed(pieces: list) -> tuple:
    """``pieces`` (bytes) as one uint8 tensor and int64 offsets ``[n + 1]``."""
    offsets = [0]
    for p in pieces:
        offsets.append(offsets[-1] + len(p))
    data = bytearray(b"".join(pieces)) or bytearray(1)  # never a zero-size buffer
    flat = torch.frombuffer(data, dtype=torch.uint8)[: offsets[-1]].clone()
    return flat, torch.tensor(offsets, dtype=torch.int64)


class _Vocab:
    """A vocabulary's bytes, packed once per tokenizer."""

    def __init__(self, pieces: list) -> None:
        self.bytes, self.offsets = _packed(pieces)
        self.size = len(pieces)


# Per tokenizer, the packed vocabulary: reading 150k tokens takes a fraction of a second, and
# the integrations ask for it on every worker start. Tokenizers that cannot be weakly referenced
# (``tokenizers.Tokenizer``) are kept by identity in a small cache of their own.
_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STRONG_VOCABS: dict = {}
_STRONG_LIMIT = 8


def _vocab_of(tokenizer) -> _Vocab:
    try:
        found = _VOCABS.get(tokenizer)
    except TypeError:
        held = _STRONG_VOCABS.get(id(tokenizer))
        found = held[1] if held is not None and held[0] is tokenizer else None
        if found is None:
            found = _Vocab(token_bytes(tokenizer))
            if len(_STRONG_VOCABS) >= _STRONG_LIMIT:
                _STRONG_VOCABS.pop(next(iter(_STRONG_VOCABS)))
            _STRONG_VOCABS[id(tokenizer)] = (tokenizer, found)
        return found
    if found is None:
        found = _Vocab(token_bytes(tokenizer))
        _VOCABS[tokenizer] = found
    return found


# ---- marker texts ----------------------------------------------------------------------------


class TextMarkers:
    r"""Answer markers matched as text over a tokenizer's vocabulary: the ``markers`` of
    :func:`hidden_align.find_anchors`. Build with :func:`text_markers`.

    Attributes:
        strings: the marker texts, in the order given.
        vocab_size: the number of token ids whose bytes are known; any other id spells no
            known text (it neither starts nor continues a match).
    """

    def __init__(self, vocab: _Vocab, strings: list) -> None:
        self.strings = tuple(strings)
        self.vocab_size = vocab.size
        self._vocab = vocab
        self._marker_bytes, self._marker_offsets = _packed([s.encode() for s in strings])
        self._starts = torch.empty(vocab.size, dtype=torch.uint8)
        _native.text_marker_starts(
            vocab.bytes, vocab.offsets, self._marker_bytes, self._marker_offsets, self._starts
        )
        self._on = {}

    def tensors(self, device: torch.device) -> tuple:
        """``(vocab_bytes, vocab_offsets, token_starts, marker_bytes, marker_offsets)`` on
        ``device``, copied there once and kept (a few MB for a 150k vocabulary)."""
        key = str(device)
        found = self._on.get(key)
        if found is None:
            found = tuple(
                t.to(device)
                for t in (
                    self._vocab.bytes,
                    self._vocab.offsets,
                    self._starts,
                    self._marker_bytes,
                    self._marker_offsets,
                )
            )
            self._on[key] = found
        return found

    def __repr__(self) -> str:
        return f"TextMarkers({list(self.strings)!r}, vocab_size={self.vocab_size})"


def text_markers(tokenizer, strings: str | Sequence[str]) -> TextMarkers:
    r"""Answer markers as text, for :func:`hidden_align.find_anchors` under ``tokenizer``.

    A match starts in the token that holds the marker's first character (at any byte of it:
    `` $\`` starts ``\boxed{`` in ``is $\boxed{``) and ends in the token that holds its last
    (``{-`` in ``\boxed{-3}``), every token in between inside the response. The anchor is the
    token before the one holding the first character, as for token-id spellings: so a marker
    is found however the tokenizer merges it with its neighbours, where
    :func:`hidden_align.marker_token_ids` finds only the spellings it was shown.

    Args:
        tokenizer: a ``transformers`` tokenizer, a ``tokenizers.Tokenizer`` or a
            ``tiktoken.Encoding`` (see :func:`token_bytes`). The bytes of its vocabulary are
            read once per tokenizer and cached.
        strings: a marker or a list of markers (non-empty strings), matched as their UTF-8
            bytes.

    Returns:
        :class:`TextMarkers`.

    Example:
        >>> from tokenizers import Tokenizer, models, decoders
        >>> vocab = {t: i for i, t in enumerate(["x", "ĠAns", "wer", ":", "wer:"])}
        >>> tok = Tokenizer(models.WordLevel(vocab, unk_token="x"))
        >>> tok.decoder = decoders.ByteLevel()
        >>> from hidden_align import find_anchors
        >>> markers = text_markers(tok, "Answer:")
        >>> ids = torch.tensor([[0, 1, 2, 3, 0], [0, 0, 1, 4, 0]])
        >>> find_anchors(ids, torch.ones(2, 5), markers)
        tensor([0, 1])
    """
    items = [strings] if isinstance(strings, str) else strings
    if isinstance(items, (bytes, torch.Tensor)) or not isinstance(items, Sequence) or not items:
        raise ArgumentError(f"strings: expected a str or a non-empty list of str, got {strings!r}")
    for s in items:
        if not isinstance(s, str) or not s:
            raise ArgumentError(f"strings: expected non-empty str elements, got {s!r}")
    return TextMarkers(_vocab_of(tokenizer), list(dict.fromkeys(items)))
