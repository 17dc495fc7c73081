"""No leaks: 10,000 calls of each op keep the resident set flat, every tensor the ops see or make
dies with its last reference, and the DLPack import releases what it borrows.

The resident set is read from /proc/self/statm after a warm-up (the allocator and torch's
caches settle there); the growth allowed per call is a sixteenth of the op's largest output,
so an op that leaked one output (or one borrowed input) per call fails by a factor of 16."""

from __future__ import annotations

import gc
import os
import sys
import warnings
import weakref

import numpy as np
import pytest
import torch

import hidden_align as ha
from hidden_align import dapo

CALLS = 10_000
WARMUP = 300
PAGE = os.sysconf("SC_PAGE_SIZE")

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)"
)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    batch, seq, width = 16, 8, 32
    return {
        "hidden": torch.randn(batch, seq, width, generator=g),
        "anchors": torch.randint(-1, seq, (batch,), generator=g),
        "rewards": torch.where(torch.rand(batch, generator=g) < 0.6, 1.0, -1.0),
        "labels": torch.arange(batch) // 4,
        "mask": torch.ones(batch, seq, dtype=torch.bool),
        "logp": -torch.rand(16, 64, generator=g),
        "adv": torch.randn(16, generator=g),
        "resp": torch.rand(16, 64, generator=g) < 0.8,
        "scores": torch.randn(512, generator=g),
        "glabels": torch.arange(512) // 8,
        "tokens": torch.randint(0, 20, (512, 16), generator=g),
        "tmask": torch.ones(512, 16, dtype=torch.bool),
        "uids": [f"p{i // 8}" for i in range(128)],
    }


def _loss(x):
    h = x["hidden"].clone().requires_grad_()
    value = ha.loss(h, x["anchors"], x["rewards"], group_ids=x["labels"])
    value.backward()
    return value, h.grad


def _policy(x):
    lp = x["logp"].clone().requires_grad_()
    loss, metrics = dapo.policy_loss(lp, x["logp"] + 0.1, x["adv"], x["resp"])
    loss.backward()
    return loss, lp.grad, *metrics.values()


def _stats(x):
    s = ha.group_anchor_stats(x["hidden"], x["anchors"], x["rewards"], group_ids=x["labels"])
    return s.unit_sum, s.raw_sum, s.count


# name: (call, bytes of its largest output)
OPS = {
    "loss+backward": (_loss, 16 * 8 * 32 * 4),
    "policy_loss+backward": (_policy, 16 * 64 * 4),
    "group_anchor_stats": (_stats, 4 * 32 * 4),
    "find_anchors": (lambda x: ha.find_anchors(x["tokens"], x["tmask"], [[3, 4], [5]]), 512 * 8),
    "unpadded_rows": (lambda x: ha.unpadded_rows(x["anchors"], x["mask"]), 16 * 8),
    "group_advantages": (
        lambda x: dapo.group_advantages(x["scores"], group_ids=x["glabels"]),
        512 * 4,
    ),
    "dynamic_sampling_mask": (
        lambda x: dapo.dynamic_sampling_mask(x["scores"].sign(), group_ids=x["glabels"]),
        512,
    ),
    "overlong_penalty": (lambda x: dapo.overlong_penalty(x["glabels"], 64, 16), 512 * 4),
    "group_ids_from_uids": (lambda x: dapo.group_ids_from_uids(x["uids"]), 128 * 8),
}


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch's deprecated lazy module attributes
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("name", list(OPS))
def test_resident_set_stays_flat(name):
    call, out_bytes = OPS[name]
    x = _inputs()
    for _ in range(WARMUP):
        call(x)
    tensors_before = _live_tensors()
    before = resident_bytes()
    for _ in range(CALLS):
        call(x)
    gc.collect()
    growth = resident_bytes() - before
    per_call = growth / CALLS
    print(f"{name}: {growth} bytes over {CALLS} calls ({per_call:.3f} per call)")
    assert per_call < out_bytes / 16, (
        f"{name}: resident set grew by {growth} bytes over {CALLS} calls "
        f"({per_call:.2f} bytes per call; one output is {out_bytes} bytes)"
    )
    assert _live_tensors() <= tensors_before


@pytest.mark.parametrize("name", list(OPS))
def test_inputs_and_outputs_die_with_their_last_reference(name):
    call, _ = OPS[name]
    x = _inputs()
    outputs = call(x)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    refs = [weakref.ref(t) for t in outputs if isinstance(t, torch.Tensor)]
    refs += [weakref.ref(t) for t in x.values() if isinstance(t, torch.Tensor)]
    assert refs
    del x, outputs
    gc.collect()
    assert [r for r in refs if r() is not None] == []


def test_dlpack_import_releases_the_memory_it_borrows():
    """Tensors over numpy arrays: each torch tensor sharing an array holds a reference to it,
    and so would any DLPack capsule of it that the native side failed to release. After the
    calls and the tensors are gone, every array is back to its own references."""
    rng = np.random.default_rng(0)
    arrays = {
        "hidden": rng.standard_normal((8, 4, 16)).astype(np.float32),
        "anchors": rng.integers(-1, 4, 8),
        "rewards": np.where(rng.random(8) < 0.6, 1.0, -1.0).astype(np.float32),
        "labels": np.arange(8) // 4,
        "logp": -rng.random((8, 12)).astype(np.float32),
        "resp": rng.random((8, 12)) < 0.8,
    }
    base = {k: sys.getrefcount(a) for k, a in arrays.items()}
    t = {k: torch.from_numpy(a) for k, a in arrays.items()}
    for _ in range(50):
        h = t["hidden"].requires_grad_()
        ha.loss(h, t["anchors"], t["rewards"], group_ids=t["labels"]).backward()
        lp = t["logp"].requires_grad_()
        dapo.policy_loss(lp, t["logp"].detach(), t["rewards"], t["resp"])[0].backward()
        dapo.group_advantages(t["rewards"], group_ids=t["labels"])
        ha.group_anchor_stats(t["hidden"].detach(), t["anchors"], t["rewards"], group_size=4)
        ha.find_anchors(t["labels"][None].clone(), t["resp"][:1, :8], [[1]])
        h.grad = lp.grad = None
    del t, h, lp
    gc.collect()
    assert {k: sys.getrefcount(a) for k, a in arrays.items()} == base
