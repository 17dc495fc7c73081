"""``hidden-align demo``: DAPO on a small transformer, without and with the alignment term.

Everything is built in code (task, tokenizer, model); nothing is downloaded. The CLI calls
:func:`add_arguments` on its ``demo`` sub-parser and :func:`run` with the parsed arguments.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options; the defaults give the run of a few minutes on a 2-core CPU."""
    add = parser.add_argument
    add("--steps", type=int, default=80, help="DAPO steps per arm (default 80)")
    add("--seed", type=int, default=0, help="first seed (default 0)")
    add("--seeds", type=int, default=1, help="repeat both arms over N seeds (default 1)")
    add("--device", default="cpu", help="torch device (default cpu)")
    add("--align-weight", type=float, default=0.1, help="alignment term weight (default 0.1)")
    add(
        "--loss-type",
        default="cosine",
        choices=["cosine", "centroid", "mse"],
        help="alignment loss (default cosine; contrastive has no exact micro-batch split)",
    )
    add("--out", default=None, help="folder for metrics.json and curves.png")
    add("--quiet", action="store_true", help="no progress bar")
    sizes = parser.add_argument_group("demo sizes")
    sizes.add_argument("--digits", type=int, default=2, help="operand digits (default 2)")
    sizes.add_argument("--prompts-per-step", type=int, default=16, help="prompts per step")
    sizes.add_argument("--group-size", type=int, default=8, help="rollouts per prompt (G)")
    sizes.add_argument("--micro-batch", type=int, default=32, help="rollouts per micro-batch")
    sizes.add_argument("--warmup-steps", type=int, default=300, help="supervised steps")
    sizes.add_argument("--warmup-batch", type=int, default=64, help="supervised batch")
    sizes.add_argument("--warmup-lr", type=float, default=3e-3, help="supervised lr")
    sizes.add_argument("--lr", type=float, default=5e-4, help="DAPO lr")
    sizes.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    sizes.add_argument("--overlong-buffer", type=int, default=4, help="DAPO overlong buffer")
    sizes.add_argument("--overlong-factor", type=float, default=1.0, help="overlong penalty")
    sizes.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    sizes.add_argument("--eval-size", type=int, default=128, help="held-out problems")
    sizes.add_argument("--eval-samples", type=int, default=4, help="sampled rollouts each")
    sizes.add_argument("--eval-every", type=int, default=10, help="evaluate every N steps")
    sizes.add_argument("--d-model", type=int, default=64, help="model width")
    sizes.add_argument("--layers", type=int, default=2, help="transformer blocks")
    sizes.add_argument("--heads", type=int, default=4, help="attention heads")
    sizes.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the model is so small that more threads mostly "
        "wait on each other; 0 keeps torch's default)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code (0; 2 for invalid arguments; 1 without the
    tokenizers package)."""
    from .runner import main

    return main(args)
