"""The ``hidden_align`` policy loss against verl's ``vanilla``, both through verl's registry.

Each provider is ``verl.trainer.ppo.core_algos.get_policy_loss_fn(name)`` called as verl's
``ppo_loss`` calls it (keywords, bool response mask, the actor config with DAPO's clip settings
and ``global_batch_info`` filled as the engine fills it for one rank), forward and backward at
B=64, T=8192, metrics read as Python floats (verl: three ``.item()``; ours: one ``.tolist()``).
Timings are medians of interleaved rounds (one call of each provider per round, in rotating
order), so each ratio comes from one run in which both were measured together.

Usage: python benches/bench_verl_registry.py [--reps 20]   (needs verl 0.9.1)
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings

import torch
from common import interleaved_medians, ms, write_table

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from verl.trainer.ppo.core_algos import get_policy_loss_fn
        from verl.workers.config import ActorConfig

        import hidden_align.integrations.verl  # noqa: F401 - registers "hidden_align"
except ImportError as exc:
    sys.exit(f"benches/bench_verl_registry.py needs verl ({exc}): pip install verl==0.9.1")

BATCH, SEQ = 64, 8192
CASES = [("float32", mode) for mode in ("token-mean", "seq-mean-token-mean")] + [
    ("bfloat16", "token-mean")
]


def inputs(dtype):
    torch.manual_seed(0)
    logp = (-torch.rand(BATCH, SEQ) * 3).to(dtype)
    old = (logp.float() + (torch.rand(BATCH, SEQ) - 0.5) * 0.6).to(dtype)
    adv = torch.randn(BATCH, SEQ).to(dtype)
    mask = torch.arange(SEQ)[None, :] < torch.randint(SEQ // 2, SEQ + 1, (BATCH, 1))
    return logp, old, adv, mask


def config(mask):
    cfg = ActorConfig(
        strategy="fsdp",
        rollout_n=16,
        ppo_mini_batch_size=4,
        ppo_micro_batch_size_per_gpu=4,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=10.0,
    )
    # What verl's ppo_loss writes for each micro-batch (one rank, the micro-batch its mini-batch).
    cfg.global_batch_info.update(
        dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=BATCH, loss_scale_factor=None
    )
    return cfg


def step(name, logp, old, adv, mask, mode, cfg):
    x = logp.detach().requires_grad_()
    loss, metrics = get_policy_loss_fn(name)(
        old_log_prob=old,
        log_prob=x,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode=mode,
        config=cfg,
        rollout_is_weights=None,
    )
    loss.backward()
    assert all(isinstance(v, float) for v in metrics.values())
    return x.grad


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    rows = []
    for dtype_name, mode in CASES:
        logp, old, adv, mask = inputs(getattr(torch, dtype_name))
        args_of = (logp, old, adv, mask, mode, config(mask))
        fns = {
            name: functools.partial(step, name, *args_of) for name in ("vanilla", "hidden_align")
        }
        times = interleaved_medians(fns, args.reps, warmup=3)
        ratio = times["vanilla"] / times["hidden_align"]
        rows.append(
            (
                f"B={BATCH}, T={SEQ}, {dtype_name}",
                mode,
                ms(times["vanilla"]),
                ms(times["hidden_align"]),
                f"{ratio:.1f}x",
            )
        )
    print(
        write_table(
            "verl-registry-policy-loss",
            "Policy loss forward+backward through verl's registry, interleaved "
            f"(median of {args.reps})",
            ["shape", "loss_agg_mode", "vanilla ms", "hidden_align ms", "speed-up"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
