"""Delivering the alignment gradient into ``hidden`` without a pass over all of it.

The gradient of the alignment loss w.r.t. ``hidden`` is zero except at the B anchor rows. In a
training step ``hidden`` also feeds the LM head, which already sends it a dense gradient; the
autograd engine would add a dense ``[B, T, H]`` gradient of ours to it with one extra read and
write of the whole tensor, plus the zero-fill. Instead the backward returns an
:class:`AnchorRowGrad`: a tensor subclass that holds only the rows. The engine accumulates
gradients with ``add`` (never in place into a tensor subclass), which this class intercepts:
``rows + dense`` stays symbolic, holding ``dense`` as its base. A hook on ``hidden`` (run once
every contribution has arrived, before anything reads the gradient) turns the symbolic sum
into a plain tensor: rows added in place into the base when nothing but the engine can reach
it, into a copy when anything else can (a module hook that kept ``grad_input``, a tensor hook
or a list that kept a gradient), into zeros when ``hidden`` has no other consumer. Every case
is exact; the common one costs O(B H).
"""

from __future__ import annotations

import sys

import torch

from . import _native
from ._backend import stream_of

__all__ = ["AnchorRowGrad", "attach_delivery_hook"]

_aten = torch.ops.aten
_HOOKED = "_hidden_align_delivery_hook"


# Python references are counted with `sys.getrefcount` called directly in the frame whose local
# holds the object, never through a Python helper: passing an object into a Python function
# adds one reference or two depending on how the interpreter executes the call (a specialised
# call moves the caller's stack reference into the callee, the generic path copies it, and
# installing a frame evaluator such as torch.compile's selects the generic path from then on).
# A builtin's arguments are borrowed from the stack either way, so a direct count is stable.


def _one_local_refs() -> int:
    """What ``sys.getrefcount(x)`` says of an object held by one local variable ``x`` alone."""
    probe = object()
    return sys.getrefcount(probe)


def _view_base_refs() -> int:
    """The same for the base of a view, read through ``view._base`` into one local variable.

    The accessor's result carries one reference more than a plain local (PyTorch keeps the
    base's Python object tied to the view); measuring keeps the rule independent of that.
    """
    view = torch.empty(2).view(1, 2)
    base = view._base
    return sys.getrefcount(base)


_ONE_LOCAL = _one_local_refs()
_ONE_LOCAL_VIEW_BASE = _view_base_refs()


def _exclusively_owned(t: torch.Tensor, t_refs: int) -> bool:
    """True when nothing but the caller's one local variable holds ``t`` or its storage.

    The caller must hold ``t`` in exactly one local variable and nowhere else, and pass
    ``t_refs = sys.getrefcount(t)`` measured in its own frame (see the note above). Two kinds of
    holder are counted: C++ references of the tensor implementation and its storage (what the
    autograd engine tests before accumulating in place), and Python references to the tensor
    object, which the C++ count cannot see: a hook, a logger or a list keeping the gradient
    all share one C++ reference through the same Python object. A view whose base only the
    view holds is accepted too (a linear layer's gradient w.r.t. a ``[B, T, H]`` input is its
    2-D result reshaped).
    """
    if type(t) is not torch.Tensor or t.layout != torch.strided or not t.is_contiguous():
        return False
    # t itself: the caller's local alone, measured like the probe.
    if t_refs != _ONE_LOCAL:
        return False
    try:
        storage_refs = torch._C._storage_Use_Count(t.untyped_storage()._cdata)
        base = t._base
        if base is None:
            return t._use_count() == 1 and storage_refs == 2
        # base: the view's C++ reference + its Python object (held here by `base` alone);
        # storage: base + view + the temporary storage object.
        return (
            base._base is None
            and sys.getrefcount(base) == _ONE_LOCAL_VIEW_BASE
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
    # Scratch of the CUDA kernels (unused on the CPU backend): repeated rows found by a sort.
    links = torch.empty(4 * rows.numel(), dtype=torch.int32, device=dst.device)
    _native.scatter_add_rows(dst.detach(), rows, vals, links, stream_of(dst))
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
        if self._dense is not None:
            state = "materialised"
        else:
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
        base, owned = self.base, self.base_owned
        # From here on the value lives in the result: ``base`` may become it.
        self.base, self.base_owned = None, False
        base_refs = sys.getrefcount(base)
        if base is None:
            out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        elif owned or _exclusively_owned(base, base_refs):
            out = base
        else:
            out = base.clone(memory_format=torch.contiguous_format)
        del base
        return _add_rows_(out, self.rows, self.vals)

    def _with_base(self, base: torch.Tensor, owned: bool) -> AnchorRowGrad:
        return AnchorRowGrad(self, self.rows, self.vals, base, owned)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten.add.Tensor and kwargs.get("alpha", 1) == 1:
            a, b = args
            if not isinstance(a, AnchorRowGrad):
                a, b = b, a
            if isinstance(b, AnchorRowGrad):
                return _merge(a, b)
            if isinstance(b, torch.Tensor) and b.shape == a.shape and b.dtype == a.dtype:
                if a._dense is not None:
                    return a._dense + b
                if a.base is None:
                    return a._with_base(b, owned=False)
                # Out of place: `a` may still be held (a user's hook) and must keep its value.
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
    if a._dense is not None or b._dense is not None:
        return a.materialize() + b.materialize()
    if a.base is None or b.base is None:
        # Shared with the other operand, which may still be held: never owned here.
        keep = a if b.base is None else b
        return AnchorRowGrad(a, rows, vals, keep.base, False)
    return AnchorRowGrad(a, rows, vals, a.base + b.base, True)


# What `sys.getrefcount(grad)` says inside `_deliver` when only the autograd engine holds `grad`;
# measured once by a tiny backward (see `_calibrate_delivery`).
_ENGINE_ONLY: int | None = None


def _deliver(grad: torch.Tensor | None) -> torch.Tensor | None:
    if not isinstance(grad, AnchorRowGrad):
        return None
    refs = sys.getrefcount(grad)
    if getattr(grad, "_calibration", False):
        global _ENGINE_ONLY
        _ENGINE_ONLY = refs
        return None
    dense = grad.materialize()
    if refs == _ENGINE_ONLY:
        # Nobody else can reach `grad`: drop our reference so the engine may steal the buffer
        # (a leaf's AccumulateGrad copies a gradient anyone else still holds).
        grad._dense = None
    # Otherwise a hook kept `grad`: it keeps its dense value, and since that reference is
    # visible to the engine, the engine copies before it would ever write into the buffer.
    return dense


class _CalibrationGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.sum()

    @staticmethod
    def backward(ctx, _grad):
        grad = AnchorRowGrad(
            torch.empty(1, 1), torch.full((1,), -1, dtype=torch.int64), torch.zeros(1, 1)
        )
        grad._calibration = True
        return grad


def _calibrate_delivery() -> None:
    """Measures `_ENGINE_ONLY` on a backward in which nothing else holds the gradient."""
    with torch.enable_grad():
        x = torch.zeros(1, 1, requires_grad=True)
        h = x * 1.0
        h.register_hook(_deliver)
        _CalibrationGrad.apply(h).backward()
    if _ENGINE_ONLY is None:  # pragma: no cover - the engine always runs tensor hooks
        raise RuntimeError("hidden_align: could not calibrate the gradient delivery hook")


def attach_delivery_hook(hidden: torch.Tensor) -> None:
    """Registers (once per tensor) the hook that makes ``hidden``'s gradient a plain tensor."""
    if hidden.requires_grad and not getattr(hidden, _HOOKED, False):
        if _ENGINE_ONLY is None:
            _calibrate_delivery()
        hidden.register_hook(_deliver)
        setattr(hidden, _HOOKED, True)
