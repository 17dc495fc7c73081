"""Delivering the alignment gradient into ``hidden`` without a pass over all of it.

The gradient of the alignment loss w.r.t. ``hidden`` is zero except at the B anchor rows. In a
training step ``hidden`` also feeds the LM head, which already sends it a dense gradient; the
autograd engine would add a dense ``[B, T, H]`` gradient of ours to it with one extra read and
write of the whole tensor, plus the zero-fill. Instead the backward returns an
:class:`AnchorRowGrad`: a tensor subclass that holds only the rows. The engine accumulates
gradients with ``add``/``add_``, which this class intercepts:

* ``dense.add_(rows)`` (the engine owns ``dense`` exclusively): rows are added in place;
* ``rows + dense``: the sum stays symbolic, holding ``dense`` as its base;

and a hook on ``hidden`` (run once every contribution has arrived, before anything reads the
gradient) turns the symbolic sum into a plain tensor: rows added in place into the base when
nothing else references it, into a copy otherwise, into zeros when ``hidden`` has no other
consumer. Every case is exact; the common one costs O(B H).
"""

from __future__ import annotations

import torch

from . import _native
from ._backend import stream_of

__all__ = ["AnchorRowGrad", "attach_delivery_hook"]

_aten = torch.ops.aten
_HOOKED = "_hidden_align_delivery_hook"


def _exclusively_owned(t: torch.Tensor) -> bool:
    """True when nothing but the caller's reference holds ``t`` or its storage.

    Mirrors the test the autograd engine applies before accumulating in place, extended to one
    common case the engine leaves out: a view whose base only the view holds (a linear layer's
    gradient w.r.t. a ``[B, T, H]`` input is its 2-D result reshaped). Counts include the
    reference of the caller's Python object (tensor) and of the temporary storage object
    (storage); any other holder (an aliasing gradient, another view) makes the answer false.
    """
    if type(t) is not torch.Tensor or t.layout != torch.strided or not t.is_contiguous():
        return False
    try:
        storage_refs = torch._C._storage_Use_Count(t.untyped_storage()._cdata)
        base = t._base
        if base is None:
            return t._use_count() == 1 and storage_refs == 2
        # base refs: the view's own + this function's wrapper; storage: base + view + temporary.
        return (
            base._base is None
            and t._use_count() == 1
            and base._use_count() == 2
            and storage_refs == 3
        )
    except (AttributeError, RuntimeError):
        # Without the introspection hooks, copying is the safe answer.
        return False


def _add_rows_(dst: torch.Tensor, rows: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """``dst[rows] += vals`` in place; untracked by autograd unless a graph is being built."""
    if torch.is_grad_enabled() and (dst.requires_grad or vals.requires_grad):
        # create_graph=True: stay differentiable for everything else in dst's graph.
        flat = dst.reshape(-1, dst.shape[-1])
        keep = rows >= 0
        return flat.index_add(0, rows[keep], vals[keep].to(dst.dtype)).view_as(dst)
    _native.scatter_add_rows(dst.detach(), rows, vals, stream_of(dst))
    return dst


class AnchorRowGrad(torch.Tensor):
    """A gradient shaped like ``hidden`` that is ``base`` (or zero) plus ``vals`` at ``rows``.

    ``rows`` are flat row indices of ``hidden`` (``b * T + t`` padded, ``n`` packed; -1
    skipped), ``vals`` the row values in float32 (float64 for float64 ``hidden``).
    """

    rows: torch.Tensor
    vals: torch.Tensor
    base: torch.Tensor | None
    base_owned: bool
    _dense: torch.Tensor | None

    @staticmethod
    def __new__(
        cls,
        like: torch.Tensor,
        rows: torch.Tensor,
        vals: torch.Tensor,
        base: torch.Tensor | None = None,
        base_owned: bool = False,
    ):
        t = torch.Tensor._make_wrapper_subclass(
            cls, like.shape, dtype=like.dtype, device=like.device, requires_grad=False
        )
        t.rows, t.vals, t.base, t.base_owned = rows, vals, base, base_owned
        t._dense = None
        return t

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __repr__(self) -> str:
        state = "zeros" if self.base is None else "a dense base"
        return f"AnchorRowGrad({tuple(self.shape)}, {self.rows.numel()} rows over {state})"

    def materialize(self) -> torch.Tensor:
        """A plain tensor with the same value; reuses ``base`` when nothing else holds it.

        Idempotent: the rows are added once, whoever asks first (a user's hook on ``hidden``
        registered before the loss was called, or the delivery hook).
        """
        if self._dense is None:
            self._dense = self._build_dense()
        return self._dense

    def _build_dense(self) -> torch.Tensor:
        if self.base is None:
            out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        elif self.base_owned or _exclusively_owned(self.base):
            out = self.base
        else:
            out = self.base.clone(memory_format=torch.contiguous_format)
        return _add_rows_(out, self.rows, self.vals)

    def _with_base(self, base: torch.Tensor, owned: bool) -> AnchorRowGrad:
        return AnchorRowGrad(self, self.rows, self.vals, base, owned)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten.add_.Tensor and kwargs.get("alpha", 1) == 1:
            dst, other = args
            if not isinstance(dst, AnchorRowGrad) and isinstance(other, AnchorRowGrad):
                # The engine only accumulates in place into a tensor it owns exclusively.
                if other.base is not None:
                    dst.add_(other.base)
                return _add_rows_(dst, other.rows, other.vals)
        if func is _aten.add.Tensor and kwargs.get("alpha", 1) == 1:
            a, b = args
            if not isinstance(a, AnchorRowGrad):
                a, b = b, a
            if isinstance(b, AnchorRowGrad):
                return _merge(a, b)
            if isinstance(b, torch.Tensor) and b.shape == a.shape and b.dtype == a.dtype:
                if a.base is None:
                    return a._with_base(b, owned=False)
                if a.base_owned:
                    return a._with_base(a.base.add_(b), owned=True)
                return a._with_base(a.base + b, owned=True)

        def plain(x):
            return x.materialize() if isinstance(x, AnchorRowGrad) else x

        args = tuple(plain(x) for x in args)
        kwargs = {k: plain(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _merge(a: AnchorRowGrad, b: AnchorRowGrad) -> AnchorRowGrad:
    """Sum of two row gradients (e.g. two alignment losses on the same ``hidden``)."""
    rows = torch.cat([a.rows, b.rows])
    vals = torch.cat([a.vals, b.vals.to(a.vals.dtype)])
    if a.base is None or b.base is None:
        keep = a if b.base is None else b
        return AnchorRowGrad(a, rows, vals, keep.base, keep.base_owned)
    return AnchorRowGrad(a, rows, vals, a.base + b.base, True)


def _deliver(grad: torch.Tensor | None) -> torch.Tensor | None:
    if isinstance(grad, AnchorRowGrad):
        dense = grad.materialize()
        # Drop our references so the engine may steal the buffer (a leaf's AccumulateGrad
        # copies a gradient anyone else still holds).
        grad._dense = grad.base = None
        return dense
    return None


def attach_delivery_hook(hidden: torch.Tensor) -> None:
    """Registers (once per tensor) the hook that makes ``hidden``'s gradient a plain tensor."""
    if hidden.requires_grad and not getattr(hidden, _HOOKED, False):
        hidden.register_hook(_deliver)
        setattr(hidden, _HOOKED, True)
