"""Collectives that agree on failure first: a rank that raised between collectives would
leave the others blocked in their next one until the process group times out.

:func:`agree_on_failure` is one small all-reduce in which every rank says whether it failed;
:func:`all_reduce_stats` is :meth:`GroupAnchorStats.all_reduce` built on it (the verl
integration calls it with its own rank-local failures)."""

from __future__ import annotations

import struct

import torch

from .errors import ArgumentError, DtypeError, ShapeError
from .stats import _LOCAL_BLOCKS_REFUSED, GroupAnchorStats, _zeros_like_stats

__all__ = ["agree_on_failure", "all_reduce_stats"]

# ---- agreeing before collectives --------------------------------------------------------------
#
# A rank that raised between collectives would leave the others blocked in their next one until
# the process group times out. So every pass of collectives starts with one small all-reduce in
# which each rank writes its row (the others are zeros; a sum gives every rank every row): its
# failure code (0 when fine) and what the others must agree with. Then every rank raises, or
# none does. Columns of a row:
_CODE, _GROUPS, _WIDTH, _DTYPE, _EPS, _THRESHOLD, _LOCAL, _EXTRA = range(8)
_DTYPE_CODES = {torch.float32: 1, torch.float64: 2}
_DTYPE_NAMES = {code: str(dtype) for dtype, code in _DTYPE_CODES.items()}


def _bits(x: float) -> int:
    """A float's IEEE bits as an int64: exact equality through an integer all-reduce."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _float_of(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _require_distributed():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ArgumentError(
            "process_group: torch.distributed is not initialised "
            "(call torch.distributed.init_process_group first)"
        )
    return dist


def _peer_failed_default(rank: int, code: int, failed: list) -> Exception:
    return ArgumentError(
        f"process_group: rank {rank} failed before the collectives (code {code}; ranks "
        f"{failed} in all) and raised its own error; every rank stops here"
    )


def agree_on_failure(
    process_group,
    device,
    failure: BaseException | None = None,
    code: int = 1,
    *,
    stats: GroupAnchorStats | None = None,
    extra: int = 0,
    peer_failed=None,
) -> list:
    """One small all-reduce in which every rank of ``process_group`` says whether it failed;
    then either every rank raises or none does.

    A collective: every rank must call it at the same point. Where a rank failed, it raises
    ``failure`` (its own error) and every other rank ``peer_failed(rank, code, failed)`` for
    the lowest failing rank: an error naming that rank and its ``code``. Where none failed,
    it returns the exchanged rows.

    Args:
        process_group: a ``torch.distributed`` process group, or None for the world.
        device: where the exchanged tensor lives (a CUDA device for NCCL).
        failure: this rank's exception, or None.
        code: a positive number saying what failed, passed to the other ranks' error.
        stats: this rank's statistics, whose group count, hidden size, dtype, ``eps``,
            ``threshold`` and grouping travel in the same all-reduce (for
            :meth:`GroupAnchorStats.all_reduce`), or None.
        extra: an integer to sum over the ranks in the same all-reduce (a row count).
        peer_failed: ``(rank, code, failed ranks) -> Exception``; None gives an
            ``ArgumentError``.

    Returns:
        Per rank, the list ``[code, groups, hidden size, dtype, eps bits, threshold bits,
        local_blocks, extra]`` (zeros where ``stats`` was None).
    """
    dist = _require_distributed()
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    row = [0] * 8
    if failure is not None:
        row[_CODE] = max(int(code), 1)
    if stats is not None:
        row[_GROUPS] = stats.num_groups
        row[_WIDTH] = stats.hidden_size
        row[_DTYPE] = _DTYPE_CODES[stats.dtype]
        row[_EPS], row[_THRESHOLD] = _bits(stats.eps), _bits(stats.threshold)
        row[_LOCAL] = int(stats.local_blocks)
    row[_EXTRA] = int(extra)
    table = torch.zeros(world, len(row), dtype=torch.int64, device=device)
    table[rank] = torch.tensor(row, dtype=torch.int64).to(device)
    dist.all_reduce(table, op=dist.ReduceOp.SUM, group=process_group)
    rows = table.tolist()  # one host read: every rank decides the same from the same rows
    if failure is not None:
        raise failure
    failed = [r for r, values in enumerate(rows) if values[_CODE]]
    if failed:
        raise (peer_failed or _peer_failed_default)(failed[0], rows[failed[0]][_CODE], failed)
    return rows


def _by_rank(rows: list, column: int, show=str) -> str:
    """``"3 (rank 0), 4 (ranks 1, 2)"``: each value of ``column`` and the ranks that hold it
    (at most four named per value)."""
    ranks: dict = {}
    for r, values in enumerate(rows):
        ranks.setdefault(values[column], []).append(r)
    parts = []
    for value, held in ranks.items():
        names = ", ".join(map(str, held[:4])) + (", ..." if len(held) > 4 else "")
        parts.append(f"{show(value)} (rank{'s' if len(held) > 1 else ''} {names})")
    return ", ".join(parts)


def _check_ranks_agree(rows: list) -> None:
    """Raises, the same error on every rank, where the ranks' statistics cannot be added."""
    if len(rows) > 1 and any(values[_LOCAL] for values in rows):
        local = [r for r, values in enumerate(rows) if values[_LOCAL]]
        raise ArgumentError(
            _LOCAL_BLOCKS_REFUSED.format(
                what=f"all_reduce() over {len(rows)} ranks of",
                why=f"those of rank(s) {local} cannot be matched with another rank's groups",
            )
        )
    if len({values[_WIDTH] for values in rows}) > 1:
        raise ShapeError(
            "process_group: the ranks hold statistics of different hidden sizes: "
            + _by_rank(rows, _WIDTH)
        )
    if len({values[_DTYPE] for values in rows}) > 1:
        raise DtypeError(
            "process_group: the ranks hold statistics in different dtypes: "
            + _by_rank(rows, _DTYPE, _DTYPE_NAMES.get)
        )
    for column, name in ((_EPS, "eps"), (_THRESHOLD, "threshold")):
        if len({values[column] for values in rows}) > 1:
            raise ArgumentError(
                f"process_group: the ranks computed their statistics with different {name}: "
                + _by_rank(rows, column, _float_of)
            )


def all_reduce_stats(
    stats: GroupAnchorStats | None,
    process_group=None,
    *,
    device=None,
    failure: BaseException | None = None,
    code: int = 1,
    extra: int = 0,
    peer_failed=None,
) -> tuple:
    """:meth:`GroupAnchorStats.all_reduce` for callers that may have failed on this rank
    before it (the verl integration): the failure is agreed on first
    (:func:`agree_on_failure`), in the same small all-reduce that exchanges the group counts
    and sums ``extra``. ``stats`` may be None only with a ``failure``; ``device`` is used when
    it is None.

    Returns:
        ``(statistics of all ranks, sum of extra over the ranks)``.
    """
    if stats is None and failure is None:
        # Raised alone, after the agreement, this rank would leave the others waiting.
        failure = ArgumentError("stats: expected GroupAnchorStats, got None")
    dev = stats.device if stats is not None else torch.device(device)
    rows = agree_on_failure(
        process_group,
        dev,
        failure,
        code,
        stats=stats,
        extra=extra,
        peer_failed=peer_failed,
    )
    _check_ranks_agree(rows)
    dist = _require_distributed()
    world = len(rows)
    counts = [values[_GROUPS] for values in rows]
    total = sum(values[_EXTRA] for values in rows)
    width = max(max(counts), 1)
    ids = torch.zeros(width, dtype=torch.int64, device=dev)
    ids[: stats.num_groups] = stats.group_ids
    gathered = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(gathered, ids, group=process_group)
    union = torch.unique(torch.cat([g[:k] for g, k in zip(gathered, counts)]))
    # With one rank the result keeps local_blocks; with several, the check above refused it.
    out = _zeros_like_stats(stats, union)
    if union.numel() == 0:
        return out, total  # the same on every rank: nothing to reduce anywhere
    pos = torch.searchsorted(union, stats.group_ids)
    hs = stats.hidden_size
    # One float buffer for the three sums: one all-reduce instead of three.
    floats = torch.zeros(union.numel(), 2 * hs + 1, dtype=stats.dtype, device=dev)
    floats[pos, :hs] = stats.unit_sum
    floats[pos, hs : 2 * hs] = stats.raw_sum
    floats[pos, 2 * hs] = stats.sq_norm_sum
    out.count[pos] = stats.count
    dist.all_reduce(floats, op=dist.ReduceOp.SUM, group=process_group)
    dist.all_reduce(out.count, op=dist.ReduceOp.SUM, group=process_group)
    out.unit_sum = floats[:, :hs].contiguous()
    out.raw_sum = floats[:, hs : 2 * hs].contiguous()
    out.sq_norm_sum = floats[:, 2 * hs].contiguous()
    return out, total
