"""hidden_align.token_logprobs against what a training loop runs without it, in one run:

- eager: ``logits = (hidden @ weight.T).float()``, ``log_softmax`` + ``gather`` for the target
  log-probs, ``logsumexp - sum(softmax * logits)`` for the entropy (verl's formulas);
- torch.compile of the same function (Inductor);
- Liger-Kernel's fused linear cross-entropy, when it is installed and a CUDA device is present
  (it is Triton-only; on the CPU it is reported as not run);
- ours: chunks of logits through torch's matmul, one pass of our kernel per chunk each way.

Forward + backward of ``logprob.sum() + entropy.sum()`` w.r.t. hidden and weight, median of
interleaved repetitions; and the peak extra memory of one forward + backward: on the CPU the
resident-set high-water mark (VmHWM, reset once the inputs exist) of a fresh process running
only that provider, minus its resident set at that point; on CUDA
``torch.cuda.max_memory_allocated`` above the inputs.

Usage: python benches/bench_logprobs.py [--n 4096] [--h 1024] [--v 32768]
           [--dtypes float32,bfloat16] [--reps 3] [--device cpu] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, write_table  # noqa: E402

import hidden_align as ha  # noqa: E402


def eager(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    logprob = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    entropy = torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprob, entropy


def ours(hidden, weight, targets):
    return ha.token_logprobs(hidden, weight, targets, return_entropy=True)


def liger():
    """Liger's fused linear cross-entropy (the target log-probs only; it has no entropy
    output), or None when it cannot run here."""
    if not torch.cuda.is_available():
        return None
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyFunction,
        )
    except ImportError:
        return None

    def run(hidden, weight, targets):
        out = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets, None, None)
        loss = out[0] if isinstance(out, tuple) else out
        return -loss, torch.zeros((), device=hidden.device)

    return run


def inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype).requires_grad_()
    # Logits of a trained head's spread (std ~ 3), so the softmax is neither flat nor one-hot.
    weight = (torch.randn(v, h, generator=g) * (3.0 / h**0.5)).to(device=device, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    return hidden, weight.requires_grad_(), targets


def step(fn, hidden, weight, targets):
    def run():
        hidden.grad = None
        weight.grad = None
        logprob, entropy = fn(hidden, weight, targets)
        (logprob.sum() + entropy.sum()).backward()
        if hidden.is_cuda:
            torch.cuda.synchronize()  # the timer reads the host clock

    return run


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> None:
    """Resets the kernel's resident-set high-water mark (VmHWM) of this process to its current
    resident set (Linux: writing 5 to clear_refs), so earlier peaks (importing torch, making
    the inputs) do not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_extra(provider: str, n, h, v, dtype, device) -> float:
    """Peak extra memory (MiB) of one forward + backward of ``provider`` in this process."""
    hidden, weight, targets = inputs(n, h, v, dtype, device)
    fn = {"eager": eager, "ours": ours, "compiled": torch.compile(eager)}[provider]
    if provider == "compiled":
        step(fn, hidden, weight, targets)()  # compile first: its memory is not the op's
    if device == "cuda":
        step(fn, hidden, weight, targets)()
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, hidden, weight, targets)()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    reset_peak_rss()
    base = rss_bytes()
    step(fn, hidden, weight, targets)()
    return (peak_rss_bytes() - base) / 2**20


def peak_in_subprocess(provider, args, dtype) -> float:
    cmd = [sys.executable, __file__, "--peak", provider, "--dtypes", dtype]
    cmd += ["--n", str(args.n), "--h", str(args.h), "--v", str(args.v), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--h", type=int, default=1024)
    parser.add_argument("--v", type=int, default=32768)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--peak", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak:
        dtype = getattr(torch, args.dtypes)
        mib = peak_extra(args.peak, args.n, args.h, args.v, dtype, args.device)
        print(json.dumps({"peak_mib": mib}))
        return
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        hidden, weight, targets = inputs(args.n, args.h, args.v, dtype, args.device)
        # Same values first: the comparison is only meaningful between equal results.
        with torch.no_grad():
            lp_e, ent_e = eager(hidden, weight, targets)
            lp_o, ent_o = ours(hidden, weight, targets)
        diff = max((lp_e - lp_o).abs().max().item(), (ent_e - ent_o).abs().max().item())
        providers = {"eager": eager, "ours": ours}
        if not args.no_compile:
            providers["compiled"] = torch.compile(eager)
        lig = liger()
        if lig is not None:
            providers["liger"] = lig
        fns = {k: step(f, hidden, weight, targets) for k, f in providers.items()}
        times = interleaved_medians(fns, args.reps)
        del hidden, weight, targets, fns
        peaks = {k: peak_in_subprocess(k, args, name) for k in providers if k != "liger"}
        for k in providers:
            rows.append(
                [
                    name,
                    k,
                    f"{times[k] * 1e3:.0f}",
                    f"{times['eager'] / times[k]:.2f}x",
                    f"{peaks[k]:.0f}" if k in peaks else "-",
                    f"{peaks[k] / peaks['eager']:.3f}" if k in peaks else "-",
                ]
            )
        print(f"{name}: max |ours - eager| over log-probs and entropies = {diff:.2e}", flush=True)
    if lig is None:
        print("Liger-Kernel: not run (it needs a CUDA device and liger-kernel installed)")
    title = (
        f"token_logprobs + entropy, forward + backward, N={args.n}, H={args.h}, V={args.v}, "
        f"{args.device} (median ms of {args.reps}; peak extra MiB of one step)"
    )
    header = ["dtype", "provider", "ms", "speed vs eager", "peak extra MiB", "memory vs eager"]
    print(write_table(f"token-logprobs-{args.device}", title, header, rows))


if __name__ == "__main__":
    main()
