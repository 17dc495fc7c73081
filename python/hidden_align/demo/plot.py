"""``curves.png``: reward, held-out pass@1 and anchor cosine per step, both arms."""

from __future__ import annotations

import math

ARMS = (("baseline", "DAPO", "tab:blue"), ("align", "DAPO + align", "tab:orange"))


def _mean_curve(runs: list, arm: str, series: str, key: str) -> tuple:
    """Steps and the mean over seeds of a metric (NaN entries skipped)."""
    by_step: dict = {}
    for r in runs:
        for rec in r["arms"][arm][series]:
            v = rec.get(key)
            if v is not None and math.isfinite(v):
                by_step.setdefault(rec["step"], []).append(v)
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def plot(result: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    for arm, label, color in ARMS:
        axes[0].plot(*_mean_curve(runs, arm, "steps", "reward"), color=color, label=label)
        x, y = _mean_curve(runs, arm, "evals", "pass1_greedy")
        axes[1].plot(x, y, "o-", color=color, label=f"{label}, greedy")
        x, y = _mean_curve(runs, arm, "evals", "pass1_sampled")
        axes[1].plot(x, y, "s--", color=color, label=f"{label}, sampled")
        axes[2].plot(*_mean_curve(runs, arm, "steps", "anchor_cosine"), color=color, label=label)
    titles = ("mean reward (training rollouts)", "held-out pass@1", "anchor cosine (correct)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("DAPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    seeds = len(runs)
    fig.suptitle(f"hidden-align demo ({seeds} seed{'s' if seeds > 1 else ''}, mean)")
    fig.savefig(path, dpi=120)
    plt.close(fig)
