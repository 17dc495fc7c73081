"""The native forward of the alignment loss with the buffers it fills, allocated in one place
for its three callers: the eager loss, the torch.compile op and the anchor resolution of the
split loss."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from . import _native
from ._args import accumulator, detached
from ._backend import stream_of


class NativeForward(NamedTuple):
    """What ``_native.align_forward`` fills, plus its two return values."""

    num_groups: int  # B, an upper bound, on the kernel backend with group labels
    on_kernels: bool
    rows: torch.Tensor  # int64 [B]: flat anchor row per rollout
    groups: torch.Tensor  # int64 [B]: dense group per rollout
    correct: torch.Tensor  # bool [B]
    group_loss: torch.Tensor  # [B], first G entries used
    group_valid: torch.Tensor  # bool [B], first G entries used
    value: torch.Tensor  # 0-d loss
    mean_cosine: torch.Tensor  # 0-d
    counts: torch.Tensor  # int64 [2]: valid groups, anchored correct rollouts
    work: torch.Tensor  # float32 [ALIGN_WORK_ROWS, B], kernel scratch kept for the backward
    links: torch.Tensor  # int32 [ALIGN_LINK_ROWS B + 1], kernel scratch kept for the backward


def align_forward(
    hidden,
    mask,
    rewards,
    group_ids,
    group_size,
    cu_seqlens,
    loss_type: str,
    reduction: str,
    threshold: float,
    eps: float,
    tau: float,
    scratch: Callable = torch.empty,
) -> NativeForward:
    """Runs the native forward. ``scratch`` allocates the buffers a backend may leave partly
    unwritten (``group_loss``, ``group_valid``, ``work``, ``links``): ``torch.zeros`` where every
    output must be a function of the inputs."""
    batch = rewards.shape[0] if rewards.dim() == 1 else 0
    acc = accumulator(hidden.dtype)
    dev = hidden.device
    rows = torch.empty(batch, dtype=torch.int64, device=dev)
    groups = torch.empty(batch, dtype=torch.int64, device=dev)
    correct = torch.empty(batch, dtype=torch.bool, device=dev)
    group_loss = scratch(batch, dtype=acc, device=dev)
    group_valid = scratch(batch, dtype=torch.bool, device=dev)
    value = torch.empty((), dtype=acc, device=dev)
    mean_cosine = torch.empty((), dtype=acc, device=dev)
    counts = torch.empty(2, dtype=torch.int64, device=dev)
    work = scratch(_native.ALIGN_WORK_ROWS, batch, dtype=torch.float32, device=dev)
    links = scratch(_native.ALIGN_LINK_ROWS * batch + 1, dtype=torch.int32, device=dev)
    num_groups, on_kernels = _native.align_forward(
        hidden.detach(),
        mask.detach(),
        rewards.detach(),
        detached(group_ids),
        group_size,
        detached(cu_seqlens),
        loss_type,
        reduction,
        threshold,
        eps,
        tau,
        rows,
        groups,
        correct,
        group_loss,
        group_valid,
        value,
        mean_cosine,
        counts,
        work,
        links,
        stream_of(hidden),
    )
    return NativeForward(
        num_groups,
        on_kernels,
        rows,
        groups,
        correct,
        group_loss,
        group_valid,
        value,
        mean_cosine,
        counts,
        work,
        links,
    )
