"""``HiddenAlignGRPOTrainer`` on two processes, launched as users launch TRL:
``torchrun --nproc_per_node 2`` with ``GRPOConfig(use_cpu=True)`` (accelerate's ``MULTI_CPU``,
gloo), two optimiser steps in TRL's own loop (``tests/trl_ranks.py``), against one process
over the same generation batches.

* the two runs generate the same rows, and the statistics of each generation batch are
  identical on both ranks and equal the one-process run's;
  (statistics from a pass of their own, from the loss's own forward, and gathered in TRL's
  no-grad pass);
* after the first optimiser step, the parameters equal the one-process run's to float32
  rounding: the term is the generation batch's loss, however TRL splits it over processes and
  micro-steps. That holds with the statistics from a pass of their own (two micro-steps per
  generation) and from the loss's own forward (one micro-step per generation, all-reduced in
  it);
* an error in one process's statistics pass stops both processes at once;
* with ``align_scope="micro_batch"`` (each micro-step aligning only its own rows) the same
  comparison is far outside that rounding: the check can tell the two losses apart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="trl is not installed: pip install trl")

SCRIPT = Path(__file__).with_name("trl_ranks.py")
TIMEOUT = 300  # seconds per launch; a hung collective fails the test instead of the suite
# Statistics source: (gradient_accumulation_steps, steps_per_generation, rows per process).
# "trl_pass": one generation batch over both optimiser steps, its statistics gathered in TRL's
# own no-grad pass.
SCHEDULES = {
    "own_pass": (2, 2, 8),
    "forward": (1, 1, 16),
    "trl_pass": (2, 4, 4),
}
# Where the first optimiser step holds whole generation batches, so that its parameters can be
# compared: with "trl_pass" it holds half of one, and which half depends on TRL's shuffle,
# which differs between one process and two.
WHOLE_FIRST_STEP = ("own_pass", "forward")


def _launch(
    out: Path,
    processes: int,
    per_device: int,
    accumulation: int,
    per_generation: int,
    scope="batch",
    extra=(),
    expect_ok=True,
):
    out.mkdir(parents=True)
    options = [
        str(out),
        "--per-device",
        str(per_device),
        "--accumulation",
        str(accumulation),
        "--per-generation",
        str(per_generation),
        "--scope",
        scope,
        *extra,
    ]
    if processes == 1:
        command = [sys.executable, str(SCRIPT), *options]
    else:
        launcher = ["-m", "torch.distributed.run", "--standalone"]
        command = [sys.executable, *launcher, f"--nproc_per_node={processes}", str(SCRIPT)]
        command += options
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRL_EXPERIMENTAL_SILENCE": "1",
    }
    # A session of its own: on a timeout the launcher and its workers go down together.
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{processes} process(es) did not finish in {TIMEOUT} s:\n{output[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if not expect_ok:
        return proc.returncode, output
    assert proc.returncode == 0, output[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(processes)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("trl_ranks")
    result = {}
    for name, (accumulation, per_generation, per_device) in SCHEDULES.items():
        result[name] = {
            "two": _launch(base / f"{name}-2", 2, per_device, accumulation, per_generation),
            "one": _launch(base / f"{name}-1", 1, 2 * per_device, accumulation, per_generation),
        }
    accumulation, per_generation, per_device = SCHEDULES["own_pass"]
    result["micro_batch"] = _launch(
        base / "micro", 2, per_device, accumulation, per_generation, scope="micro_batch"
    )
    return result


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_two_processes_match_one(runs, name):
    two, (one,) = runs[name]["two"], runs[name]["one"]
    assert [r["distributed_type"] for r in two] == ["DistributedType.MULTI_CPU"] * 2
    assert [r["num_processes"] for r in two] == [2, 2]
    # The same generation batches: every (step, global row, prompt) generated once.
    assert sorted(two[0]["rows"] + two[1]["rows"]) == sorted(one["rows"])
    assert {s for r in two for s in r["sources"]} == {name} == set(one["sources"])

    # The statistics of every pass: bit for bit the same on both ranks, and the one-process
    # run's to float32 rounding (the sums are added in another order).
    assert len(two[0]["statistics"]) == len(two[1]["statistics"]) == len(one["statistics"]) > 0
    for a, b, ref in zip(two[0]["statistics"], two[1]["statistics"], one["statistics"]):
        for field in a:
            assert torch.equal(a[field], b[field]), field
            torch.testing.assert_close(a[field], ref[field], rtol=1e-5, atol=1e-6)
    assert int((one["statistics"][0]["count"] >= 2).sum()) >= 4  # groups the term acts on

    if name not in WHOLE_FIRST_STEP:
        return
    # After the first optimiser step (SGD): float32 rounding of the gradient.
    after_two, after_one = two[0]["params"], one["params"]
    worst = max((after_two[k] - after_one[k]).abs().max().item() for k in after_one)
    print(f"[{name}] largest parameter difference after step 1: {worst:.2e}")
    for key in after_one:
        torch.testing.assert_close(after_two[key], after_one[key], rtol=1e-6, atol=1e-7)

    # Two optimiser steps end to end, logged alike.
    steps = [[log for log in r["log_history"] if "loss" in log] for r in (two[0], one)]
    assert len(steps[0]) == len(steps[1]) == 2
    for a, b in zip(*steps):
        for key in ("hidden_align/align_loss", "hidden_align/anchor_cosine", "loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        assert a["hidden_align/valid_groups"] == b["hidden_align/valid_groups"]


def test_micro_batch_scope_is_told_apart(runs):
    """Each micro-step aligning only the rows it holds is another loss: the parameters after
    the first step differ from the generation batch's far beyond float32 rounding."""
    two, (one,) = runs["micro_batch"], runs["own_pass"]["one"]
    assert {s for r in two for s in r["sources"]} == {None}
    worst = max((two[0]["params"][k] - one["params"][k]).abs().max().item() for k in one["params"])
    print(f"[micro_batch] largest parameter difference after step 1: {worst:.2e}")
    assert worst > 1e-4


@pytest.mark.parametrize("name", ["own_pass", "trl_pass"])
def test_an_error_on_one_rank_stops_both(tmp_path, name):
    """Rank 1 alone fails in the statistics pass (its own, or the one gathered in TRL's): it
    raises its own error and rank 0 one that names it, at once, instead of waiting for rank 1
    in the all-reduce."""
    accumulation, per_generation, per_device = SCHEDULES[name]
    start = time.monotonic()
    code, output = _launch(
        tmp_path / "fail",
        2,
        per_device,
        accumulation,
        per_generation,
        extra=("--fail-rank", "1"),
        expect_ok=False,
    )
    elapsed = time.monotonic() - start
    assert code != 0
    assert "an error on rank 1 only" in output
    assert "data-parallel rank 1 failed in the statistics pass" in output
    # Start-up of two processes included; a hang would last until the gloo timeout (30 min).
    assert elapsed < 120, elapsed
