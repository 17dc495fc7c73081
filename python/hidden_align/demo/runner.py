"""The demo's driver: per seed one warm-up, then both arms from the same weights and seeds."""

from __future__ import annotations

import copy
import random
import sys
import time

import torch

from . import report
from .evaluate import evaluate
from .train import Setup, rl_step, warmup

ARMS = ("baseline", "align")


def _check(args) -> str | None:
    positive = ("steps", "seeds", "prompts_per_step", "group_size", "micro_batch", "eval_size")
    positive += ("eval_samples", "eval_every", "digits", "d_model", "layers", "heads")
    for name in positive:
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1"
    if args.warmup_steps < 0 or args.overlong_buffer < 1:
        return "--warmup-steps must be >= 0 and --overlong-buffer >= 1"
    if args.group_size < 2:
        return "--group-size must be >= 2 (advantages compare rollouts of one prompt)"
    if args.d_model % args.heads:
        return "--d-model must be a multiple of --heads"
    if args.align_weight <= 0:
        return "--align-weight must be > 0 (the baseline arm runs without it)"
    return None


def _arm(args, setup: Setup, state: dict, seed: int, align: bool, start: dict, bar) -> dict:
    """One arm: DAPO steps from the warmed-up weights; per-step metrics and final evaluation."""
    torch.manual_seed(seed)
    model = setup.model(args)
    model.load_state_dict(state)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    # Both arms draw the same prompts and the same sampling random numbers.
    rng = random.Random(f"rl/{seed}")
    gen = torch.Generator(device=setup.device).manual_seed(seed + 1)
    weight = args.align_weight if align else 0.0
    steps, evals = [], [dict(step=0, **start)]
    for step in range(1, args.steps + 1):
        rec = rl_step(model, opt, setup, args, weight, rng, gen)
        rec["step"] = step
        if step % args.eval_every == 0 or step == args.steps:
            ev = evaluate(model, setup, args, seed + 2)
            evals.append(dict(step=step, **ev))
            rec.update({"eval_" + k: v for k, v in ev.items()})
        steps.append(rec)
        bar.set_postfix(
            arm="align" if align else "baseline",
            reward=f"{rec['reward']:+.2f}",
            cos=f"{rec['anchor_cosine']:.3f}",
        )
        bar.update(1)
    return {"align_weight": weight, "steps": steps, "evals": evals, "final": evals[-1]}


def main(args) -> int:
    problem = _check(args)
    if problem:
        print(f"hidden-align demo: {problem}", file=sys.stderr)
        return 2
    try:
        import tokenizers  # noqa: F401  (the demo's tokenizer is a real `tokenizers` one)
    except ImportError:
        print(
            "hidden-align demo: needs the tokenizers package (pip install tokenizers)",
            file=sys.stderr,
        )
        return 1
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a convenience: run without it
        tqdm = None
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _main(args, tqdm)
    finally:
        torch.set_num_threads(threads)


def _main(args, tqdm) -> int:
    device = torch.device(args.device)
    t0 = time.perf_counter()
    seeds = [args.seed + i for i in range(args.seeds)]
    total = args.seeds * (args.warmup_steps + len(ARMS) * args.steps)
    disable = args.quiet or tqdm is None
    bar = (tqdm if tqdm is not None else _NoBar)(
        total=total, disable=disable, desc="demo", unit="step", dynamic_ncols=True
    )
    runs = []
    with bar:
        for seed in seeds:
            torch.manual_seed(seed)
            setup = Setup.create(args, device)
            model = setup.model(args)
            bar.set_postfix(seed=seed, phase="warm-up")
            losses = warmup(model, setup, args, random.Random(f"sft/{seed}"), lambda: bar.update(1))
            start = evaluate(model, setup, args, seed + 2)
            state = copy.deepcopy(model.state_dict())
            arms = {
                name: _arm(args, setup, state, seed, name == "align", start, bar) for name in ARMS
            }
            runs.append({"seed": seed, "warmup_loss": losses, "start": start, "arms": arms})
    elapsed = time.perf_counter() - t0
    info = {"markers": setup.codec.markers, "vocab_size": setup.codec.vocab_size}
    info.update(prompt_len=setup.prompt_len, max_response=setup.max_response)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    result = report.build(args, runs, elapsed, info)
    print(report.table(result))
    if args.out:
        for line in report.write(result, args.out):
            print(line)
    return 0


class _NoBar:
    def __init__(self, **_):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass

    def set_postfix(self, **_):
        pass
