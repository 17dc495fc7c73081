"""hidden_align.dapo against verl's own functions, in one run.

* policy loss forward+backward (`compute_policy_loss_vanilla` + `agg_loss`, metrics read with
  `.item()` as verl does) at B=64, T=8192 in float32 and bfloat16, and at B=8, T=16 where
  dispatch overhead dominates;
* group advantages (`compute_grpo_outcome_advantage`) at B=8192, G=16;
* timings back to back per provider (warm caches and allocator), and interleaved (one call of
  each provider per round, so each runs after the other has churned caches and the heap);
* peak extra memory of the policy loss forward+backward beyond its inputs, measured as the rise
  of the resident set (VmHWM after `clear_refs`) in a fresh process per provider, with glibc's
  mmap threshold fixed so that every large tensor is mapped and unmapped on its own.

Usage: python benches/bench_dapo.py [--reps 20]   (needs the parity extra: verl)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import interleaved_medians, load_verl, medians, ms, write_table  # noqa: E402

from hidden_align import dapo  # noqa: E402

core_algos, CONFIG = load_verl()
if core_algos is None:
    sys.exit("benches/bench_dapo.py compares against verl: pip install -e '.[parity]'")


def inputs(batch, seq, dtype):
    torch.manual_seed(0)
    logp = (-torch.rand(batch, seq) * 3).to(dtype)
    old = (logp.float() + (torch.rand(batch, seq) - 0.5) * 0.6).to(dtype)
    adv = torch.randn(batch, seq).to(dtype)
    mask = torch.arange(seq)[None, :] < torch.randint(seq // 2, seq + 1, (batch, 1))
    return logp, old, adv, mask.float()


def verl_step(logp, old, adv, mask):
    x = logp.detach().requires_grad_()
    loss, metrics = core_algos.compute_policy_loss_vanilla(old, x, adv, mask, "token-mean", CONFIG)
    loss.backward()
    return x.grad


def ours_step(logp, old, adv, mask):
    x = logp.detach().requires_grad_()
    loss, metrics = dapo.policy_loss(x, old, adv, mask)
    loss.backward()
    return x.grad


PROVIDERS = {"verl": verl_step, "hidden_align": ours_step}


def memory_probe(provider, batch, seq, dtype_name):
    """Runs in a fresh process: prints the peak resident-set rise of one forward+backward."""
    data = inputs(batch, seq, getattr(torch, dtype_name))
    PROVIDERS[provider](*data)  # warm up lazy initialisation
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    before = status("VmRSS")
    grad = PROVIDERS[provider](*data)
    print(status("VmHWM") - before)
    del grad


def peak_extra_bytes(provider, batch, seq, dtype_name):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(
        [sys.executable, __file__, "--memory-probe", provider, str(batch), str(seq), dtype_name],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def bench_policy(reps):
    rows = []
    for batch, seq, dtype_name in [
        (64, 8192, "float32"),
        (64, 8192, "bfloat16"),
        (8, 16, "float32"),
    ]:
        data = inputs(batch, seq, getattr(torch, dtype_name))
        steps = {p: (lambda p=p, data=data: PROVIDERS[p](*data)) for p in PROVIDERS}
        warm = medians(steps, reps, warmup=3)
        mixed = interleaved_medians(steps, reps, warmup=3)
        bt_f32 = batch * seq * 4
        mem = {p: peak_extra_bytes(p, batch, seq, dtype_name) for p in PROVIDERS}
        rows.append(
            (
                f"B={batch}, T={seq}, {dtype_name}",
                ms(warm["verl"]),
                ms(warm["hidden_align"]),
                f"{warm['verl'] / warm['hidden_align']:.1f}x",
                f"{mixed['verl'] / mixed['hidden_align']:.1f}x",
                f"{mem['verl'] / bt_f32:.1f}",
                f"{mem['hidden_align'] / bt_f32:.1f}",
            )
        )
    return write_table(
        "dapo-policy-loss",
        f"Policy loss forward+backward, token-mean (median of {reps})",
        [
            "shape",
            "verl ms",
            "hidden_align ms",
            "speed-up",
            "speed-up, interleaved",
            "verl peak extra ([B,T] f32 units)",
            "hidden_align peak extra",
        ],
        rows,
    )


def bench_advantages(reps):
    batch, group = 8192, 16
    torch.manual_seed(0)
    labels = torch.arange(batch) // group
    perm = torch.randperm(batch)
    labels = labels[perm]
    rewards = torch.zeros(batch, 32)
    rewards[:, -1] = torch.where(torch.rand(batch) < 0.5, 1.0, -1.0)
    mask = torch.ones(batch, 32)
    uids = np.array([f"uid-{int(i)}" for i in labels])
    ids = dapo.group_ids_from_uids(uids)
    times = interleaved_medians(
        {
            "verl": lambda: core_algos.compute_grpo_outcome_advantage(rewards, mask, uids),
            "ours": lambda: dapo.group_advantages(rewards, group_ids=ids),
        },
        max(3, reps // 4),
    )
    t_verl, t_ours = times["verl"], times["ours"]
    rows = [(f"B={batch}, G={group}", ms(t_verl), ms(t_ours), f"{t_verl / t_ours:.0f}x")]
    return write_table(
        "dapo-advantages",
        f"Group advantages from token-level rewards [B, 32] (median of {reps})",
        ["shape", "verl ms", "hidden_align ms", "speed-up"],
        rows,
    )


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-probe":
        provider, batch, seq, dtype_name = sys.argv[2:6]
        memory_probe(provider, int(batch), int(seq), dtype_name)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    print(bench_policy(args.reps))
    print(bench_advantages(args.reps))


if __name__ == "__main__":
    main()
