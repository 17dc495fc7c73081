"""Bitwise determinism: every op, run twice in one process, gives the same bytes; and rayon's
thread count (RAYON_NUM_THREADS=1 against 2) and the emulated kernels' concurrent blocks
(HIDDEN_ALIGN_EMULATED_BLOCKS=1 against 4) do not change a single bit.

Each configuration runs in its own subprocess (the thread pool and the block count are fixed
at start-up), on inputs large enough to cross the parallel thresholds of the CPU kernels, and
prints the SHA-256 of the raw bytes of every output and gradient."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

WORKER = r"""
import hashlib, json, sys
import torch
import hidden_align as ha
from hidden_align import dapo

small = sys.argv[1] == "small"
repeats = int(sys.argv[2])
torch.manual_seed(0)
if small:  # the emulated kernels run one CPU thread per CUDA thread: small shapes
    B, T, H, G, N, L = 32, 8, 72, 4, 32, 96
else:
    B, T, H, G, N, L = 256, 64, 512, 16, 512, 1024

def digest(t):
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()

hidden = torch.randn(B, T, H)
anchors = torch.randint(-1, T, (B,))
rewards = torch.where(torch.rand(B) < 0.6, 1.0, -1.0)
labels = (torch.arange(B) // G * 7 + 3)[torch.randperm(B)]
mask = torch.ones(B, T, dtype=torch.bool)
logp = -torch.rand(N, L) * 3
old = logp + (torch.rand(N, L) - 0.5) * 2
adv = torch.randn(N)
resp = torch.arange(L)[None, :] < torch.randint(1, L + 1, (N,))[:, None]
scores = torch.randn(N)
glabels = torch.arange(N) // 8 * 5 + 1
tokens = torch.randint(0, 50, (N, L))
markers = [[3, 4], [7, 8, 9], [11]]
uids = [f"prompt-{i // 8}" for i in range(N)]

def run():
    out = {}
    loss_types = ["cosine"] if small else ["cosine", "centroid", "mse", "contrastive"]
    for loss_type in loss_types:
        for reduction in ["mean", "none"] if loss_type == "cosine" and not small else ["mean"]:
            h = hidden.clone().requires_grad_()
            res, stats = ha.loss(h, anchors, rewards, group_ids=labels, loss_type=loss_type,
                                 reduction=reduction, return_stats=True)
            value = res[0] if reduction == "none" else res
            value.sum().backward()
            key = f"loss/{loss_type}/{reduction}"
            out[key] = digest(value)
            out[key + "/grad"] = digest(h.grad)
            for name, s in stats.items():
                out[key + "/" + name] = digest(s)
    if not small:
        s = ha.group_anchor_stats(hidden, anchors, rewards, group_ids=labels)
        for name in ("group_ids", "unit_sum", "raw_sum", "sq_norm_sum", "count"):
            out["stats/" + name] = digest(getattr(s, name))
        out["unpadded_rows"] = digest(ha.unpadded_rows(anchors, mask))
        out["uids"] = digest(dapo.group_ids_from_uids(uids))
    modes = ["token-mean"] if small else ["token-mean", "seq-mean-token-mean",
                                          "seq-mean-token-sum-norm"]
    for mode in modes:
        x = logp.clone().requires_grad_()
        loss, metrics = dapo.policy_loss(x, old, adv, resp, loss_agg_mode=mode)
        loss.backward()
        out[f"policy/{mode}"] = digest(loss)
        out[f"policy/{mode}/grad"] = digest(x.grad)
        for name, m in metrics.items():
            out[f"policy/{mode}/{name}"] = digest(m)
    out["advantages"] = digest(dapo.group_advantages(scores, group_ids=glabels))
    if small:
        return out
    out["dynamic_sampling"] = digest(dapo.dynamic_sampling_mask(scores.sign(), group_ids=glabels))
    out["overlong"] = digest(dapo.overlong_penalty(torch.randint(0, L, (N,),
                             generator=torch.Generator().manual_seed(1)), L, L // 4))
    out["find_anchors"] = digest(ha.find_anchors(tokens, resp, markers))
    return out

runs = [run() for _ in range(repeats)]
print(json.dumps({"runs": runs, "backend": ha.get_backend()}))
"""


# name: (environment, input size, repeats) of each subprocess; all of them start at once.
CONFIGS = {
    "cpu-1": ({"RAYON_NUM_THREADS": "1", "HIDDEN_ALIGN_BACKEND": "cpu"}, "large", 2),
    "cpu-2": ({"RAYON_NUM_THREADS": "2", "HIDDEN_ALIGN_BACKEND": "cpu"}, "large", 2),
}
# The emulated kernels run one CPU thread per CUDA thread (seconds per call): blocks in
# sequence once, four blocks at once twice (the configuration that could race).
EMULATED = {
    "emulated-1": (
        {"HIDDEN_ALIGN_BACKEND": "cuda-emulated", "HIDDEN_ALIGN_EMULATED_BLOCKS": "1"},
        "small",
        1,
    ),
    "emulated-4": (
        {"HIDDEN_ALIGN_BACKEND": "cuda-emulated", "HIDDEN_ALIGN_EMULATED_BLOCKS": "4"},
        "small",
        2,
    ),
}


def _emulation_built() -> bool:
    import hidden_align as ha

    return bool(ha.cuda_status().get("emulation_built"))


@pytest.fixture(scope="module")
def runs() -> dict:
    configs = dict(CONFIGS, **(EMULATED if _emulation_built() else {}))
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", WORKER, size, str(repeats)],
            env=dict(os.environ, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (env, size, repeats) in configs.items()
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out[name] = json.loads(stdout.strip().splitlines()[-1])
        assert out[name]["backend"] == configs[name][0]["HIDDEN_ALIGN_BACKEND"]
    return out


def _differences(a: dict, b: dict) -> list:
    assert a.keys() == b.keys()
    return sorted(k for k in a if a[k] != b[k])


@pytest.mark.parametrize("name", ["cpu-1", "cpu-2", "emulated-4"])
def test_repeated_runs_are_bitwise_equal(runs, name):
    if name not in runs:
        pytest.skip("this build has no emulated CUDA backend")
    first, second = runs[name]["runs"]
    assert len(first) >= (40 if name.startswith("cpu") else 8)
    assert _differences(first, second) == []


def test_one_thread_and_two_threads_are_bitwise_equal(runs):
    assert _differences(runs["cpu-1"]["runs"][0], runs["cpu-2"]["runs"][0]) == []


def test_emulated_blocks_in_sequence_and_at_once_are_bitwise_equal(runs):
    if "emulated-1" not in runs:
        pytest.skip("this build has no emulated CUDA backend")
    assert _differences(runs["emulated-1"]["runs"][0], runs["emulated-4"]["runs"][0]) == []
