"""What the verl and OpenRLHF integrations share around their statistics pass: the reference
the update reads, the pass's parts merged and all-reduced over the data-parallel group, and
the agreement of the ranks before any collective when one of them failed.

A condition found on one rank only must not be raised there alone: the other ranks would
wait for it in their next collective until the process group times out. So each rank keeps
its first error, and the ranks agree in one small all-reduce
(:func:`hidden_align._collectives.agree_on_failure`): the failing rank raises its own error,
every other rank one that names it (:func:`peer_failed`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch

from .._collectives import agree_on_failure, all_reduce_stats

__all__ = ["Reference", "agree", "all_reduced_parts", "no_autocast", "peer_failed"]


class _RankFailure(RuntimeError):
    """A condition found on this rank, with the code the other ranks are told."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def peer_failed(where: str, reasons: dict) -> Callable:
    """The error of the ranks that did not fail, naming the one that did and why
    (``reasons``: code -> text)."""

    def make(rank: int, code: int, failed: list) -> Exception:
        return RuntimeError(
            f"hidden_align: data-parallel rank {rank} failed in the {where} "
            f"({reasons.get(code, f'code {code}')}; failing ranks: {failed}) and raised its "
            "own error there; this rank stops too instead of waiting for it in a collective"
        )

    return make


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def agree(process_group, device: Callable, failure, code: int, on_peer: Callable) -> None:
    """Every rank of ``process_group`` raises (``failure`` where it is this rank's), or none
    does: one small all-reduce. Without torch.distributed, ``failure`` is raised here.
    ``device`` is called for the exchange's device only when there is a process group."""
    if not _distributed():
        if failure is not None:
            raise failure
        return
    agree_on_failure(
        process_group, device(), failure, getattr(failure, "code", code), peer_failed=on_peer
    )


def all_reduced_parts(
    parts: list,
    failure,
    local_rows: int,
    *,
    process_group,
    device: Callable,
    empty: _RankFailure,
    code: int,
    on_peer: Callable,
) -> tuple:
    """``(statistics, rows)``: the pass's ``parts`` merged and all-reduced, and ``local_rows``
    summed, over ``process_group``; or, where any rank failed (``failure`` on this one; no
    part at all raises ``empty``), an error on every rank, agreed before the data collectives
    in the all-reduce that also sums the row counts. Other errors are told with ``code``."""
    stats = None
    if failure is None:
        try:
            if not parts:
                raise empty
            stats = parts[0].merge(*parts[1:])
        except Exception as exc:  # noqa: BLE001 - agreed with the other ranks below
            failure = exc
    if not _distributed():
        if failure is not None:
            raise failure
        return stats, local_rows
    return all_reduce_stats(
        stats,
        process_group,
        device=device(),
        failure=failure,
        code=getattr(failure, "code", code),
        extra=local_rows,
        peer_failed=on_peer,
    )


class Reference:
    """The all-reduced statistics of one pass and what the update needs of them."""

    def __init__(self, stats, total_rows: int, source: str | None = None) -> None:
        self.stats = stats
        self.total_rows = total_rows
        self.source = source
        # Host copies, read once per pass: they become metrics of every micro-batch.
        self.valid_groups = int(stats.valid_groups)
        self.mean_cosine = float(stats.mean_cosine) if self.valid_groups else math.nan


def no_autocast(device: torch.device):
    """Autocast off: the loss runs under the framework's autocast, and the ops pick their own
    precision."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()
