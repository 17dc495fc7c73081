"""A byte-level BPE tokenizer of the ``tokenizers`` library, built in code.

The vocabulary and merges are listed here rather than trained: a trainer breaks ties between
equally frequent pairs in an order that is not guaranteed across runs, and the demo must be
deterministic per seed. Digits are split one per token (as Llama and Qwen do), and the merges
make ``Answer`` and `` Answer`` single tokens, so the marker ``Answer:`` is two tokens spelled
two ways; :func:`hidden_align.marker_token_ids` finds both.
"""

from __future__ import annotations

import hidden_align as ha

from .task import MARKER

PAD, EOS = "<pad>", "<eos>"
_WORD = "Answer"


def _byte_char(c: str) -> str:
    """The character the byte-level pre-tokenizer maps ``c`` to (space -> ``Ġ``)."""
    from tokenizers.pre_tokenizers import ByteLevel

    pieces = ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(c)
    return pieces[0][0]


def build_tokenizer():
    """The demo's tokenizer: ``<pad>`` is id 0, ``<eos>`` id 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = "0123456789+=?: \n" + "".join(sorted(set(_WORD)))
    vocab: dict[str, int] = {PAD: 0, EOS: 1}
    for c in chars:
        vocab.setdefault(_byte_char(c), len(vocab))
    merges = []
    for i in range(2, len(_WORD) + 1):
        merges.append((_WORD[: i - 1], _WORD[i - 1]))
        vocab.setdefault(_WORD[:i], len(vocab))
    space = _byte_char(" ")
    merges.append((space, _WORD))
    vocab[space + _WORD] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD, EOS])
    return tok


class Codec:
    """Text <-> ids for the demo, with the answer marker's spellings."""

    def __init__(self):
        self.tokenizer = build_tokenizer()
        self.pad = self.tokenizer.token_to_id(PAD)
        self.eos = self.tokenizer.token_to_id(EOS)
        self.vocab_size = self.tokenizer.get_vocab_size()
        # Every spelling the tokenizer uses for the marker (start of text, after a space, ...).
        self.markers = ha.marker_token_ids(self.tokenizer, [MARKER])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode_response(self, ids: list[int]) -> tuple[str, bool]:
        """The text of a response up to its end-of-sequence token, and whether it had one."""
        ended = self.eos in ids
        if ended:
            ids = ids[: ids.index(self.eos)]
        ids = [i for i in ids if i != self.pad]
        return self.tokenizer.decode(ids, skip_special_tokens=True), ended
