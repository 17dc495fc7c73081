"""The split alignment loss over two data-parallel ranks (gloo): each rank holds different rows
and groups (some groups on both ranks, some on one), computes statistics over its micro-batches,
merges and all-reduces them, then computes its micro-batches' shares and their gradients. The
ranks' gradients summed equal the single-process full-batch gradient (float64, rel 1e-10)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hidden_align as ha

from cases import make_case

WORLD = 2
CONFIGS = [
    (loss_type, reduction, layout)
    for layout in ("padded", "packed")
    for loss_type in ("cosine", "centroid", "mse")
    for reduction in ("mean", "sum")
]


def rank_rows(labels: torch.Tensor, rewards: torch.Tensor) -> list:
    """Rows of each rank: groups 0 and 1 on rank 0 only, group 2 on rank 1 only, the other
    groups split across both (rank 1 also gets a row of group 0 that is not correct)."""
    groups = sorted(set(labels.tolist()))
    owner = {groups[0]: [0], groups[1]: [0], groups[2]: [1]}
    rows = [[], []]
    for b, g in enumerate(labels.tolist()):
        ranks = owner.get(g, [0, 1])
        rows[ranks[b % len(ranks)]].append(b)
    spare = [b for b in rows[0] if labels[b] == groups[0] and rewards[b] <= 0]
    if spare:
        rows[0].remove(spare[0])
        rows[1].append(spare[0])
    gen = torch.Generator().manual_seed(7)
    return [torch.tensor(r)[torch.randperm(len(r), generator=gen)] for r in rows]


def select(case, leaf, idx):
    """Rows ``idx`` as a micro-batch computed from ``leaf``: (hidden, anchors, rewards, ids, cu)."""
    rewards, gid = case.rewards[idx], case.labels[idx]
    if case.cu_seqlens is None:
        return leaf[idx], case.anchors[idx], rewards, gid, None
    cu = case.cu_seqlens
    starts, ends = cu[:-1][idx], cu[1:][idx]
    tokens = torch.cat([torch.arange(s, e) for s, e in zip(starts.tolist(), ends.tolist())])
    new_cu = torch.cat([torch.zeros(1, dtype=torch.long), (ends - starts).cumsum(0)])
    a = case.anchors[idx]
    anchors = torch.where(a >= 0, a - starts + new_cu[:-1], torch.full_like(a, -1))
    return leaf[tokens], anchors, rewards, gid, new_cu


def _worker(rank, init, cases, path):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        out = []
        for (loss_type, reduction, _), case in zip(CONFIGS, cases):
            mine = rank_rows(case.labels, case.rewards)[rank]
            # The no-grad pass and the update split the rank's rows differently.
            stats_parts = torch.split(mine, [3, len(mine) - 3])
            loss_parts = torch.split(mine.flip(0), [5, 1, len(mine) - 6])
            stats = None
            for idx in stats_parts:
                hidden, anchors, rewards, gid, cu = select(case, case.hidden, idx)
                s = ha.group_anchor_stats(hidden, anchors, rewards, group_ids=gid, cu_seqlens=cu)
                stats = s if stats is None else stats.merge(s)
            local_ids = stats.group_ids.clone()
            stats = stats.all_reduce()
            rows = stats.rows(case.labels)  # rank 1 uses the per-row form, split with its rows
            leaf = case.hidden.detach().clone().requires_grad_()
            total = torch.zeros((), dtype=torch.float64)
            for idx in loss_parts:
                hidden, anchors, rewards, gid, cu = select(case, leaf, idx)
                ref = stats if rank == 0 else rows[idx]
                value, report = ha.loss(
                    hidden,
                    anchors,
                    rewards,
                    group_ids=gid,
                    cu_seqlens=cu,
                    loss_type=loss_type,
                    reduction=reduction,
                    return_stats=True,
                    reference=ref,
                )
                value.backward()
                total = total + value.detach()
            out.append(
                {
                    "local_ids": local_ids,
                    "stats": (stats.group_ids, stats.count, stats.unit_sum, stats.raw_sum),
                    "value": total,
                    "grad": leaf.grad,
                    "report": {k: v.clone() for k, v in report.items()},
                }
            )
        torch.save(out, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_sum_to_the_full_batch_gradient(tmp_path):
    torch.manual_seed(3)
    cases = []
    for _, _, layout in CONFIGS:
        cases.append(
            make_case(batch=32, seq=6, hidden_size=7, group=4, layout=layout, correct_prob=0.75)
        )
    init = f"file://{tmp_path}/rendezvous"
    mp.spawn(_worker, args=(init, cases, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for i, ((loss_type, reduction, _), case) in enumerate(zip(CONFIGS, cases)):
        r0, r1 = ranks[0][i], ranks[1][i]
        # The ranks held different group-id sets; after the all-reduce both hold the union.
        assert not torch.equal(r0["local_ids"], r1["local_ids"])
        whole = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, **case.kwargs())
        for got in (r0["stats"], r1["stats"]):
            assert torch.equal(got[0], whole.group_ids) and torch.equal(got[1], whole.count)
            for a, b in zip(got[2:], (whole.unit_sum, whole.raw_sum)):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
        leaf = case.hidden.detach().clone().requires_grad_()
        full, report = ha.loss(
            leaf,
            case.anchors,
            case.rewards,
            loss_type=loss_type,
            reduction=reduction,
            return_stats=True,
            **case.kwargs(),
        )
        full.backward()
        # Some valid group has correct anchored rollouts on both ranks.
        part = (case.index >= 0) & (case.rewards > 0)
        held = [set(case.labels[r][part[r]].tolist()) for r in rank_rows(case.labels, case.rewards)]
        counts = dict(zip(whole.group_ids.tolist(), whole.count.tolist()))
        assert any(counts[g] >= 2 for g in held[0] & held[1])
        torch.testing.assert_close(r0["value"] + r1["value"], full, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(r0["grad"] + r1["grad"], leaf.grad, rtol=1e-10, atol=1e-13)
        for r in (r0, r1):
            torch.testing.assert_close(r["report"]["mean_cosine"], report["mean_cosine"])
            assert int(r["report"]["valid_groups"]) == int(report["valid_groups"])
            assert int(r["report"]["anchored_correct"]) == int(report["anchored_correct"])
