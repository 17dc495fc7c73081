"""Thread safety: every op called from several Python threads at once, each on its own inputs,
gives exactly (bitwise) what it gives called alone; and the native calls release the GIL, so
other Python threads run while a long one computes."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import hidden_align as ha
from hidden_align import dapo

THREADS = 6
TASKS = 24


def _case(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch, seq, width = 64, 16, 96
    return {
        "hidden": torch.randn(batch, seq, width, generator=g),
        "anchors": torch.randint(-1, seq, (batch,), generator=g),
        "rewards": torch.where(torch.rand(batch, generator=g) < 0.6, 1.0, -1.0),
        "labels": torch.randperm(batch, generator=g) // 4,
        "mask": torch.rand(batch, seq, generator=g) < 0.9,
        "logp": -torch.rand(128, 256, generator=g) * 3,
        "old": -torch.rand(128, 256, generator=g) * 3,
        "adv": torch.randn(128, generator=g),
        "resp": torch.rand(128, 256, generator=g) < 0.8,
        "scores": torch.randn(1024, generator=g),
        "glabels": torch.randperm(1024, generator=g) // 8,
        "tokens": torch.randint(0, 12, (256, 128), generator=g),
        "uids": [f"{seed}-{i // 8}" for i in range(256)],
    }


def _loss(x, loss_type):
    h = x["hidden"].clone().requires_grad_()
    value, stats = ha.loss(
        h,
        x["anchors"],
        x["rewards"],
        group_ids=x["labels"],
        loss_type=loss_type,
        return_stats=True,
    )
    value.backward()
    return (value, h.grad, *stats.values())


def _policy(x, mode):
    lp = x["logp"].clone().requires_grad_()
    loss, metrics = dapo.policy_loss(lp, x["old"], x["adv"], x["resp"], loss_agg_mode=mode)
    loss.backward()
    return (loss, lp.grad, *metrics.values())


def _stats(x):
    s = ha.group_anchor_stats(x["hidden"], x["anchors"], x["rewards"], group_ids=x["labels"])
    return (s.group_ids, s.unit_sum, s.raw_sum, s.sq_norm_sum, s.count)


OPS = {
    "loss-cosine": lambda x: _loss(x, "cosine"),
    "loss-contrastive": lambda x: _loss(x, "contrastive"),
    "loss-mse": lambda x: _loss(x, "mse"),
    "policy-token-mean": lambda x: _policy(x, "token-mean"),
    "policy-seq-mean-token-mean": lambda x: _policy(x, "seq-mean-token-mean"),
    "group_anchor_stats": _stats,
    "find_anchors": lambda x: (ha.find_anchors(x["tokens"], x["tokens"] >= 0, [[3, 4], [7]]),),
    "unpadded_rows": lambda x: (ha.unpadded_rows(x["anchors"], x["mask"]),),
    "group_advantages": lambda x: (dapo.group_advantages(x["scores"], group_ids=x["glabels"]),),
    "dynamic_sampling_mask": lambda x: (
        dapo.dynamic_sampling_mask(x["scores"].sign(), group_ids=x["glabels"]),
    ),
    "overlong_penalty": lambda x: (dapo.overlong_penalty(x["glabels"], 120, 16),),
    "group_ids_from_uids": lambda x: (dapo.group_ids_from_uids(x["uids"]),),
}


def _bytes(outputs) -> list:
    return [t.detach().contiguous().reshape(-1).view(torch.uint8).clone() for t in outputs]


@pytest.mark.parametrize("name", list(OPS))
def test_concurrent_calls_match_single_thread_bitwise(name):
    op = OPS[name]
    cases = [_case(seed) for seed in range(TASKS)]
    alone = [_bytes(op(x)) for x in cases]
    barrier = threading.Barrier(THREADS)

    def task(i):
        if i < THREADS:
            barrier.wait()  # the first wave starts together
        return _bytes(op(cases[i]))

    with ThreadPoolExecutor(THREADS) as pool:
        together = list(pool.map(task, range(TASKS)))
    for i, (a, b) in enumerate(zip(alone, together)):
        assert len(a) == len(b)
        for j, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), f"{name}: case {i}, output {j} differs under threads"


def test_native_calls_release_the_gil():
    """A counter thread keeps advancing while one long native call runs. Were the GIL held, the
    counter could move only during the call's few Python statements. The call: find_anchors
    over 1M tokens with 256 spellings that never match (every row scanned to its end against
    every spelling, a few hundred ms)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (256, 4096), dtype=torch.int32, generator=g)
    response = torch.ones(256, 4096, dtype=torch.bool)
    markers = [[i % 1000, (7 * i) % 1000, 2000] for i in range(256)]  # no token is 2000

    def call():
        return ha.find_anchors(tokens, response, markers)

    call()  # warm-up
    count = [0]
    stop = threading.Event()

    def counter():
        while not stop.is_set():
            count[0] += 1

    worker = threading.Thread(target=counter)
    worker.start()
    try:
        time.sleep(0.05)
        start, t0 = count[0], time.perf_counter()
        time.sleep(0.2)
        rate = (count[0] - start) / (time.perf_counter() - t0)  # counts per second, alone
        start, t0 = count[0], time.perf_counter()
        call()
        elapsed = time.perf_counter() - t0
        during = count[0] - start
    finally:
        stop.set()
        worker.join()
    assert elapsed > 0.05, f"the call took {elapsed:.3f} s: too short to tell"
    # Released: the counter runs for most of the call (shared cores may halve its rate). Held:
    # only during the Python around the native call, well under 10% of it.
    assert during > 0.2 * rate * elapsed, (during, rate, elapsed)
