"""The demo: task verifier, tokenizer and marker round trip, and a shortened run."""

from __future__ import annotations

import argparse
import json
import math
import random

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("tqdm")

import torch  # noqa: E402

import hidden_align as ha  # noqa: E402
from hidden_align import demo  # noqa: E402
from hidden_align.demo.task import Problems, place_values, verify, worked_trace  # noqa: E402
from hidden_align.demo.tokenizer import Codec  # noqa: E402


def test_trace_variants_are_correct_and_verify():
    for a, b in [(47, 38), (10, 90), (305, 698), (99, 99)]:
        texts = {worked_trace(a, b, v) for v in range(4)}
        assert len(texts) >= 2 or a % 10 == 0 or b % 10 == 0
        for text in texts:
            assert verify(text, a + b)
            assert not verify(text, a + b + 1)
    assert place_values(408) == [400, 8]


@pytest.mark.parametrize(
    "text, ok",
    [
        (" 47+30=77 77+8=85 Answer: 85", True),
        (" Answer: 84 Answer: 85", True),  # the last marker counts
        (" 47+30=77 77+8=84 Answer: 85", True),  # only the final answer is checked
        (" 47+30=77 77+8=85 Answer: 85 9", False),
        (" 47+30=77 77+8=85", False),
        (" Answer:", False),
        ("", False),
    ],
)
def test_verify(text, ok):
    assert verify(text, 85) is ok


def test_held_out_is_disjoint_from_training():
    problems = Problems(2, 100, seed=3)
    assert len(set(problems.held_out)) == 100
    train = problems.train(2000, random.Random(0))
    assert not set(train) & set(problems.held_out)
    assert Problems(2, 100, seed=3).held_out == problems.held_out


def test_tokenizer_round_trip_and_markers():
    codec = Codec()
    text = worked_trace(47, 38, 1)
    ids = codec.encode(text)
    assert codec.decode_response(ids + [codec.eos, codec.pad, codec.pad]) == (text, True)
    assert codec.decode_response(ids) == (text, False)
    # "Answer:" is two tokens spelled two ways (start of text, after a space).
    assert sorted(map(len, codec.markers)) == [2, 2]
    spaced = next(m for m in codec.markers if codec.tokenizer.decode(m).startswith(" "))
    start = len(ids) - len(codec.encode(" 85")) - len(spaced)
    assert ids[start : start + len(spaced)] == spaced
    row = torch.tensor([ids])
    anchor = ha.find_anchors(row, torch.ones_like(row), codec.markers)
    assert anchor.tolist() == [start - 1]
    assert codec.tokenizer.decode([ids[start - 1]]) == "5"  # the last digit of 77+8=85


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults():
    args = _args()
    assert (args.group_size, args.loss_type, args.seeds, args.device) == (8, "cosine", 1, "cpu")
    assert args.align_weight > 0 and args.steps > 0 and not args.quiet and args.out is None


def test_invalid_arguments_exit_2(capsys):
    assert demo.run(_args("--steps", "0")) == 2
    assert "--steps" in capsys.readouterr().err


def test_short_demo_writes_json(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--steps", "2", "--warmup-steps", "20", "--prompts-per-step", "4"]
    argv += ["--eval-size", "8", "--eval-samples", "2", "--eval-every", "1", "--quiet"]
    argv += ["--seeds", "2", "--out", str(out)]
    assert demo.run(_args(*argv)) == 0
    printed = capsys.readouterr().out
    assert "pass@1 greedy" in printed and "DAPO + align (cosine)" in printed
    assert "anchor cosine in the alignment arm" in printed

    result = json.loads((out / "metrics.json").read_text())
    assert result["config"]["steps"] == 2 and result["config"]["seeds"] == 2
    assert result["config"]["markers"]
    for key in ("hidden_align", "torch", "python"):
        assert result["versions"][key]
    assert result["versions"]["hidden_align"] == ha.__version__
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    for run in result["runs"]:
        assert set(run["arms"]) == {"baseline", "align"}
        for name, arm in run["arms"].items():
            assert [s["step"] for s in arm["steps"]] == [1, 2]
            assert [e["step"] for e in arm["evals"]] == [0, 1, 2]
            for rec in arm["steps"]:
                for key in ("reward", "accuracy", "seconds", "align_seconds", "kept_groups"):
                    assert math.isfinite(rec[key])
                assert -2.0 <= rec["reward"] <= 1.0
                # null where undefined (no group with spread, fewer than two correct anchors)
                for key in ("anchor_cosine", "pg_loss", "align_loss", "eval_pass1_greedy"):
                    assert rec[key] is None or math.isfinite(rec[key])
                if name == "baseline":
                    assert rec["align_seconds"] == 0.0 and rec["align_loss"] is None
            for ev in arm["evals"]:
                assert 0.0 <= ev["pass1_greedy"] <= 1.0 and 0.0 <= ev["pass1_sampled"] <= 1.0
    for arm in ("baseline", "align"):
        assert result["summary"][arm]["seconds_per_step"]["mean"] > 0
    assert isinstance(result["verdict"]["anchor_cosine_rises"], bool)
    plot = out / "curves.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install matplotlib" in printed
    else:
        assert plot.stat().st_size > 0


def test_demo_is_deterministic(capsys):
    argv = ["--steps", "1", "--warmup-steps", "5", "--prompts-per-step", "2"]
    argv += ["--eval-size", "4", "--eval-samples", "2", "--quiet"]
    from hidden_align.demo import runner

    runs = []
    for _ in range(2):
        result = {}
        real = runner.report.build

        def keep(*a, _real=real, _out=result, **k):
            _out.update(_real(*a, **k))
            return _out

        runner.report.build = keep
        try:
            assert demo.run(_args(*argv)) == 0
        finally:
            runner.report.build = real
        for r in result["runs"]:
            for arm in r["arms"].values():
                for s in arm["steps"]:
                    s.pop("seconds"), s.pop("align_seconds")
        runs.append(json.dumps(result["runs"], default=str))
    assert runs[0] == runs[1]
