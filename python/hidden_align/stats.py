"""Full-group reference statistics: the alignment loss split exactly over micro-batches and ranks.

verl and OpenRLHF run a batch as micro-batches on several data-parallel ranks, and reorder its
rows, so a prompt's correct rollouts are rarely in one forward. The loss of a group depends on
all of them, but only through a few sums (DESIGN section 3). :func:`group_anchor_stats`
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
    check_int,
    group_ids_on,
    require_tensor,
    same_device,
)
from ._row_grad import attach_delivery_hook
from ._share import gather_anchor_rows, resolve_anchors, share_loss, unit_rows
from .errors import ArgumentError, DeviceError, DtypeError, ShapeError

__all__ = ["GroupAnchorStats", "RowReference", "group_anchor_stats"]

_SUM_OF = {"cosine": "unit_sum", "centroid": "unit_sum", "mse": "raw_sum"}


def _lookup(sorted_ids: torch.Tensor, ids: torch.Tensor):
    """``(pos, found)``: where each of ``ids`` sits in ``sorted_ids`` (clamped to a valid
    position when absent) and whether it is there; no host read."""
    if sorted_ids.numel() == 0:
        return torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    pos = torch.searchsorted(sorted_ids, ids).clamp_max(sorted_ids.numel() - 1)
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
        """``[G]`` mean pairwise cosine ``(||S||^2 - Q) / (n (n - 1))`` (NaN or inf for
        groups that are not valid)."""
        n = self.count.to(self.dtype)
        sq = (self.unit_sum * self.unit_sum).sum(-1)
        return (sq - self.sq_norm_sum) / (n * (n - 1))

    @property
    def mean_cosine(self) -> torch.Tensor:
        """0-d: mean pairwise cosine of correct anchors over valid groups, NaN when there is
        none: the ``mean_cosine`` statistic of :func:`hidden_align.loss` on the full batch."""
        valid = self.valid
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        total = torch.where(valid, self.pair_cosine, zero).sum()
        return total / valid.sum().to(self.dtype)

    def __repr__(self) -> str:
        return (
            f"GroupAnchorStats({self.num_groups} groups, H={self.hidden_size}, {self.dtype}, "
            f"{self.device}, eps={self.eps}, threshold={self.threshold})"
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
        """
        for other in others:
            self._check_compatible(other)
        parts = (self,) + others
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
        sorted order, and is the same on every rank. Three collectives: all-gathers of the
        id counts and of the ids (padded to the largest count; the union is built on the
        host), then one sum all-reduce of the sums and one of the counts. Tensors stay on the
        stats' device (CUDA for NCCL). Every rank must use the same ``eps`` and
        ``threshold``; that is not checked.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ArgumentError(
                "process_group: torch.distributed is not initialised "
                "(call torch.distributed.init_process_group first)"
            )
        world = dist.get_world_size(process_group)
        dev = self.device
        size = torch.tensor([self.num_groups], dtype=torch.int64, device=dev)
        sizes = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=process_group)
        counts = [int(s) for s in sizes]
        width = max(max(counts), 1)
        ids = torch.zeros(width, dtype=torch.int64, device=dev)
        ids[: self.num_groups] = self.group_ids
        gathered = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(gathered, ids, group=process_group)
        union = torch.unique(torch.cat([g[:k] for g, k in zip(gathered, counts)]))
        out = _zeros_like_stats(self, union)
        if union.numel() == 0:
            return out  # the same on every rank: nothing to reduce anywhere
        pos = torch.searchsorted(union, self.group_ids)
        hs = self.hidden_size
        # One float buffer for the three sums: one all-reduce instead of three.
        floats = torch.zeros(union.numel(), 2 * hs + 1, dtype=self.dtype, device=dev)
        floats[pos, :hs] = self.unit_sum
        floats[pos, hs : 2 * hs] = self.raw_sum
        floats[pos, 2 * hs] = self.sq_norm_sum
        out.count[pos] = self.count
        dist.all_reduce(floats, op=dist.ReduceOp.SUM, group=process_group)
        dist.all_reduce(out.count, op=dist.ReduceOp.SUM, group=process_group)
        out.unit_sum = floats[:, :hs].contiguous()
        out.raw_sum = floats[:, hs : 2 * hs].contiguous()
        out.sq_norm_sum = floats[:, 2 * hs].contiguous()
        return out

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
        )

    # ---- per-row form -------------------------------------------------------------------

    def lookup(self, group_ids: torch.Tensor):
        """``(pos, found)`` ``[B]``: each id's position in :attr:`group_ids` and whether the
        statistics have it (``pos`` is clamped to a valid index where not). No host read."""
        require_tensor("group_ids", group_ids)
        if group_ids.dtype != torch.int64:
            raise DtypeError(f"group_ids: expected int64, got {group_ids.dtype}")
        if group_ids.dim() != 1:
            raise ShapeError(f"group_ids: expected [B], got {tuple(group_ids.shape)}")
        group_ids = group_ids_on(group_ids, self.unit_sum)
        same_device(("stats", self.unit_sum), ("group_ids", group_ids))
        return _lookup(self.group_ids, group_ids)

    def rows(self, group_ids: torch.Tensor, loss_type: str | None = None) -> RowReference:
        """The reference of rollouts with these group ids, one row each (:class:`RowReference`).

        ``loss_type`` (``"cosine"``, ``"centroid"`` or ``"mse"``) keeps only the sum that loss
        needs (``[B, H]`` instead of two); None keeps both. A group the statistics do not
        have gets count 0: a correct anchored rollout of it is an error of the loss.
        """
        if loss_type is not None and loss_type not in _SUM_OF:
            raise ArgumentError(
                f"loss_type: expected None or one of {tuple(_SUM_OF)}, got {loss_type!r}"
            )
        pos, found = self.lookup(group_ids)
        batch = pos.shape[0]
        keep = set(_SUM_OF.values()) if loss_type is None else {_SUM_OF[loss_type]}
        return RowReference(
            group_id=group_ids_on(group_ids, self.unit_sum).clone(),
            count=_take(self.count, pos, found),
            valid_groups=self.valid_groups.expand(batch).clone(),
            anchored_correct=self.anchored_correct.expand(batch).clone(),
            mean_cosine=self.mean_cosine.expand(batch).clone(),
            unit_sum=_take(self.unit_sum, pos, found) if "unit_sum" in keep else None,
            raw_sum=_take(self.raw_sum, pos, found) if "raw_sum" in keep else None,
        )


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
    )


class RowReference:
    """The reference of each rollout's group, one row per rollout: ordinary tensors whose
    leading dimension is B, so that any subset of rows (a micro-batch, a rank's share) still
    carries what its share of the loss needs.

    Attributes:
        group_id: int64 ``[B]``: the group id each row was looked up with.
        count: int64 ``[B]``: ``n_g`` of the row's group (0 when the statistics lack it).
        valid_groups, anchored_correct: int64 ``[B]``: the full-batch values, repeated.
        mean_cosine: ``[B]``: the full-batch diagnostic, repeated.
        unit_sum: ``[B, H]`` ``S_g`` of the row's group (cosine, centroid), or None.
        raw_sum: ``[B, H]`` ``R_g`` of the row's group (mse), or None.

    Split it with ``ref[i:j]``, ``ref[index_tensor]`` or :meth:`index_select`; store it in a
    batch with :meth:`to_dict` and read it back with :meth:`from_dict`.
    """

    _NAMES = (
        "group_id",
        "count",
        "valid_groups",
        "anchored_correct",
        "mean_cosine",
        "unit_sum",
        "raw_sum",
    )
    _OPTIONAL = ("unit_sum", "raw_sum")

    def __init__(
        self,
        group_id: torch.Tensor,
        count: torch.Tensor,
        valid_groups: torch.Tensor,
        anchored_correct: torch.Tensor,
        mean_cosine: torch.Tensor,
        unit_sum: torch.Tensor | None = None,
        raw_sum: torch.Tensor | None = None,
    ) -> None:
        values = dict(
            group_id=group_id,
            count=count,
            valid_groups=valid_groups,
            anchored_correct=anchored_correct,
            mean_cosine=mean_cosine,
            unit_sum=unit_sum,
            raw_sum=raw_sum,
        )
        for name, t in values.items():
            require_tensor(name, t, optional=name in self._OPTIONAL)
        if unit_sum is None and raw_sum is None:
            raise ArgumentError("unit_sum, raw_sum: expected at least one of them")
        present = [(name, t) for name, t in values.items() if t is not None]
        same_device(*present)
        batch = group_id.shape[0] if group_id.dim() == 1 else -1
        for name, t in present:
            want = 2 if name in self._OPTIONAL else 1
            if t.dim() != want or t.shape[0] != batch:
                raise ShapeError(
                    f"{name}: expected {'[B, H]' if want == 2 else '[B]'} with B the length "
                    f"of group_id ({batch}), got {tuple(t.shape)}"
                )
        for name in ("group_id", "count", "valid_groups", "anchored_correct"):
            if values[name].dtype != torch.int64:
                raise DtypeError(f"{name}: expected int64, got {values[name].dtype}")
        floats = [(name, t) for name, t in present if name in self._OPTIONAL]
        floats.append(("mean_cosine", mean_cosine))
        for name, t in floats:
            if t.dtype not in (torch.float32, torch.float64):
                raise DtypeError(f"{name}: expected float32 or float64, got {t.dtype}")
        if unit_sum is not None and raw_sum is not None and unit_sum.shape != raw_sum.shape:
            raise ShapeError(
                f"raw_sum: expected the shape of unit_sum {tuple(unit_sum.shape)}, "
                f"got {tuple(raw_sum.shape)}"
            )
        self.group_id = group_id
        self.count = count
        self.valid_groups = valid_groups
        self.anchored_correct = anchored_correct
        self.mean_cosine = mean_cosine
        self.unit_sum = unit_sum
        self.raw_sum = raw_sum

    def __len__(self) -> int:
        return self.group_id.shape[0]

    @property
    def hidden_size(self) -> int:
        some = self.unit_sum if self.unit_sum is not None else self.raw_sum
        return some.shape[1]

    @property
    def device(self) -> torch.device:
        return self.group_id.device

    def __repr__(self) -> str:
        sums = [n for n in self._OPTIONAL if getattr(self, n) is not None]
        return (
            f"RowReference({len(self)} rows, H={self.hidden_size}, {'+'.join(sums)}, {self.device})"
        )

    def _map(self, fn) -> RowReference:
        return RowReference(
            **{
                name: None if getattr(self, name) is None else fn(getattr(self, name))
                for name in self._NAMES
            }
        )

    def __getitem__(self, index) -> RowReference:
        """Rows selected like a tensor's leading dimension (a slice, an index or bool tensor,
        a list); an int keeps the leading dimension (one row)."""
        if isinstance(index, int) and not isinstance(index, bool):
            index = slice(index, index + 1 if index != -1 else None)
        return self._map(lambda t: t[index])

    def index_select(self, index: torch.Tensor) -> RowReference:
        """Rows ``index`` (int64 ``[k]``), as :func:`torch.index_select` along dimension 0."""
        return self._map(lambda t: t.index_select(0, index.to(t.device)))

    def to(self, device) -> RowReference:
        return self._map(lambda t: t.to(device))

    def to_dict(self, prefix: str = "ha_ref_") -> dict:
        """``{prefix + name: tensor}`` (the sums that are None left out): entries to store in
        a batch that is split by rows (verl ``DataProto.batch``, a ``TensorDict``)."""
        return {
            prefix + name: getattr(self, name)
            for name in self._NAMES
            if getattr(self, name) is not None
        }

    @classmethod
    def from_dict(cls, mapping, prefix: str = "ha_ref_") -> RowReference:
        """Reads the entries :meth:`to_dict` wrote from ``mapping`` (a dict, a ``TensorDict``,
        anything with ``keys()`` and ``[]``); other keys are ignored."""
        try:
            keys = set(mapping.keys())
        except (AttributeError, TypeError):
            raise ArgumentError(
                f"reference: expected a mapping with keys(), got {type(mapping).__name__}"
            ) from None
        missing = [prefix + n for n in cls._NAMES[:5] if prefix + n not in keys]
        if missing:
            raise ArgumentError(f"reference: missing entries {missing} (prefix {prefix!r})")
        return cls(
            **{
                name: mapping[prefix + name] if prefix + name in keys else None
                for name in cls._NAMES
            }
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
    validation and errors); anchors and correctness are resolved by the same code. With
    ``group_size``, group ids are the local block numbers ``0, 1, ...``: use it only when
    this call sees the whole batch. The result lists every group of ``group_ids``, also
    those without a correct anchored rollout (count 0).

    Combine micro-batches with :meth:`GroupAnchorStats.merge` and ranks with
    :meth:`GroupAnchorStats.all_reduce`, then pass the result (or its per-row form
    :meth:`GroupAnchorStats.rows`) to ``hidden_align.loss(..., reference=...)``.

    On CUDA, finding the distinct group ids reads their number on the host (one
    synchronisation), and a malformed anchor (which the loss turns into NaN there) makes
    every sum NaN. The per-group sums use ``index_add_``, which on CUDA adds with atomics:
    the last bits may vary between runs unless ``torch.use_deterministic_algorithms(True)``.
    """
    require_tensor("hidden", hidden)
    require_tensor("mask", mask)
    require_tensor("rewards", rewards)
    require_tensor("group_ids", group_ids, optional=True)
    require_tensor("cu_seqlens", cu_seqlens, optional=True)
    check_int("group_size", group_size)
    group_ids = group_ids_on(group_ids, hidden)
    same_device(
        ("hidden", hidden),
        ("mask", mask),
        ("rewards", rewards),
        ("group_ids", group_ids),
        ("cu_seqlens", cu_seqlens),
    )
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
        ids, inverse = torch.unique(labels, sorted=True, return_inverse=True)
        acc = accumulator(hidden.dtype)
        h = gather_anchor_rows(hidden, rows, acc)
        u, _, _ = unit_rows(h, eps)
        part = (rows >= 0) & correct
        zero = torch.zeros((), dtype=acc, device=dev)
        u = torch.where(part[:, None], u, zero)
        h = torch.where(part[:, None], h, zero)
        num, hs = ids.shape[0], hidden.shape[-1]
        unit_sum = torch.zeros(num, hs, dtype=acc, device=dev).index_add_(0, inverse, u)
        raw_sum = torch.zeros(num, hs, dtype=acc, device=dev).index_add_(0, inverse, h)
        sq = torch.zeros(num, dtype=acc, device=dev).index_add_(0, inverse, (u * u).sum(-1))
        count = torch.zeros(num, dtype=torch.int64, device=dev)
        count.index_add_(0, inverse, part.to(torch.int64))
        # The kernel backend reports a malformed anchor as a row instead of raising.
        bad = (rows < -1).any()
        nan = torch.full((), float("nan"), dtype=acc, device=dev)
        unit_sum, raw_sum, sq = (torch.where(bad, nan, t) for t in (unit_sum, raw_sum, sq))
    return GroupAnchorStats(ids, unit_sum, raw_sum, sq, count, eps=eps, threshold=threshold)


_CONTRASTIVE_REFUSED = (
    "reference: loss_type='contrastive' cannot be split across micro-batches: each anchor's "
    "log-sum-exp runs over every anchored rollout of its group, incorrect ones included, "
    "which no per-group sum carries; compute it on whole groups, without a reference"
)


# Run eagerly under torch.compile (a graph break): the row-only gradient and the CPU-side
# checks are not traceable, and the share is O(B H) torch work with nothing to fuse.
@torch.compiler.disable
def loss_with_reference(
    hidden,
    mask,
    rewards,
    reference,
    *,
    group_ids,
    group_size,
    loss_type,
    reduction,
    threshold,
    eps,
    return_stats,
    cu_seqlens,
):
    """``hidden_align.loss(..., reference=...)``: this micro-batch's share of the full-batch
    loss. Arguments are checked by the caller except the reference itself."""
    if loss_type == "contrastive":
        raise ArgumentError(_CONTRASTIVE_REFUSED)
    if isinstance(reference, GroupAnchorStats):
        stats, refrows = reference, None
        if (stats.eps, stats.threshold) != (eps, threshold):
            raise ArgumentError(
                f"reference: computed with eps={stats.eps}, threshold={stats.threshold}, "
                f"but the loss uses eps={eps}, threshold={threshold}"
            )
        same_device(("hidden", hidden), ("reference", stats.unit_sum))
        width = stats.hidden_size
    else:
        if not isinstance(reference, RowReference):
            if not hasattr(reference, "keys"):
                raise ArgumentError(
                    "reference: expected GroupAnchorStats, RowReference or a mapping of "
                    f"RowReference.to_dict() entries, got {type(reference).__name__}"
                )
            reference = RowReference.from_dict(reference)
        stats, refrows = None, reference
        if reduction == "none":
            raise ArgumentError(
                "reduction: 'none' with a per-row reference has no group list to report "
                "per-group values in: pass the GroupAnchorStats instead"
            )
        if group_size is not None:
            raise ArgumentError(
                "group_size: not used with a per-row reference, whose rows carry their group "
                "ids: pass group_ids (checked against them) or neither"
            )
        if getattr(refrows, _SUM_OF[loss_type]) is None:
            raise ArgumentError(
                f"reference: loss_type={loss_type!r} needs {_SUM_OF[loss_type]}, which this "
                "reference left out (GroupAnchorStats.rows(..., loss_type=...))"
            )
        same_device(("hidden", hidden), ("reference", refrows.group_id))
        width = refrows.hidden_size
    if hidden.dim() in (2, 3) and hidden.shape[-1] != width:
        raise ShapeError(
            f"reference: computed for hidden size {width}, but hidden has {hidden.shape[-1]}"
        )
    if refrows is not None and rewards.dim() == 1 and len(refrows) != rewards.shape[0]:
        raise ShapeError(
            f"reference: expected {rewards.shape[0]} rows (one per rollout), got {len(refrows)}"
        )

    resolve_groups = group_ids if refrows is None or group_ids is not None else refrows.group_id
    rows, correct = resolve_anchors(
        hidden, mask, rewards, resolve_groups, group_size, cu_seqlens, threshold, eps
    )
    batch, dev = rows.shape[0], hidden.device
    acc = accumulator(hidden.dtype)
    part = (rows >= 0) & correct
    if refrows is None:
        labels = group_ids
        if labels is None:
            labels = torch.arange(batch, device=dev) // group_size
        pos, found = stats.lookup(labels)
        count = _take(stats.count, pos, found)
        ref_sum = _take(getattr(stats, _SUM_OF[loss_type]), pos, found)
        valid_groups = stats.valid_groups.expand(batch)
        slot = torch.where(found, pos, torch.full_like(pos, -1))
        mismatch = torch.zeros_like(part)
        num_slots = stats.num_groups
        labels_of = labels
        report = (stats.mean_cosine, stats.valid_groups, stats.anchored_correct)
    else:
        count = refrows.count
        ref_sum = getattr(refrows, _SUM_OF[loss_type])
        valid_groups = refrows.valid_groups
        slot = torch.zeros_like(count)
        if group_ids is None:
            mismatch = torch.zeros_like(part)
        else:
            mismatch = group_ids != refrows.group_id
        num_slots = 0
        labels_of = refrows.group_id
        if batch:
            report = (refrows.mean_cosine[0], refrows.valid_groups[0], refrows.anchored_correct[0])
        else:
            # No row carries a copy of the full-batch values.
            report = (
                torch.full((), float("nan"), dtype=acc, device=dev),
                torch.zeros((), dtype=torch.int64, device=dev),
                torch.zeros((), dtype=torch.int64, device=dev),
            )
    missing = part & ((count < 1) | mismatch)
    if hidden.device.type == "cpu" and bool(missing.any()):
        b = int(missing.nonzero()[0, 0])
        raise ArgumentError(
            f"reference: rollout {b} (group id {int(labels_of[b])}) is a correct anchored "
            "rollout, but the reference has no correct anchored rollout in its group"
            + (" or was looked up with another group id" if refrows is not None else "")
            + ": the reference must come from the same rows (all micro-batches, all ranks)"
        )
    poison = missing | (rows < -1)
    if reduction == "mean":
        scale = valid_groups.to(acc).reciprocal()
    else:
        scale = torch.ones(batch, dtype=acc, device=dev)
    scale = scale.expand(batch)
    if torch.is_grad_enabled():
        attach_delivery_hook(hidden)
    options = (loss_type, reduction, eps, num_slots)
    value = share_loss(hidden, rows, part, ref_sum, count, scale, slot, poison, options)
    result = (value, stats.valid) if reduction == "none" else value
    if not return_stats:
        return result
    mean_cosine, valid_count, anchored = report
    return result, {
        "mean_cosine": mean_cosine.to(acc),
        "valid_groups": valid_count,
        "anchored_correct": anchored,
    }
