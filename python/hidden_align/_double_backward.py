"""First-order-only gradients: a fused backward that computes its gradient outside autograd
(no graph) must not let ``create_graph=True`` treat that gradient as a constant, which would
silently drop every second-order term (gradient penalties, meta-gradients)."""

from __future__ import annotations

import torch
from torch._C import _functions as _autograd_functions


def first_order_only(message: bytes, grads: tuple, inputs: tuple) -> tuple:
    """``grads`` as they are outside ``create_graph=True`` (autograd's grad mode is off in a
    plain backward); under it, each gradient behind a ``DelayedError`` node that raises
    ``message`` when a second derivative reaches it.

    Each gradient is first linked to ``inputs`` (those that require grad) by an exact ``+ 0``:
    ``where(false, x, 0)`` is 0 whatever ``x`` holds (NaN, inf), and cast to the gradient's
    dtype so the sum keeps it. Without that link the gradient would depend on no input, and
    ``torch.autograd.grad(f(grad), x)`` would fail with "appears to not have been used in the
    graph" instead of reaching the error node. A ``None`` gradient stays ``None``.
    """
    if not torch.is_grad_enabled():
        return grads
    linked = [x for x in inputs if x is not None and x.requires_grad]
    link = None
    if linked:
        false = torch.zeros((), dtype=torch.bool, device=linked[0].device)
        # [:1].sum(): one element (or 0 for an empty tensor) that carries x's graph.
        link = sum(torch.where(false, x.reshape(-1)[:1].sum(), 0.0) for x in linked)
    out = []
    for g in grads:
        if g is not None:
            if link is not None:
                g = g + link.to(g.dtype)
            g = _autograd_functions.DelayedError(message, 1)(g)
        out.append(g)
    return tuple(out)
