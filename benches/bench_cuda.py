"""GPU benchmark of every op of the CUDA backend against the eager PyTorch formulation users run
today (verl's functions where they exist) and ``torch.compile`` of it, timed with CUDA events
in one run, providers interleaved. Also prints the achieved fraction of the measured
device-to-device copy bandwidth, counting for each op the bytes of its floor (docs/design.md
section 12).

Usage: python benches/bench_cuda.py [--reps 50] [--no-compile]
Needs a CUDA GPU; exits with the reason from ``hidden_align.cuda_status()`` otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import load_verl, write_table  # noqa: E402

import hidden_align as ha  # noqa: E402
from hidden_align import dapo  # noqa: E402

from reference import eager_alignment_loss  # noqa: E402

# Without verl, the eager formulas below stand in for it.
core_algos, VERL_CONFIG = load_verl()


def cuda_times(fns: dict, reps: int) -> dict:
    """Median milliseconds per provider, measured with CUDA events, providers interleaved."""
    for fn in fns.values():  # warm-up: compilation, caching allocator, NVRTC
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    samples = {k: [] for k in fns}
    names = list(fns)
    for i in range(reps):
        for k in names[i % len(names) :] + names[: i % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[k]()
            end.record()
            end.synchronize()
            samples[k].append(start.elapsed_time(end))
    return {k: statistics.median(v) for k, v in samples.items()}


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write of 1 GiB)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_times({"copy": lambda: dst.copy_(src)}, 20)["copy"]
    return 2 * src.numel() * 4 / (t / 1e3)


def eager_policy(logp, old, adv, mask):
    if core_algos is not None:
        return core_algos.compute_policy_loss_vanilla(
            old, logp, adv, mask, "token-mean", VERL_CONFIG
        )[0]
    ratio = torch.exp(torch.clamp(logp - old, -20, 20))
    l1, l2 = -adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.28)
    c1 = torch.maximum(l1, l2)
    tok = torch.where(adv < 0, torch.minimum(-adv * 10, c1), c1)
    return (tok * mask).sum() / mask.sum()


def eager_advantages(scores, ids, eps=1e-6):
    uniq, dense = torch.unique(ids, return_inverse=True)
    g = uniq.numel()
    n = torch.zeros(g, device=scores.device).index_add_(0, dense, torch.ones_like(scores))
    mean = torch.zeros(g, device=scores.device).index_add_(0, dense, scores) / n
    var = torch.zeros(g, device=scores.device).index_add_(0, dense, (scores - mean[dense]) ** 2)
    std = (var / (n - 1).clamp_min(1)).sqrt()
    return (scores - mean[dense]) / (std[dense] + eps)


def row(name, times, floor_bytes, bandwidth):
    ours, eager = times["hidden_align"], times["eager"]
    compiled = times.get("compile")
    frac = floor_bytes / (ours / 1e3) / bandwidth
    return [
        name,
        f"{eager:.3f}",
        "-" if compiled is None else f"{compiled:.3f}",
        f"{ours:.3f}",
        f"{eager / ours:.1f}x",
        "-" if compiled is None else f"{compiled / ours:.1f}x",
        f"{100 * frac:.0f}%",
    ]


def bench_policy(dtype, compile_, reps, bandwidth):
    """Policy loss forward + backward, B = 64, T = 8192, token-mean."""
    b, t = 64, 8192
    logp = (-torch.rand(b, t, device="cuda") * 3).to(dtype)
    old = (logp.float() + (torch.rand(b, t, device="cuda") - 0.5) * 0.6).to(dtype)
    adv = torch.randn(b, t, device="cuda").to(dtype)
    lengths = torch.randint(t // 2, t, (b, 1), device="cuda")
    mask = (torch.arange(t, device="cuda")[None] < lengths).float()
    x = logp.clone().requires_grad_()
    compiled = compile_(eager_policy)

    def step(fn):
        x.grad = None
        fn(x, old, adv, mask).backward()

    times = cuda_times(
        {
            "eager": lambda: step(eager_policy),
            "compile": lambda: step(compiled),
            "hidden_align": lambda: step(lambda *a: dapo.policy_loss(*a)[0]),
        },
        reps,
    )
    es = torch.finfo(dtype).bits // 8
    floor = b * t * (4 * es + 4)  # logp, old, adv, a float mask (4 B) read once; grad written
    return row(f"policy loss fwd+bwd {str(dtype)[6:]} [64, 8192]", times, floor, bandwidth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    status = ha.cuda_status()
    if not (torch.cuda.is_available() and status["available"]):
        sys.exit(f"no usable CUDA device: {status.get('reason') or 'torch sees no GPU'}")
    compile_ = (lambda f: f) if args.no_compile else torch.compile
    bandwidth = copy_bandwidth()
    rows = []
    torch.manual_seed(0)

    for dtype in (torch.float32, torch.bfloat16):
        rows.append(bench_policy(dtype, compile_, args.reps, bandwidth))

    # Group advantages, B = 8192, groups of 16 in shuffled order, token-level scores [B, 32].
    b = 8192
    scores = torch.randn(b, 32, device="cuda")
    ids = (torch.arange(b, device="cuda") // 16)[torch.randperm(b, device="cuda")]
    eager = lambda: eager_advantages(scores.sum(-1), ids)  # noqa: E731
    compiled = compile_(lambda: eager_advantages(scores.sum(-1), ids))
    times = cuda_times(
        {
            "eager": eager,
            "compile": compiled,
            "hidden_align": lambda: dapo.group_advantages(scores, group_ids=ids),
        },
        args.reps,
    )
    rows.append(row("group advantages [8192, 32], G=16", times, b * 32 * 4 + b * 12, bandwidth))

    metric = (torch.rand(b, device="cuda") > 0.5).float()
    times = cuda_times(
        {
            "eager": lambda: eager_advantages(metric, ids).abs() > 0,
            "hidden_align": lambda: dapo.dynamic_sampling_mask(metric, group_ids=ids),
        },
        args.reps,
    )
    rows.append(row("dynamic sampling mask [8192]", times, b * 13, bandwidth))
    lengths = torch.randint(0, 4096, (b,), device="cuda")
    times = cuda_times(
        {
            "eager": lambda: torch.clamp(-(lengths - 3584) / 512, max=0.0),
            "hidden_align": lambda: dapo.overlong_penalty(lengths, 4096, 512),
        },
        args.reps,
    )
    rows.append(row("overlong penalty [8192]", times, b * 12, bandwidth))

    # Alignment loss forward + backward, B = 256, T = 1024, H = 2048 bfloat16; the gradient
    # reaches hidden through an LM-head-like consumer so both sides deliver into one buffer.
    b, t, h, g = 256, 1024, 2048, 16
    hidden = torch.randn(b, t, h, device="cuda", dtype=torch.bfloat16)
    index = torch.randint(0, t, (b,), device="cuda")
    rewards = (torch.rand(b, device="cuda") > 0.4).float()
    hx = hidden.clone().requires_grad_()
    compiled = compile_(eager_alignment_loss)

    def align_step(fn):
        hx.grad = None
        fn().backward()

    times = cuda_times(
        {
            "eager": lambda: align_step(lambda: eager_alignment_loss(hx, index, rewards, g)),
            "compile": lambda: align_step(lambda: compiled(hx, index, rewards, g)),
            "hidden_align": lambda: align_step(lambda: ha.loss(hx, index, rewards, group_size=g)),
        },
        args.reps,
    )
    # Floor: read the anchor rows, write their gradient rows, and (both sides) zero-fill the
    # dense gradient of hidden, which dominates.
    floor = b * h * (2 + 2) + b * t * h * 2
    rows.append(row("alignment fwd+bwd bf16 [256, 1024, 2048]", times, floor, bandwidth))

    header = [
        "op",
        "eager ms",
        "compile ms",
        "hidden_align ms",
        "vs eager",
        "vs compile",
        "of copy bandwidth",
    ]
    title = (
        f"CUDA backend, median of {args.reps} (CUDA events); copy bandwidth "
        f"{bandwidth / 1e9:.0f} GB/s on {torch.cuda.get_device_name()}"
    )
    print(write_table("cuda", title, header, rows))


if __name__ == "__main__":
    main()
