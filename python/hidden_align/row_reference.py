"""The reference of each rollout's group, one row per rollout: the form of
:class:`hidden_align.GroupAnchorStats` that travels with the rows of a batch (verl's
``DataProto``) and is split with them."""

from __future__ import annotations

import torch

from ._args import require_tensor, same_device
from .errors import ArgumentError, DtypeError, ShapeError

__all__ = ["RowReference"]


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
