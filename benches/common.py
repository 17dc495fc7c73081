"""Shared helpers of the Python benchmarks: timing, machine description, result tables."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import hidden_align as ha

RESULTS = Path(__file__).resolve().parent.parent / "bench-results"


def load_verl():
    """verl's ``core_algos`` and an ``ActorConfig`` with DAPO's clip settings (the parity
    oracle's defaults), or ``(None, None)`` when verl is not installed."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from verl.trainer.ppo import core_algos
            from verl.workers.config import ActorConfig
    except ImportError:
        return None, None
    config = ActorConfig(
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=10.0,
        strategy="fsdp",
        ppo_micro_batch_size_per_gpu=1,
        ppo_mini_batch_size=256,
        rollout_n=1,
    )
    return core_algos, config


def medians(fns: dict, reps: int, warmup: int = 1) -> dict:
    """Median seconds of each callable, timed back to back (caches and allocator warm)."""
    out = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def interleaved_medians(fns: dict, reps: int, warmup: int = 1) -> dict:
    """Median seconds of each callable, timed round-robin (one call of each per round) so that
    drift of the machine spreads evenly over the providers. The order rotates every round:
    otherwise one provider would always run right after the same other one and inherit the
    caches and heap that one left behind."""
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"hidden_align {ha.__version__} @ {commit}"
    )


def write_table(name: str, title: str, header: list, rows: list) -> str:
    lines = [f"## {title}", "", f"Machine: {machine()}", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    return text


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"
