"""Label loads the group-resolving kernels make at batch size B: the quadratic scans they
replaced against the one-block sort (kernels/common.cuh `block_sort_by_key` and
`runs_of_sorted`), counted by a model that follows the kernels' loops.

    python scripts/group_resolution_cost.py [B ...]
"""

from __future__ import annotations

import sys

BLOCK = 256


def quadratic_scans(b: int, groups: int) -> dict[str, int]:
    """Per-rollout scans over the whole batch, as the kernels did before the sort."""
    return {
        # align_prepare: every block reads all B labels (leader and next member).
        "align_prepare": b * b,
        # group_forward: each leader's block reads all B labels (its dense index).
        "align_groups": groups * b,
        # group_advantages: each thread tests every rollout twice (mean, then variance).
        "dapo_group_advantages": 2 * b * b,
        # dynamic_sampling: each thread tests every rollout once.
        "dapo_dynamic_sampling": b * b,
    }


def merge_sort_loads(n: int) -> tuple[int, int]:
    """Label loads (an upper bound: binary searches counted at their longest) and the longest
    per-thread step count of block_sort_by_key."""
    loads, steps = 0, 0
    share = -(-n // BLOCK)
    w = 1
    while w < n:
        worst = 0
        for t in range(BLOCK):
            o, end = t * share, min((t + 1) * share, n)
            thread_steps = 0
            while o < end:
                s = o // (2 * w) * (2 * w)
                la = w if s + w < n else n - s
                lb = w if s + 2 * w < n else max(n - s - la, 0)
                d = o - s
                lo, hi = max(d - lb, 0), min(d, la)
                # binary search along the merge path (at most this many halvings): 2 keys each
                halvings = (hi - lo).bit_length()
                loads += 2 * halvings
                thread_steps += halvings
                stop = min(end, s + la + lb)
                loads += 2 * (stop - o)  # each output compares two keys
                thread_steps += stop - o
                o = stop
            worst = max(worst, thread_steps)
        steps += worst
        w *= 2
    return loads, steps


def sorted_runs(b: int, groups: int) -> dict[str, int]:
    sort, _ = merge_sort_loads(b)
    runs = 2 * b + 3 * b  # runs_of_sorted: a counting pass (2 keys) and a writing pass (3)
    return {
        "align_resolve_groups": sort + runs,
        "align_prepare": 0,
        "align_groups": 0,
        # one thread per group start: 2 keys to test the start, 1 per member for the run end
        "dapo_resolve+group_advantages": sort + 2 * b + b,
        "dapo_resolve+dynamic_sampling": sort + 2 * b + b,
    }


def main(sizes: list[int]) -> None:
    for b in sizes:
        groups = b // 16
        old = quadratic_scans(b, groups)
        new = sorted_runs(b, groups)
        _, steps = merge_sort_loads(b)
        old_align = old["align_prepare"] + old["align_groups"]
        new_align = new["align_resolve_groups"]
        print(f"B = {b} ({groups} groups of 16)")
        print(
            f"  alignment forward label loads: {old_align:>13,} -> {new_align:>10,}"
            f"  ({old_align / new_align:,.0f}x fewer)"
        )
        for op in ("group_advantages", "dynamic_sampling"):
            o, n = old[f"dapo_{op}"], new[f"dapo_resolve+{op}"]
            print(f"  {op:<29} {o:>13,} -> {n:>10,}  ({o / n:,.0f}x fewer)")
        print(f"  sort: {steps} steps on the longest thread of its one block")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [256, 8192, 65536])
