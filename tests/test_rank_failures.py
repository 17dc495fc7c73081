"""Issue 19, item 7: an error found on one rank must not leave the other ranks waiting in a
collective until the process group times out. Two real gloo processes (60 s process-group
timeout), one of them with a bad input: both must raise, each within seconds, and the process
group must still work afterwards.

* ``GroupAnchorStats.all_reduce`` (``_stats_worker``): statistics of another hidden size,
  dtype, ``eps``, or made with ``group_size`` on one rank; a rank-local failure passed to the
  shared agreement (``hidden_align._collectives.agree_on_failure``); then a good all-reduce.
* The verl engine (``_engine_worker``, verl 0.9.1 on the CPU as in test_integration_verl.py):
  an old-log-prob pass whose micro-batches on one rank have no correctness key, a rank whose
  pass ran no micro-batch (``verl_engine._reference`` called directly: verl cannot run an empty
  batch), an update whose mini-batch on one rank holds groups the statistics lack; then a good
  pass and update.

Each rank writes what it raised and how long the call took; a failing rank then stays alive
(as a Ray worker does after returning its error), so that a rank left waiting would wait for
the full timeout.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hidden_align as ha
from hidden_align._collectives import agree_on_failure, all_reduce_stats

WORLD = 2
PG_TIMEOUT_S = 60
WITHIN_S = 30  # each rank must raise well within the process-group timeout
PEER_WAIT_S = PG_TIMEOUT_S + 30  # a rank left waiting records its timeout before this


# ---- running two ranks ---------------------------------------------------------------------


def _record(path: str, rank: int, name: str, call) -> None:
    """Runs ``call``; writes what it raised (or ``None``) and how long it took."""
    start = time.monotonic()
    try:
        call()
        outcome = {"type": None, "message": ""}
    except Exception as exc:  # noqa: BLE001 - every outcome is recorded and checked
        outcome = {"type": type(exc).__name__, "message": str(exc)}
    outcome["seconds"] = time.monotonic() - start
    with open(os.path.join(path, f"{name}.rank{rank}.json"), "w") as f:
        json.dump(outcome, f)


def _finish(path: str, rank: int, names: list) -> None:
    """Stays alive until the other rank has recorded every scenario (or gave up waiting)."""
    other = 1 - rank
    deadline = time.monotonic() + PEER_WAIT_S
    files = [os.path.join(path, f"{n}.rank{other}.json") for n in names]
    while not all(os.path.exists(f) for f in files) and time.monotonic() < deadline:
        time.sleep(0.2)
    if all(os.path.exists(f) for f in files):
        dist.destroy_process_group()


def _init(rank: int, init: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init,
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )


def _run_ranks(worker, path) -> None:
    """Starts both ranks and waits for them (killing, by their ids, any still running long
    after every deadline: then the missing outcomes fail the tests)."""
    init = f"file://{path}/rendezvous"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, init, str(path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 2 * PEER_WAIT_S + 60
    for p in procs:
        p.join(max(deadline - time.monotonic(), 1))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def _outcomes(path, name: str) -> list:
    out = []
    for rank in range(WORLD):
        file = path / f"{name}.rank{rank}.json"
        assert file.exists(), f"rank {rank} recorded no outcome for {name} (crashed or hung)"
        out.append(json.loads(file.read_text()))
    return out


def _check(outcomes: list, expected: list) -> None:
    """``expected``: per rank ``(exception type name, text in its message)``."""
    for rank, (got, (kind, text)) in enumerate(zip(outcomes, expected)):
        assert got["seconds"] < WITHIN_S, f"rank {rank} took {got['seconds']:.1f} s: {got}"
        assert got["type"] == kind and text in got["message"], f"rank {rank}: {got}"


# ---- GroupAnchorStats.all_reduce -----------------------------------------------------------

# Before the fix, "group-size" and "eps" passed silently and "hidden-size" crashed a rank (a
# mismatched gloo all-reduce), which would spoil the cases after it: it runs last but one.
STATS_CASES = ["group-size", "eps", "own-failure", "dtype", "hidden-size", "good"]


def _stats(rank: int, hidden_size=3, dtype=torch.float64, eps=1e-8, group_size=False):
    gen = torch.Generator().manual_seed(rank)
    hidden = torch.randn(8, 4, hidden_size, generator=gen, dtype=torch.float64).to(dtype)
    anchors = torch.tensor([0, 1, 2, 3, 1, 2, -1, 0])
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    groups = dict(group_size=4) if group_size else dict(group_ids=torch.arange(8) // 4 + rank)
    return ha.group_anchor_stats(hidden, anchors, rewards, eps=eps, **groups)


def _stats_worker(rank: int, init: str, path: str) -> None:
    _init(rank, init)
    bad = rank == 1
    cases = {
        "group-size": lambda: _stats(rank, group_size=bad).all_reduce(),
        "eps": lambda: _stats(rank, eps=1e-6 if bad else 1e-8).all_reduce(),
        "own-failure": lambda: agree_on_failure(
            None, "cpu", ValueError("rows: rank 1's input is bad") if bad else None, code=7
        ),
        "dtype": lambda: _stats(rank, dtype=torch.float32 if bad else torch.float64).all_reduce(),
        "hidden-size": lambda: _stats(rank, hidden_size=4 if bad else 3).all_reduce(),
    }
    for name, call in cases.items():
        _record(path, rank, name, call)

    def good():
        # The group still works after the refusals, and the ranks' statistics add up.
        got, rows = all_reduce_stats(_stats(rank), extra=5 + rank)
        want = _stats(0).merge(_stats(1))
        assert rows == 11 and torch.equal(got.group_ids, want.group_ids)
        torch.testing.assert_close(got.unit_sum, want.unit_sum)
        assert torch.equal(got.count, want.count) and not got.local_blocks

    _record(path, rank, "good", good)
    _finish(path, rank, STATS_CASES)


@pytest.fixture(scope="module")
def stats_outcomes(tmp_path_factory):
    path = tmp_path_factory.mktemp("stats_ranks")
    _run_ranks(_stats_worker, path)
    return path


HIDDEN = (
    "process_group: the ranks hold statistics of different hidden sizes: 3 (rank 0), 4 (rank 1)"
)
STATS_EXPECTED = {
    "hidden-size": [("ShapeError", HIDDEN)] * 2,
    "dtype": [("DtypeError", "process_group: the ranks hold statistics in different dtypes")] * 2,
    "eps": [("ArgumentError", "process_group: the ranks computed their statistics with")] * 2,
    "group-size": [("ArgumentError", "group_size: all_reduce() over 2 ranks of statistics")] * 2,
    "own-failure": [
        ("ArgumentError", "process_group: rank 1 failed before the collectives (code 7"),
        ("ValueError", "rows: rank 1's input is bad"),
    ],
    "good": [(None, "")] * 2,
}


@pytest.mark.parametrize("name", STATS_CASES)
def test_all_reduce_with_one_bad_rank_raises_on_both(stats_outcomes, name):
    outcomes = _outcomes(stats_outcomes, name)
    _check(outcomes, STATS_EXPECTED[name])
    if name == "group-size":
        assert "group_ids=torch.arange(start, start + B) // group_size" in outcomes[0]["message"]


# ---- the verl engine -----------------------------------------------------------------------

ENGINE_CASES = ["update", "collect", "no-micro-batch", "good"]


def _verl_ready() -> bool:
    try:
        import verl
    except Exception:  # noqa: BLE001 - no usable verl: the engine tests are skipped
        return False
    return getattr(verl, "__version__", None) == "0.9.1"


def _engine_worker(rank: int, init: str, path: str) -> None:
    os.environ.update(
        HIDDEN_ALIGN_MARKERS="[[7, 8], [9]]", HIDDEN_ALIGN_COEF="0.5", HIDDEN_ALIGN_LAYER="norm"
    )
    for name in ("OFFSET", "OCCURRENCE", "LOSS_TYPE", "THRESHOLD", "CORRECT"):
        os.environ.pop(f"HIDDEN_ALIGN_{name}", None)
    from test_integration_verl import build_engine, old_log_prob_pass, padded_batch, update
    from verl.utils import seqlen_balancing
    from verl.workers.engine.fsdp import transformer_impl

    import hidden_align.integrations.verl  # noqa: F401 - applies the engine wrap
    from hidden_align.integrations import verl_engine
    from hidden_align.integrations.verl_settings import Settings

    transformer_impl.get_device_id = lambda: "cpu"
    transformer_impl.get_device_name = lambda: "cpu"
    seqlen_balancing.get_device_name = lambda: "cpu"
    _init(rank, init)
    bad = rank == 1
    seed = 20 + rank  # each rank its own rows and groups

    def collect():
        tensors, non_tensors = padded_batch(seed)
        if bad:  # nothing tells correct rollouts: an error while collecting, on rank 1 only
            tensors.pop("rm_scores")
            non_tensors.pop("acc")
        old_log_prob_pass(build_engine(), tensors, non_tensors, True)

    def no_micro_batch():
        state = verl_engine.EngineState(Settings.from_env())
        state.source = "acc"
        parts = [] if bad else [_stats(rank, hidden_size=32, dtype=torch.float32)]
        engine = types.SimpleNamespace(get_data_parallel_group=lambda: None)
        verl_engine._reference(engine, state, parts, None, 16)

    def run_update(unseen: bool):
        engine = build_engine()
        tensors, non_tensors = padded_batch(seed)
        old = old_log_prob_pass(engine, tensors, non_tensors, True)
        if unseen:  # another batch's rows: groups the statistics lack, on rank 1 only
            tensors, non_tensors = padded_batch(seed + 10)
        update(engine, tensors, non_tensors, True, old, torch.zeros_like(old), mini_batch=16)
        # What follows an update on every rank: the optimiser step's gradient-norm all-reduce.
        dist.all_reduce(torch.zeros(1))
        return engine

    _record(path, rank, "update", lambda: run_update(bad))
    _record(path, rank, "collect", collect)
    _record(path, rank, "no-micro-batch", no_micro_batch)

    def good():
        engine = run_update(False)
        assert verl_engine.state_of(engine).reference.total_rows == 32

    _record(path, rank, "good", good)
    _finish(path, rank, ENGINE_CASES)


@pytest.fixture(scope="module")
def engine_outcomes(tmp_path_factory):
    if not _verl_ready():
        pytest.skip("needs verl 0.9.1 (pip install verl==0.9.1)")
    path = tmp_path_factory.mktemp("engine_ranks")
    _run_ranks(_engine_worker, path)
    return path


PEER = "hidden_align: data-parallel rank 1 failed in the "
ENGINE_EXPECTED = {
    "collect": [
        ("RuntimeError", PEER + "old-log-prob pass (its micro-batches' anchors"),
        ("RuntimeError", "hidden_align: the batch has neither 'acc' nor 'rm_scores'"),
    ],
    "no-micro-batch": [
        ("RuntimeError", PEER + "old-log-prob pass (its old-log-prob pass ran no micro-batch"),
        ("_RankFailure", "the old-log-prob pass ran no micro-batch on this rank"),
    ],
    "update": [
        ("RuntimeError", PEER + "update (its mini-batch holds groups the statistics lack"),
        ("_RankFailure", "the statistics belong to another batch"),
    ],
    "good": [(None, "")] * 2,
}


@pytest.mark.parametrize("name", ENGINE_CASES)
def test_verl_engine_with_one_bad_rank_raises_on_both(engine_outcomes, name):
    _check(_outcomes(engine_outcomes, name), ENGINE_EXPECTED[name])
