"""``ha.marker_token_ids`` on BPE tokenizers trained here on a small corpus (nothing downloaded):
a byte-level one (GPT-2 / Qwen style, the space glued to the next word) and a Metaspace one
(Llama / Mistral style, ``▁`` before every word). A spelling is right when the ids of a real text
hold it at the token where the marker's characters start."""

import pytest
import torch
import transformers
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

import hidden_align as ha
from hidden_align.anchors import DEFAULT_BEFORE

WORDS = ["so", "then", "thus", "we", "hence", "get", "is", "the", "value", "result"]
CORPUS = [
    text
    for i, w in enumerate(WORDS)
    for text in (
        f"the {w} is {i}. Answer: {i}",
        f"{w}\nAnswer: {i}",
        f"Answer: {i}{i}",
        f"{w} $\\boxed{{{i}}}$.",
        f"{w} \\boxed{{\\frac{{{i}}}{{2}}}}",
        f"{w}\\boxed{{{i}}}",
    )
]

# Texts in which the default spellings must find each marker.
TEXTS = [
    ("... so the result is 7. Answer: 7", "Answer:"),
    ("Answer: 7", "Answer:"),
    ("foo\nAnswer: 3", "Answer:"),
    ("x\\boxed{2}", "\\boxed{"),
    ("We get \\boxed{42} here.", "\\boxed{"),
]


def train(kind: str) -> Tokenizer:
    if kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet, special, size = pre_tokenizers.ByteLevel.alphabet(), [], 256 + 60
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
        tok.decoder = decoders.Metaspace(prepend_scheme="always")
        alphabet, special, size = [], ["<unk>"], 100
    trainer = trainers.BpeTrainer(
        vocab_size=size, initial_alphabet=alphabet, special_tokens=special, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def tok(request):
    return train(request.param)


@pytest.fixture(scope="module")
def byte_level():
    return train("byte_level")


class EncodeOnly:
    """A tokenizer with ids and no offsets, like a slow ``transformers`` tokenizer."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text, add_special_tokens=True):
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids


def wrap(tok, how):
    if how == "tokenizers":
        return tok
    if how == "transformers":
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    return EncodeOnly(tok)


def marker_token(tok, text, marker):
    """Index of the token holding the first character of the marker's last occurrence."""
    c = text.rindex(marker)
    enc = tok.encode(text, add_special_tokens=False)
    hit = [i for i, (s, e) in enumerate(enc.offsets) if s <= c < e]
    assert len(hit) == 1, (text, enc.tokens)
    return enc.ids, hit[0]


def found_at(tok, text, marker, spellings) -> bool:
    ids, i = marker_token(tok, text, marker)
    return any(ids[i : i + len(s)] == s for s in spellings)


def occurs(ids, seq) -> bool:
    return any(ids[i : i + len(seq)] == seq for i in range(len(ids) - len(seq) + 1))


@pytest.mark.parametrize("how", ["tokenizers", "transformers", "encode-only"])
@pytest.mark.parametrize("text,marker", TEXTS)
def test_spellings_found_in_text(tok, how, text, marker):
    spellings = ha.marker_token_ids(wrap(tok, how), [marker])
    assert found_at(tok, text, marker, spellings), (
        text,
        tok.encode(text).tokens,
        [[tok.id_to_token(i) for i in s] for s in spellings],
    )


@pytest.mark.parametrize("how", ["transformers", "encode-only"])
@pytest.mark.parametrize("extra", [{}, {"before": (*DEFAULT_BEFORE, "x $"), "after": ("", "\\")}])
def test_wrappers_agree(tok, how, extra):
    markers = ["Answer:", "\\boxed{"]
    expected = ha.marker_token_ids(tok, markers, **extra)
    assert ha.marker_token_ids(wrap(tok, how), markers, **extra) == expected


def test_one_encode_is_not_enough(byte_level):
    # After a space the byte-level tokenizer glues the space to the word: "ĠAnswer", not "Answer".
    naive = byte_level.encode("Answer:", add_special_tokens=False).ids
    for text in ["... so the result is 7. Answer: 7", "so\nthen Answer: 2"]:
        ids = byte_level.encode(text, add_special_tokens=False).ids
        assert not occurs(ids, naive), text
    assert found_at(byte_level, "Answer: 7", "Answer:", [naive])
    spellings = ha.marker_token_ids(byte_level, "Answer:")
    assert naive in spellings and len(spellings) >= 2
    tokens = [[byte_level.id_to_token(i) for i in s] for s in spellings]
    assert ["ĠAnswer", ":"] in tokens
    naive = byte_level.encode("\\boxed{", add_special_tokens=False).ids
    assert not found_at(byte_level, "We get \\boxed{42} here.", "\\boxed{", [naive])


def test_metaspace_newline_spelling():
    tok = train("metaspace")
    tokens = [[tok.id_to_token(i) for i in s] for s in ha.marker_token_ids(tok, "Answer:")]
    # "▁Answer:" after a space or at the start (prepended), "\nAnswer:" after a newline.
    assert ["▁Answer:"] in tokens and ["\nAnswer:"] in tokens


def test_glued_token_kept_with_its_context(byte_level):
    # " $\" is one token: the token that straddles the marker's start is kept, so the anchor
    # stays the token before it; that spelling only exists for the context it was made in.
    text = "the value is $\\boxed{5}$"
    assert not found_at(byte_level, text, "\\boxed{", ha.marker_token_ids(byte_level, "\\boxed{"))
    spellings = ha.marker_token_ids(byte_level, "\\boxed{", before=(*DEFAULT_BEFORE, "x $"))
    assert found_at(byte_level, text, "\\boxed{", spellings)
    ids, i = marker_token(byte_level, text, "\\boxed{")
    assert byte_level.id_to_token(ids[i]) == "Ġ$\\"


def test_token_merged_across_the_end(byte_level):
    # "{\" merges the marker's last character with the text after it.
    text = "so \\boxed{\\frac{1}{2}}"
    assert not found_at(byte_level, text, "\\boxed{", ha.marker_token_ids(byte_level, "\\boxed{"))
    spellings = ha.marker_token_ids(byte_level, "\\boxed{", after=("", "\\"))
    assert found_at(byte_level, text, "\\boxed{", spellings)
    tokens = [[byte_level.id_to_token(i) for i in s] for s in spellings]
    assert ["Ġ\\", "boxed", "{\\"] in tokens and ["Ġ\\", "boxed", "{"] in tokens


def test_distinct_in_first_seen_order(byte_level):
    one = ha.marker_token_ids(byte_level, "Answer:")
    two = ha.marker_token_ids(byte_level, "\\boxed{")
    both = ha.marker_token_ids(byte_level, ["Answer:", "\\boxed{", "Answer:"])
    assert both == one + two
    assert len({tuple(s) for s in both}) == len(both)
    # the start of a text and a glued word give the same byte-level spelling: listed once
    assert len(one) < len(DEFAULT_BEFORE)
    assert ha.marker_token_ids(byte_level, ["Answer:"]) == one
    assert all(isinstance(i, int) for s in both for i in s)


@pytest.mark.parametrize("how", ["tokenizers", "transformers", "encode-only"])
def test_no_special_tokens(byte_level, how):
    tok = train("byte_level")
    tok.add_special_tokens(["<s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    assert tok.encode("Answer:").ids[0] == bos
    spellings = ha.marker_token_ids(wrap(tok, how), ["Answer:", "\\boxed{"])
    assert spellings == ha.marker_token_ids(byte_level, ["Answer:", "\\boxed{"])
    assert bos not in {i for s in spellings for i in s}


def test_trimmed_offsets_change_nothing():
    # ByteLevel trim_offsets gives a lone "Ġ" before the marker an empty span on the marker's
    # first character; it is not part of the marker, as without trimming.
    vocab = {t: i for i, t in enumerate("A n s : x Ġ Ċ An Ans".split())}
    tok = Tokenizer(models.BPE(vocab, [("A", "n"), ("An", "s")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    assert tok.encode("x Ans:").offsets[1] == (2, 2)
    trimmed = ha.marker_token_ids(tok, "Ans:")
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    assert ha.marker_token_ids(tok, "Ans:") == trimmed == [[8, 3]]


def test_marker_without_tokens(byte_level):
    tok = train("byte_level")
    tok.normalizer = normalizers.Replace("@", "")
    assert ha.marker_token_ids(tok, ["@Answer:"]) == ha.marker_token_ids(byte_level, "Answer:")
    with pytest.raises(ha.ArgumentError, match="'@' encodes to no token"):
        ha.marker_token_ids(tok, ["Answer:", "@"])


@pytest.mark.parametrize(
    "strings,match",
    [
        ("", "non-empty strings"),
        (["Answer:", ""], "non-empty strings"),
        ([], "non-empty list"),
        ([3], "str elements"),
        (None, "a str or a non-empty list"),
    ],
)
def test_bad_strings(byte_level, strings, match):
    with pytest.raises(ha.ArgumentError, match=match):
        ha.marker_token_ids(byte_level, strings)


def test_bad_tokenizer_and_contexts(byte_level):
    with pytest.raises(ha.ArgumentError, match="tokenizer: expected"):
        ha.marker_token_ids(object(), "Answer:")
    with pytest.raises(ha.ArgumentError, match="before"):
        ha.marker_token_ids(byte_level, "Answer:", before=[])
    with pytest.raises(ha.ArgumentError, match="after"):
        ha.marker_token_ids(byte_level, "Answer:", after=[None])


# ---- markers as text ---------------------------------------------------------------------------

# Texts where the marker merges with its neighbours in ways no default spelling covers.
MERGED = [
    *TEXTS,
    ("the value is $\\boxed{5}$", "\\boxed{"),
    ("so \\boxed{\\frac{1}{2}}", "\\boxed{"),
    ("hence:\\boxed{3}", "\\boxed{"),
    ("thus**Answer:** 4", "Answer:"),
    ("the result.Answer: 9", "Answer:"),
]


@pytest.mark.parametrize("how", ["tokenizers", "transformers"])
def test_text_markers_find_every_merge(tok, how):
    markers = ha.text_markers(wrap(tok, how), ["Answer:", "\\boxed{"])
    for text, marker in MERGED:
        ids, holder = marker_token(tok, text, marker)
        got = ha.find_anchors(torch.tensor([ids]), torch.ones(1, len(ids)), markers)
        assert got.tolist() == [holder - 1], (text, tok.encode(text).tokens)


def test_token_bytes_spell_the_text(tok):
    from hidden_align.text_markers import token_bytes

    spelled = token_bytes(tok)
    unknown = tok.token_to_id("<unk>")
    for text, _ in MERGED:
        ids = tok.encode(text, add_special_tokens=False).ids
        if unknown in ids:
            continue  # a character the small corpus never saw
        # Metaspace prepends a space to the text; byte-level keeps it as it is.
        assert b"".join(spelled[i] for i in ids).decode().lstrip(" ") == text


def test_text_markers_and_spellings_together(byte_level):
    text = ha.text_markers(byte_level, "\\boxed{")
    ids = byte_level.encode("Answer: 3 and \\boxed{3}", add_special_tokens=False).ids
    answer = byte_level.encode("Answer:", add_special_tokens=False).ids
    row, mask = torch.tensor([ids]), torch.ones(1, len(ids))
    boxed_at = int(ha.find_anchors(row, mask, text, offset=0))
    assert ha.find_anchors(row, mask, [text, answer], offset=0).tolist() == [boxed_at]
    first = ha.find_anchors(row, mask, [answer, text], occurrence="first", offset=0)
    assert first.tolist() == [0]
    assert ha.find_anchors(row, mask, [text, answer], occurrence="first").tolist() == [-1]
    assert ha.find_anchors(row, mask, [text], offset=1).tolist() == [boxed_at + 1]
    assert ha.find_anchors(row, mask, [text, answer], offset=2**62).tolist() == [-1]


def test_text_markers_errors(byte_level):
    with pytest.raises(ha.ArgumentError, match="tokenizer: expected"):
        ha.text_markers(object(), "Answer:")
    for bad, match in [("", "non-empty str"), ([], "non-empty list"), ([3], "non-empty str")]:
        with pytest.raises(ha.ArgumentError, match=f"strings: expected .*{match}"):
            ha.text_markers(byte_level, bad)
    text = ha.text_markers(byte_level, "Answer:")
    with pytest.raises(ha.ArgumentError, match="markers: expected at most one TextMarkers"):
        ha.find_anchors(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), [text, text])
    assert repr(text).startswith("TextMarkers(['Answer:']")
