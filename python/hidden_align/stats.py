"""Full-group reference statistics: the alignment loss split exactly over micro-batches and ranks.

verl and OpenRLHF run a batch as micro-batches on several data-parallel ranks, and reorder its
rows, so a prompt's correct rollouts are rarely in one forward. The loss of a group depends on
all of them, but only through a few sums (docs/design.md section 4). :func:`group_anchor_stats`
computes those sums in a no-grad pass (the one that computes old log-probs already runs every
row); :meth:`GroupAnchorStats.merge` and :meth:`GroupAnchorStats.all_reduce` complete them over
micro-batches and ranks; ``hidden_align.loss(..., reference=stats)`` then returns one
micro-batch's share of the full-batch loss. The shares of any split of the batch sum to the
full-batch value and gradient (exactly when the statistics come from the same parameters, as
with one optimiser step per batch; like PPO's old log-probs otherwise).

A framework that dispatches rows to workers as tensors (verl's ``DataProto``) can carry the
reference with the rows: :meth:`GroupAnchorStats.rows` gives a :class:`RowReference` of
ordinary ``[B, ...]`` tensors, and :meth:`RowReference.to_dict` the entries to store in the
batch; any subset of rows still carries what its share needs.
"""

from __future__ import annotations

import torch

from ._args import (
    accumulator,
    as_float,
    check_anchor_inputs,
    check_bool,
    check_choice,
    group_ids_on,
    require_tensor,
    same_device,
)
from ._share import gather_anchor_rows, resolve_anchors, unit_rows
from .errors import ArgumentError, DeviceError, DtypeError, ShapeError
from .row_reference import RowReference

__all__ = ["GroupAnchorStats", "group_anchor_stats"]

_SUM_OF = {"cosine": "unit_sum", "centroid": "unit_sum", "mse": "raw_sum"}

# What to do instead of combining statistics whose ids are local block numbers; the same
# remedy as the loss gives for group_size with a reference (hidden_align/_reference_loss.py).
GROUP_IDS_REMEDY = (
    "pass group_ids=torch.arange(start, start + B) // group_size instead, start being the "
    "index of the call's first row in the full batch"
)
_LOCAL_BLOCKS_REFUSED = (
    "group_size: {what} statistics made with group_anchor_stats(group_size=...), whose group "
    "ids number the blocks of that call's rows from 0: they are the full batch's groups only "
    "for a call that saw the whole batch, so {why}; " + GROUP_IDS_REMEDY
)


def _lookup(sorted_ids: torch.Tensor, ids: torch.Tensor):
    """``(pos, found)``: where each of ``ids`` sits in ``sorted_ids`` (clamped to a valid
    position when absent) and whether it is there; no host read."""
    if sorted_ids.numel() == 0:
        return torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    # contiguous: searchsorted copies (and warns about) a strided input itself.
    pos = torch.searchsorted(sorted_ids, ids.contiguous()).clamp_max(sorted_ids.numel() - 1)
    return pos, sorted_ids[pos] == ids


def _take(t: torch.Tensor, pos: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """``t[pos]`` where found, zeros elsewhere (``t`` may have no rows at all)."""
    shape = (pos.shape[0],) + tuple(t.shape[1:])
    if t.shape[0] == 0:
        return torch.zeros(shape, dtype=t.dtype, device=t.device)
    picked = t[pos]
    keep = found.view((-1,) + (1,) * (picked.dim() - 1))
    return torch.where(keep, picked, torch.zeros((), dtype=t.dtype, device=t.device))


class GroupAnchorStats:
    """Per-group sums of the correct anchored rollouts, for exact split alignment losses.

    Attributes (tensors on one device, sums in the accumulator dtype: float64 for float64
    ``hidden``, float32 otherwise):
        group_ids: int64 ``[G]``, sorted and unique: every group seen, with or without a
            correct anchored rollout.
        unit_sum: ``[G, H]`` sum of unit anchors ``u = h / max(||h||, eps)`` (``S_g``).
        raw_sum: ``[G, H]`` sum of raw anchor states (``R_g``, for ``mse``).
        sq_norm_sum: ``[G]`` sum of ``||u||^2`` (equals the count unless a state's norm was
            clamped; kept so that the diagnostic is exact).
        count: int64 ``[G]`` number of correct anchored rollouts (``n_g``).
        eps, threshold: the options the sums were computed with; a loss using them must use
            the same.
        local_blocks: True when ``group_ids`` are the local block numbers of one
            ``group_anchor_stats(group_size=...)`` call (``0, 1, ...`` from that call's first
            row): they are the batch's groups only when that call saw the whole batch, so
            :meth:`merge` of several parts and :meth:`all_reduce` over several ranks refuse
            them (``ArgumentError``).

    Build it with :func:`group_anchor_stats`; combine with :meth:`merge` (micro-batches) and
    :meth:`all_reduce` (ranks). Every method returns a new object.
    """

    def __init__(
        self,
        group_ids: torch.Tensor,
        unit_sum: torch.Tensor,
        raw_sum: torch.Tensor,
        sq_norm_sum: torch.Tensor,
        count: torch.Tensor,
        *,
        eps: float = 1e-8,
        threshold: float = 0.5,
        local_blocks: bool = False,
    ) -> None:
        for name, t in [
            ("group_ids", group_ids),
            ("unit_sum", unit_sum),
            ("raw_sum", raw_sum),
            ("sq_norm_sum", sq_norm_sum),
            ("count", count),
        ]:
            require_tensor(name, t)
        same_device(
            ("group_ids", group_ids),
            ("unit_sum", unit_sum),
            ("raw_sum", raw_sum),
            ("sq_norm_sum", sq_norm_sum),
            ("count", count),
        )
        if group_ids.dim() != 1:
            raise ShapeError(f"group_ids: expected [G], got {tuple(group_ids.shape)}")
        num = group_ids.shape[0]
        if unit_sum.dim() != 2 or unit_sum.shape[0] != num or raw_sum.shape != unit_sum.shape:
            raise ShapeError(
                f"unit_sum, raw_sum: expected [{num}, H] each, got {tuple(unit_sum.shape)} "
                f"and {tuple(raw_sum.shape)}"
            )
        if sq_norm_sum.shape != (num,) or count.shape != (num,):
            raise ShapeError(
                f"sq_norm_sum, count: expected [{num}] each, got {tuple(sq_norm_sum.shape)} "
                f"and {tuple(count.shape)}"
            )
        if group_ids.dtype != torch.int64 or count.dtype != torch.int64:
            raise DtypeError("group_ids, count: expected int64 tensors")
        if unit_sum.dtype not in (torch.float32, torch.float64) or not (
            raw_sum.dtype == sq_norm_sum.dtype == unit_sum.dtype
        ):
            raise DtypeError("unit_sum, raw_sum, sq_norm_sum: expected one of float32, float64")
        self.group_ids = group_ids
        self.unit_sum = unit_sum
        self.raw_sum = raw_sum
        self.sq_norm_sum = sq_norm_sum
        self.count = count
        self.eps = as_float("eps", eps)
        self.threshold = as_float("threshold", threshold)
        self.local_blocks = check_bool("local_blocks", local_blocks)

    # ---- properties ---------------------------------------------------------------------

    @property
    def num_groups(self) -> int:
        return self.group_ids.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.unit_sum.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.unit_sum.dtype

    @property
    def device(self) -> torch.device:
        return self.unit_sum.device

    @property
    def valid(self) -> torch.Tensor:
        """bool ``[G]``: groups with at least two correct anchored rollouts."""
        return self.count >= 2

    @property
    def valid_groups(self) -> torch.Tensor:
        """int64 0-d: number of valid groups (the divisor of ``reduction="mean"``)."""
        return self.valid.sum()

    @property
    def anchored_correct(self) -> torch.Tensor:
        """int64 0-d: number of correct anchored rollouts."""
        return self.count.sum()

    @property
    def pair_cosine(self) -> torch.Tensor:
        """``[G]`` mean pairwise cosine ``(||S||^2 - Q) / (n (n - 1))``, held to [-1, 1] as the
        kernels hold it (rounding can pass 1 for identical anchors); NaN or +-1 for groups that
        are not valid."""
        n = self.count.to(self.dtype)
        sq = (self.unit_sum * self.unit_sum).sum(-1)
        return ((sq - self.sq_norm_sum) / (n * (n - 1))).clamp(-1.0, 1.0)

    @property
    def mean_cosine(self) -> torch.Tensor:
        """0-d: mean pairwise cosine of correct anchors over valid groups, NaN when there is
        none: the ``mean_cosine`` statistic of :func:`hidden_align.loss` on the full batch."""
        valid = self.valid
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        total = torch.where(valid, self.pair_cosine, zero).sum()
        return total / valid.sum().to(self.dtype)

    def __repr__(self) -> str:
        local = ", local_blocks=True" if self.local_blocks else ""
        return (
            f"GroupAnchorStats({self.num_groups} groups, H={self.hidden_size}, {self.dtype}, "
            f"{self.device}, eps={self.eps}, threshold={self.threshold}{local})"
        )

    # ---- combining ----------------------------------------------------------------------

    def _check_compatible(self, other: GroupAnchorStats) -> None:
        if not isinstance(other, GroupAnchorStats):
            raise ArgumentError(f"other: expected GroupAnchorStats, got {type(other).__name__}")
        if other.hidden_size != self.hidden_size:
            raise ShapeError(
                f"other: expected stats of hidden size {self.hidden_size}, got {other.hidden_size}"
            )
        if other.dtype != self.dtype:
            raise DtypeError(f"other: expected stats in {self.dtype}, got {other.dtype}")
        if other.device != self.device:
            raise DeviceError(f"other: expected stats on {self.device}, got {other.device}")
        if (other.eps, other.threshold) != (self.eps, self.threshold):
            raise ArgumentError(
                f"other: computed with eps={other.eps}, threshold={other.threshold}; "
                f"expected eps={self.eps}, threshold={self.threshold}"
            )

    def merge(self, *others: GroupAnchorStats) -> GroupAnchorStats:
        """The statistics of the union of the rows behind ``self`` and ``others`` (disjoint
        rows, e.g. the micro-batches of one no-grad pass): group ids united, sums added.

        Each group's sums are added in argument order (deterministic on every device). On
        CUDA, uniting the ids reads their number on the host (one synchronisation).

        Statistics made with ``group_size`` (:attr:`local_blocks`) are refused
        (``ArgumentError``) when there are several parts: each part numbers its own blocks from
        0, so equal ids would add unrelated groups together.

        Args:
            others: statistics of other rows, made with the same ``eps`` and ``threshold``.

        Returns:
            The merged statistics (``self`` unchanged).
        """
        for other in others:
            self._check_compatible(other)
        parts = (self,) + others
        if len(parts) > 1 and any(p.local_blocks for p in parts):
            raise ArgumentError(
                _LOCAL_BLOCKS_REFUSED.format(
                    what="merge() of",
                    why="the blocks numbered 0, 1, ... of different parts are different groups",
                )
            )
        union = torch.unique(torch.cat([p.group_ids for p in parts]))
        out = _zeros_like_stats(self, union)
        for p in parts:
            pos = torch.searchsorted(union, p.group_ids)
            # Positions are unique within one part: no two rows of an add collide.
            out.unit_sum.index_add_(0, pos, p.unit_sum)
            out.raw_sum.index_add_(0, pos, p.raw_sum)
            out.sq_norm_sum.index_add_(0, pos, p.sq_norm_sum)
            out.count.index_add_(0, pos, p.count)
        return out

    def all_reduce(self, process_group=None) -> GroupAnchorStats:
        """The statistics over every rank of ``process_group`` (default: the world).

        A collective: every rank of the group must call it, in the same order as its other
        collectives. Ranks may hold different group-id sets; the result holds their union, in
        sorted order, and is the same on every rank. Four collectives: a small all-reduce in
        which the ranks exchange their group counts and check that they agree on the hidden
        size, the dtype, ``eps``, ``threshold`` and the grouping (statistics made with
        ``group_size`` are refused over several ranks); an all-gather of the ids (padded to
        the largest count; the union is built on the host); one sum all-reduce of the sums and
        one of the counts. When the ranks disagree, every rank raises the same error
        (``ShapeError``, ``DtypeError`` or ``ArgumentError``) before the data collectives,
        instead of one rank raising while the others wait for it. Tensors stay on the stats'
        device (CUDA for NCCL).

        Args:
            process_group: a ``torch.distributed`` process group, or None for the world.

        Returns:
            The statistics of all ranks' rows.
        """
        from ._collectives import all_reduce_stats  # torch.distributed: only where it is used

        return all_reduce_stats(self, process_group)[0]

    def to(self, device) -> GroupAnchorStats:
        """The same statistics on ``device``."""
        return GroupAnchorStats(
            self.group_ids.to(device),
            self.unit_sum.to(device),
            self.raw_sum.to(device),
            self.sq_norm_sum.to(device),
            self.count.to(device),
            eps=self.eps,
            threshold=self.threshold,
            local_blocks=self.local_blocks,
        )

    # ---- per-row form -------------------------------------------------------------------

    def lookup(self, group_ids: torch.Tensor):
        """``(pos, found)`` ``[B]``: each id's position in :attr:`group_ids` and whether the
        statistics have it (``pos`` is clamped to a valid index where not). No host read.
        ``group_ids`` may also be uid strings (:func:`hidden_align.dapo.group_ids_from_uids`).
        """
        group_ids = group_ids_on(group_ids, self.unit_sum)
        require_tensor("group_ids", group_ids)
        if group_ids.dtype == torch.int32:
            group_ids = group_ids.long()
        if group_ids.dtype != torch.int64:
            raise DtypeError(f"group_ids: expected int64 or int32, got {group_ids.dtype}")
        if group_ids.dim() != 1:
            raise ShapeError(f"group_ids: expected [B], got {tuple(group_ids.shape)}")
        same_device(("stats", self.unit_sum), ("group_ids", group_ids))
        return _lookup(self.group_ids, group_ids)

    def rows(self, group_ids: torch.Tensor, loss_type: str | None = None) -> RowReference:
        """The reference of rollouts with these group ids, one row each (:class:`RowReference`).

        ``loss_type`` (``"cosine"``, ``"centroid"`` or ``"mse"``) keeps only the sum that loss
        needs (``[B, H]`` instead of two); None keeps both. A group the statistics do not
        have gets count 0: a correct anchored rollout of it is an error of the loss.
        """
        check_choice("loss_type", loss_type, tuple(_SUM_OF), optional=True)
        group_ids = group_ids_on(group_ids, self.unit_sum)
        if isinstance(group_ids, torch.Tensor) and group_ids.dtype == torch.int32:
            group_ids = group_ids.long()
        pos, found = self.lookup(group_ids)
        batch = pos.shape[0]
        keep = set(_SUM_OF.values()) if loss_type is None else {_SUM_OF[loss_type]}
        return RowReference(
            group_id=group_ids.clone(),
            count=_take(self.count, pos, found),
            valid_groups=self.valid_groups.expand(batch).clone(),
            anchored_correct=self.anchored_correct.expand(batch).clone(),
            mean_cosine=self.mean_cosine.expand(batch).clone(),
            unit_sum=_take(self.unit_sum, pos, found) if "unit_sum" in keep else None,
            raw_sum=_take(self.raw_sum, pos, found) if "raw_sum" in keep else None,
        )


def _group_sums(values: list, inverse: torch.Tensor, num: int) -> list:
    """Per group the sum of the rows of each tensor in ``values`` (``[B, ...]``), group of row b
    ``inverse[b]``, in a fixed order on every device: the rows are laid out as
    ``[G, max group size, ...]`` (zeros where a group is smaller) and summed along the middle
    dimension, a deterministic reduction, where ``index_add_`` would add with float atomics on
    CUDA. Reads the largest group size on the host. Memory: G times the largest group size
    rows of each tensor (B rows when groups have equal sizes)."""
    dev = inverse.device
    if inverse.numel() == 0:
        return [torch.zeros((num,) + tuple(v.shape[1:]), dtype=v.dtype, device=dev) for v in values]
    sizes = torch.bincount(inverse, minlength=num)
    order = torch.sort(inverse, stable=True).indices
    group = inverse[order]
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(inverse.numel(), device=dev) - starts[group]
    width = int(sizes.max())
    out = []
    for v in values:
        laid = torch.zeros((num, width) + tuple(v.shape[1:]), dtype=v.dtype, device=dev)
        laid[group, slot] = v[order]
        out.append(laid.sum(1))
    return out


def _zeros_like_stats(like: GroupAnchorStats, group_ids: torch.Tensor) -> GroupAnchorStats:
    g, hs, dt, dev = group_ids.shape[0], like.hidden_size, like.dtype, like.device
    return GroupAnchorStats(
        group_ids,
        torch.zeros(g, hs, dtype=dt, device=dev),
        torch.zeros(g, hs, dtype=dt, device=dev),
        torch.zeros(g, dtype=dt, device=dev),
        torch.zeros(g, dtype=torch.int64, device=dev),
        eps=like.eps,
        threshold=like.threshold,
        local_blocks=like.local_blocks,
    )


def group_anchor_stats(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    *,
    group_ids: torch.Tensor | None = None,
    group_size: int | None = None,
    threshold: float = 0.5,
    eps: float = 1e-8,
    cu_seqlens: torch.Tensor | None = None,
) -> GroupAnchorStats:
    """Per-group sums of the correct anchored rollouts of one (micro-)batch, without gradient.

    Arguments mean what they mean for :func:`hidden_align.loss` (same layouts, anchor forms,
    validation and errors); anchors and correctness are resolved by the same code. The result
    lists every group of ``group_ids``, also those without a correct anchored rollout (count 0).

    With ``group_size``, group ids are the block numbers ``0, 1, ...`` of this call's rows, the
    batch's groups only when this call sees the whole batch: the result is marked
    (:attr:`GroupAnchorStats.local_blocks`) and ``merge`` of several such parts or
    ``all_reduce`` over several ranks raises ``ArgumentError``. For a micro-batch of rows
    ``start .. start + B - 1``, pass ``group_ids=torch.arange(start, start + B) // group_size``.
    Full-batch statistics made with ``group_size`` serve the micro-batches' losses with those
    ``group_ids`` (``hidden_align.loss`` refuses ``group_size`` with a reference).

    Combine micro-batches with :meth:`GroupAnchorStats.merge` and ranks with
    :meth:`GroupAnchorStats.all_reduce`, then pass the result (or its per-row form
    :meth:`GroupAnchorStats.rows`) to ``hidden_align.loss(..., reference=...)``.

    On CUDA, finding the distinct group ids and the largest group reads them on the host
    (synchronisations), and a malformed anchor (which the loss turns into NaN there) makes
    every sum NaN. The per-group sums are reductions in a fixed order (no float atomics): the
    same inputs give the same bits on every run.
    """
    group_ids = check_anchor_inputs(hidden, mask, rewards, group_ids, group_size, cu_seqlens)
    threshold = as_float("threshold", threshold)
    eps = as_float("eps", eps)
    with torch.no_grad():
        rows, correct = resolve_anchors(
            hidden, mask, rewards, group_ids, group_size, cu_seqlens, threshold, eps
        )
        batch, dev = rows.shape[0], hidden.device
        labels = group_ids
        if labels is None:
            labels = torch.arange(batch, device=dev) // group_size
        # int32 labels (accepted by every op) are the same groups as int64 ones.
        ids, inverse = torch.unique(labels.long(), sorted=True, return_inverse=True)
        acc = accumulator(hidden.dtype)
        h = gather_anchor_rows(hidden, rows, acc)
        u, _, _ = unit_rows(h, eps)
        part = (rows >= 0) & correct
        zero = torch.zeros((), dtype=acc, device=dev)
        u = torch.where(part[:, None], u, zero)
        h = torch.where(part[:, None], h, zero)
        num = ids.shape[0]
        count = torch.zeros(num, dtype=torch.int64, device=dev)
        count.index_add_(0, inverse, part.to(torch.int64))  # integer sums: any order is exact
        unit_sum, raw_sum, sq = _group_sums([u, h, (u * u).sum(-1)], inverse, num)
        # The kernel backend reports a malformed anchor as a row instead of raising.
        bad = (rows < -1).any()
        nan = torch.full((), float("nan"), dtype=acc, device=dev)
        unit_sum, raw_sum, sq = (torch.where(bad, nan, t) for t in (unit_sum, raw_sum, sq))
    return GroupAnchorStats(
        ids,
        unit_sum,
        raw_sum,
        sq,
        count,
        eps=eps,
        threshold=threshold,
        local_blocks=group_ids is None,
    )
