"""The demo's results: a summary per arm, the table, ``metrics.json`` and ``curves.png``."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics

ARMS = ("baseline", "align")
_FINAL = ("pass1_greedy", "pass1_sampled", "anchor_cosine")


def _finite(values) -> list:
    return [v for v in values if v is not None and math.isfinite(v)]


def _spread(values) -> dict:
    vals = _finite(values)
    if not vals:
        return {"mean": None, "std": None, "values": values}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "values": values}


def _edge(steps: list, key: str, last: bool, n: int = 3) -> float:
    """Mean of the first (or last) ``n`` defined values of a per-step metric."""
    vals = _finite(s[key] for s in steps)
    vals = vals[-n:] if last else vals[:n]
    return statistics.fmean(vals) if vals else float("nan")


def versions() -> dict:
    import torch

    import hidden_align

    out = {"hidden_align": hidden_align.__version__, "torch": torch.__version__}
    out["python"] = platform.python_version()
    try:
        import tokenizers

        out["tokenizers"] = tokenizers.__version__
    except ImportError:
        pass
    out["platform"] = platform.platform()
    return out


def build(args, runs: list, elapsed: float, info: dict) -> dict:
    summary = {"start": {k: _spread([r["start"][k] for r in runs]) for k in _FINAL}}
    for arm in ARMS:
        per = [r["arms"][arm] for r in runs]
        s = {k: _spread([p["final"][k] for p in per]) for k in _FINAL}
        s["train_anchor_cosine_first"] = _spread(
            [_edge(p["steps"], "anchor_cosine", 0) for p in per]
        )
        s["train_anchor_cosine_last"] = _spread(
            [_edge(p["steps"], "anchor_cosine", 1) for p in per]
        )
        secs = [sum(x["seconds"] for x in p["steps"]) for p in per]
        s["seconds_per_step"] = _spread([t / len(p["steps"]) for t, p in zip(secs, per)])
        share = [sum(x["align_seconds"] for x in p["steps"]) / t for t, p in zip(secs, per)]
        s["align_share"] = _spread(share)
        summary[arm] = s
    config = dict(vars(args))
    config.update(info)
    return {
        "config": config,
        "versions": versions(),
        "elapsed_seconds": elapsed,
        "summary": summary,
        "verdict": _verdict(summary, len(runs)),
        "runs": runs,
    }


def _verdict(summary: dict, n: int) -> dict:
    out = {}
    for key in ("pass1_greedy", "pass1_sampled"):
        diffs = [
            a - b
            for a, b in zip(summary["align"][key]["values"], summary["baseline"][key]["values"])
        ]
        d = _spread(diffs)
        out[key] = {"difference": d["mean"], "spread": d["std"], "beats": (d["mean"] or 0) > 0}
    first = summary["align"]["train_anchor_cosine_first"]["mean"]
    last = summary["align"]["train_anchor_cosine_last"]["mean"]
    start = summary["start"]["anchor_cosine"]["mean"]
    final = summary["align"]["anchor_cosine"]["mean"]
    rose = None not in (first, last) and last > first
    out["anchor_cosine_rises"] = bool(rose and None not in (start, final) and final > start)
    out["seeds"] = n
    return out


def _fmt(stat: dict, pct: bool = False, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "-"
    scale = 100.0 if pct else 1.0
    text = f"{stat['mean'] * scale:.{1 if pct else digits}f}"
    if len(stat["values"]) > 1:
        text += f" ± {stat['std'] * scale:.{1 if pct else digits}f}"
    return text + ("%" if pct else "")


def table(result: dict) -> str:
    cfg, summ, verdict = result["config"], result["summary"], result["verdict"]
    n = verdict["seeds"]
    head = (
        f"hidden-align demo: {cfg['digits']}-digit addition, {cfg['steps']} DAPO steps of "
        f"{cfg['prompts_per_step']} prompts x G={cfg['group_size']}, {n} seed(s), "
        f"{cfg['device']}, {result['elapsed_seconds']:.0f} s"
    )
    if n > 1:
        head += "  (mean ± std over seeds)"
    cols = ("arm", "pass@1 greedy", "pass@1 sampled", "anchor cos", "s/step", "align share")
    rows = [cols]
    start = summ["start"]
    rows.append(("after warm-up", *(_fmt(start[k]) for k in _FINAL), "-", "-"))
    for arm in ARMS:
        s = summ[arm]
        name = "DAPO" if arm == "baseline" else f"DAPO + align ({cfg['loss_type']})"
        share = _fmt(s["align_share"], pct=True) if arm == "align" else "-"
        rows.append(
            (name, *(_fmt(s[k]) for k in _FINAL), _fmt(s["seconds_per_step"], digits=2), share)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = [head, ""]
    for i, r in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))
            )
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(
        "anchor cos: mean pairwise cosine of the anchor hidden states of each held-out prompt's "
        "correct sampled rollouts"
    )
    for key, label in (("pass1_greedy", "greedy"), ("pass1_sampled", "sampled")):
        v = verdict[key]
        diff = 100 * (v["difference"] or 0.0)
        spread = f" (spread {100 * v['spread']:.1f})" if n > 1 else ""
        if v["beats"]:
            lines.append(
                f"pass@1 {label}: the alignment arm beats DAPO by {diff:+.1f} points{spread}"
            )
        else:
            lines.append(
                f"pass@1 {label}: the alignment arm does NOT beat DAPO ({diff:+.1f} points{spread})"
            )
    a = summ["align"]
    rises = "rises" if verdict["anchor_cosine_rises"] else "does NOT rise"
    lines.append(
        f"anchor cosine in the alignment arm {rises}: training rollouts "
        f"{_fmt(a['train_anchor_cosine_first'])} -> {_fmt(a['train_anchor_cosine_last'])}, "
        f"held-out {_fmt(start['anchor_cosine'])} -> {_fmt(a['anchor_cosine'])} "
        f"(DAPO alone: {_fmt(summ['baseline']['anchor_cosine'])})"
    )
    return "\n".join(lines)


def _clean(value):
    """NaN and inf become null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write(result: dict, out: str) -> list:
    """Writes ``metrics.json`` and ``curves.png`` into ``out``; returns lines to print."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "metrics.json")
    with open(path, "w") as f:
        json.dump(_clean(result), f, indent=1, allow_nan=False)
    lines = [f"wrote {path}"]
    try:
        import matplotlib
    except ImportError:
        lines.append("no plot: it needs matplotlib (pip install matplotlib)")
        return lines
    matplotlib.use("Agg")
    from .plot import plot

    png = os.path.join(out, "curves.png")
    plot(result, png)
    lines.append(f"wrote {png}")
    return lines
