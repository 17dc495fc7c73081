"""hidden_align.loss against the PyTorch formulation a user would write, in one run.

(a) the loss alone at B=256 (G=16), T=1024, H=2048: forward, and forward+backward with
    `hidden` a leaf that nothing else consumes (both sides must then produce a dense gradient);
(b) a whole step where `hidden` also feeds a linear head (the LM head stand-in): head forward,
    head loss, the alignment term, backward into `hidden`. Reported as the overhead of the
    alignment term over the step without it, for hidden_align and for the eager formulation.

Usage: python benches/bench_align.py [--dtype bfloat16 float32] [--reps 5] [--compile]
       [--parts loss step]
A CPU step with [B, T, H] tensors is dominated by page faults of fresh allocations, which makes
step timings drift between runs; preloading jemalloc steadies them:
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python benches/bench_align.py --parts step
Medians; ratios are eager / hidden_align from the same run. Tables go to bench-results/.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import interleaved_medians, ms, write_table  # noqa: E402

import hidden_align as ha  # noqa: E402

from reference import eager_alignment_loss  # noqa: E402


def setup(batch, seq, hidden_size, group, dtype):
    torch.manual_seed(0)
    hidden = torch.randn(batch, seq, hidden_size, dtype=dtype)
    index = torch.randint(0, seq, (batch,))
    index[torch.rand(batch) < 0.1] = -1
    rewards = torch.where(torch.rand(batch) < 0.5, 1.0, -1.0)
    return hidden, index, rewards


def bench_loss(hidden, providers, reps):
    """(provider, forward s, forward+backward s); hidden a leaf nothing else consumes."""
    leaf = hidden.detach().requires_grad_()

    def fwd_bwd(fn):
        def step():
            leaf.grad = None
            fn(leaf).backward()

        return step

    fwd = interleaved_medians({n: (lambda fn=fn: fn(hidden)) for n, fn in providers.items()}, reps)
    both = interleaved_medians({n: fwd_bwd(fn) for n, fn in providers.items()}, reps)
    return [(name, fwd[name], both[name]) for name in providers]


def bench_step(hidden, align_terms, reps, vocab=16):
    """(step, s): hidden feeds a linear head; with each alignment term and without any."""
    weight = torch.randn(hidden.shape[-1], vocab, dtype=hidden.dtype) * 0.02
    leaf = hidden.detach().requires_grad_()

    def step(term):
        def run():
            leaf.grad = None
            logits = leaf @ weight
            total = logits.float().square().mean()
            if term is not None:
                total = total + 0.1 * term(leaf)
            total.backward()

        return run

    steps = {"head only": step(None), **{n: step(t) for n, t in align_terms.items()}}
    medians = interleaved_medians(steps, reps)
    return list(medians.items())


def run(args, dtype_name):
    dtype = getattr(torch, dtype_name)
    hidden, index, rewards = setup(args.batch, args.seq, args.hidden, args.group, dtype)
    g = args.group

    def ours(h):
        return ha.loss(h, index, rewards, group_size=g)

    def eager(h):
        return eager_alignment_loss(h, index, rewards, g)

    providers = {"eager": eager}
    if args.compile:
        providers["torch.compile"] = torch.compile(eager)
    providers["hidden_align"] = ours

    shape = f"B={args.batch} (G={g}), T={args.seq}, H={args.hidden}, {dtype_name}"
    if "loss" in args.parts:
        loss_rows = bench_loss(hidden, providers, args.reps)
        ref_f, ref_b = loss_rows[0][1], loss_rows[0][2]
        table = [
            (name, ms(f), f"{ref_f / f:.1f}x", ms(b), f"{ref_b / b:.2f}x")
            for name, f, b in loss_rows
        ]
        print(
            write_table(
                f"align-loss-{dtype_name}",
                f"Alignment loss alone, {shape} (median of {args.reps})",
                ["provider", "forward ms", "vs eager", "fwd+bwd ms", "vs eager"],
                table,
            )
        )
    if "step" in args.parts:
        step_rows = bench_step(hidden, {"eager": eager, "hidden_align": ours}, args.reps)
        base = step_rows[0][1]
        table = [
            (name, ms(t), "-" if i == 0 else f"{100 * (t / base - 1):+.1f}%")
            for i, (name, t) in enumerate(step_rows)
        ]
        jemalloc = "jemalloc" in os.environ.get("LD_PRELOAD", "")
        allocator = "jemalloc" if jemalloc else "glibc malloc"
        print(
            write_table(
                f"align-step-{dtype_name}" + ("-jemalloc" if jemalloc else ""),
                f"Whole step with a linear head on hidden, {shape}, {allocator} "
                f"(median of {args.reps})",
                ["step", "ms", "overhead of the alignment term"],
                table,
            )
        )
    del hidden


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(eager)")
    parser.add_argument("--parts", nargs="+", default=["loss", "step"], choices=["loss", "step"])
    args = parser.parse_args()

    for dtype_name in args.dtype:
        run(args, dtype_name)


if __name__ == "__main__":
    main()
