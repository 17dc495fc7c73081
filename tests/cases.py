"""Random inputs for the alignment tests: both layouts, both anchor forms, any grouping."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AlignCase:
    hidden: torch.Tensor
    anchors: torch.Tensor  # what ha.loss receives: a bool mask or int64 indices
    index: torch.Tensor  # [B] positions (padded) or rows (packed), -1 for none: for the reference
    rewards: torch.Tensor
    labels: torch.Tensor  # group label per rollout
    group_ids: torch.Tensor | None
    group_size: int | None
    cu_seqlens: torch.Tensor | None

    def kwargs(self) -> dict:
        return dict(
            group_ids=self.group_ids, group_size=self.group_size, cu_seqlens=self.cu_seqlens
        )


def make_case(
    batch=12,
    seq=7,
    hidden_size=5,
    group=4,
    layout="padded",
    anchor_form="index",
    grouping="ids",
    dtype=torch.float64,
    anchor_prob=0.85,
    correct_prob=0.6,
    correct: list | None = None,
) -> AlignCase:
    if layout == "padded":
        hidden = torch.randn(batch, seq, hidden_size, dtype=torch.float64).to(dtype)
        lengths = torch.full((batch,), seq)
        starts = torch.zeros(batch, dtype=torch.long)
        cu = None
    else:
        lengths = torch.randint(1, seq + 1, (batch,))
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        hidden = torch.randn(int(cu[-1]), hidden_size, dtype=torch.float64).to(dtype)
        starts = cu[:-1]
    pos = (torch.rand(batch) * lengths).long()
    has = torch.rand(batch) < anchor_prob
    index = torch.where(has, starts + pos, torch.full_like(pos, -1))
    if correct is None:
        correct_t = torch.rand(batch) < correct_prob
    else:
        correct_t = torch.tensor(correct, dtype=torch.bool)
    rewards = torch.where(correct_t, 1.0, -1.0)  # DAPO scores
    num_groups = batch // group
    if grouping == "ids":
        labels = (torch.arange(batch) // group) * 7 + 3
        labels = labels[torch.randperm(batch)]
        group_ids, group_size = labels, None
    else:
        labels = torch.arange(batch) // group
        group_ids, group_size = None, group
    assert num_groups * group == batch
    if anchor_form == "index":
        anchors = index
        if layout == "padded":
            anchors = index  # positions in T
    elif layout == "padded":
        anchors = torch.zeros(batch, seq, dtype=torch.bool)
        anchors[has, pos[has]] = True
    else:
        anchors = torch.zeros(hidden.shape[0], dtype=torch.bool)
        anchors[index[has]] = True
    return AlignCase(hidden, anchors, index, rewards, labels, group_ids, group_size, cu)


def consumer_of(root, target):
    """The autograd node under ``root`` with an edge into ``target``: e.g. the LM head's last op
    on hidden, whose gradient input is the head's gradient w.r.t. hidden."""
    todo, seen = [root], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nexts = [n for n, _ in node.next_functions]
        if target in nexts:
            return node
        todo.extend(nexts)
    raise AssertionError("no consumer found")
