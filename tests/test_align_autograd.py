"""How the alignment gradient reaches `hidden`: exact in every autograd position, and added in
place into the gradient `hidden` already receives (no pass over all of `hidden`)."""

import pytest
import torch

import hidden_align as ha
from hidden_align._row_grad import AnchorRowGrad

from cases import consumer_of, make_case
from reference import alignment_loss


def reference_grad(hidden, case, head=None, scale=1.0):
    h = hidden.detach().double().requires_grad_()
    total = scale * alignment_loss(h, case.index, case.rewards, case.labels)[0]
    if head is not None:
        total = total + head(h)
    (g,) = torch.autograd.grad(total, h)
    return g


def head_loss(h):
    w = torch.linspace(-1, 1, h.shape[-1], dtype=h.dtype)
    return (h * w).sin().sum()


def test_leaf_hidden_backward_and_accumulation():
    case = make_case()
    h = case.hidden.clone().requires_grad_()
    ha.loss(h, case.anchors, case.rewards, **case.kwargs()).backward()
    assert type(h.grad) is torch.Tensor
    torch.testing.assert_close(h.grad, reference_grad(h, case))
    ha.loss(h, case.anchors, case.rewards, **case.kwargs()).backward()  # .grad accumulates
    torch.testing.assert_close(h.grad, 2 * reference_grad(h, case))


def test_sole_consumer_non_leaf():
    case = make_case()
    x = case.hidden.clone().requires_grad_()
    h = torch.nn.functional.layer_norm(x, x.shape[-1:])
    ha.loss(h, case.anchors, case.rewards, **case.kwargs()).backward()
    x2 = case.hidden.clone().requires_grad_()
    h2 = torch.nn.functional.layer_norm(x2, x2.shape[-1:])
    alignment_loss(h2, case.index, case.rewards, case.labels)[0].backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("align_first", [False, True])
def test_with_lm_head_gradient_is_added_in_place(align_first):
    case = make_case(batch=8, group=4, seq=6, hidden_size=16)
    x = case.hidden.clone().requires_grad_()
    h = x * 1.0
    seen = {}

    def spy(grad):
        # Registered before the loss, this hook runs before the delivery hook and may see the
        # symbolic AnchorRowGrad; any op on it gives the plain dense value, and the delivery
        # that follows must not add the rows a second time.
        seen["value"] = grad * 1
        seen["type"] = type(grad)

    if align_first:
        a = ha.loss(h, case.anchors, case.rewards, **case.kwargs())
        h.register_hook(spy)
        total = head_loss(h) + 0.5 * a
    else:
        h.register_hook(spy)
        total = head_loss(h) + 0.5 * ha.loss(h, case.anchors, case.rewards, **case.kwargs())
    total.backward()
    expected = reference_grad(x, case, head=head_loss, scale=0.5)
    assert seen["type"] is (torch.Tensor if align_first else AnchorRowGrad)
    assert type(seen["value"]) is torch.Tensor
    torch.testing.assert_close(seen["value"], expected)
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("align_first", [False, True])
def test_delivery_reuses_the_lm_head_gradient_buffer(align_first):
    """The rows are added into the buffer the LM head's backward wrote: no copy of hidden."""
    case = make_case(batch=8, group=4, seq=6, hidden_size=16)
    x = case.hidden.clone().requires_grad_()
    h = x * 1.0
    head = torch.nn.Linear(16, 5, dtype=x.dtype)
    ptrs = {}
    if align_first:
        a = ha.loss(h, case.anchors, case.rewards, **case.kwargs())
    logits = head(h)

    # grad_inputs[0] of the matmul node is the LM head's gradient w.r.t. hidden.
    def record_head(grad_in, grad_out):
        ptrs["head"] = grad_in[0].data_ptr()

    consumer_of(logits.grad_fn, h.grad_fn).register_hook(record_head)
    if not align_first:
        a = ha.loss(h, case.anchors, case.rewards, **case.kwargs())

    def record_delivered(grad):
        ptrs["delivered"] = grad.data_ptr()

    h.register_hook(record_delivered)
    (logits.square().sum() + a).backward()
    assert ptrs["delivered"] == ptrs["head"]
    g_ref = reference_grad(x, case, head=lambda t: head.double()(t).square().sum())
    torch.testing.assert_close(x.grad, g_ref)


def test_aliased_gradient_is_not_mutated():
    """`hidden + r` hands the same gradient tensor to both inputs; r's must stay untouched."""
    case = make_case(batch=4, group=2, seq=3, hidden_size=4, anchor_prob=1.0, correct_prob=1.0)
    x = case.hidden.clone().requires_grad_()
    r = torch.randn_like(x, requires_grad=True)
    h = x * 1.0
    (h + r).sum().add(ha.loss(h, case.anchors, case.rewards, **case.kwargs())).backward()
    assert torch.all(r.grad == 1)
    torch.testing.assert_close(x.grad, 1 + reference_grad(x, case))


def test_autograd_grad_and_retain_graph():
    case = make_case()
    x = case.hidden.clone().requires_grad_()
    h = x * 2.0
    total = head_loss(h) + ha.loss(h, case.anchors, case.rewards, **case.kwargs())
    (g1,) = torch.autograd.grad(total, x, retain_graph=True)
    (g2,) = torch.autograd.grad(total, x)
    torch.testing.assert_close(g1, g2)
    x_ref = case.hidden.clone().requires_grad_()
    h_ref = x_ref * 2.0
    (head_loss(h_ref) + alignment_loss(h_ref, case.index, case.rewards, case.labels)[0]).backward()
    torch.testing.assert_close(g1, x_ref.grad)
    (gh,) = torch.autograd.grad(
        ha.loss(h.detach().requires_grad_(), case.anchors, case.rewards, **case.kwargs()),
        x,
        allow_unused=True,
    )
    assert gh is None


def test_two_losses_on_one_hidden():
    case = make_case()
    x = case.hidden.clone().requires_grad_()
    a = ha.loss(x, case.anchors, case.rewards, **case.kwargs())
    b = ha.loss(x, case.anchors, case.rewards, loss_type="mse", **case.kwargs())
    (a + 2 * b).backward()
    h64 = case.hidden.clone().requires_grad_()
    ra = alignment_loss(h64, case.index, case.rewards, case.labels)[0]
    rb = alignment_loss(h64, case.index, case.rewards, case.labels, loss_type="mse")[0]
    (ra + 2 * rb).backward()
    torch.testing.assert_close(x.grad, h64.grad)


def test_double_backward_is_refused_clearly():
    case = make_case(anchor_prob=1.0, correct_prob=1.0)
    x = case.hidden.clone().requires_grad_()
    value = ha.loss(x, case.anchors, case.rewards, **case.kwargs())
    (g,) = torch.autograd.grad(value, x, create_graph=True)
    torch.testing.assert_close(g, reference_grad(x, case))  # first order still exact
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        g.sum().backward()


def test_create_graph_keeps_other_paths_differentiable():
    case = make_case(anchor_prob=1.0, correct_prob=1.0)
    x = case.hidden.clone().requires_grad_()
    h = x * 1.0
    total = head_loss(h) + ha.loss(h, case.anchors, case.rewards, **case.kwargs())
    (g,) = torch.autograd.grad(total, x, create_graph=True)
    torch.testing.assert_close(g.detach(), reference_grad(x, case, head=head_loss))


def test_hook_registered_once_per_tensor():
    case = make_case()
    x = case.hidden.clone().requires_grad_()
    for _ in range(3):
        ha.loss(x, case.anchors, case.rewards, **case.kwargs())
    assert len(x._backward_hooks) == 1


def test_no_grad_and_detached_hidden():
    case = make_case()
    with torch.no_grad():
        value = ha.loss(
            case.hidden.clone().requires_grad_(), case.anchors, case.rewards, **case.kwargs()
        )
    assert not value.requires_grad
    value = ha.loss(case.hidden, case.anchors, case.rewards, **case.kwargs())
    assert not value.requires_grad


def test_row_grad_materialises_for_any_other_op():
    h = torch.zeros(2, 3, 4)
    g = AnchorRowGrad(h, torch.tensor([1, -1]), torch.ones(2, 4))
    dense = g * 2  # not add: falls back to a plain tensor
    assert type(dense) is torch.Tensor
    assert dense.view(-1, 4)[1].tolist() == [2.0] * 4 and dense.sum().item() == 8.0


# ---------------------------------------------------------------------------------------------
# Gradients that something other than the autograd engine still holds are never written into.


def _keep(store, tensor):
    store.append((tensor, tensor.detach().clone()))


def _assert_unchanged(kept):
    assert kept, "no gradient was kept: the hook did not run"
    for tensor, value_when_kept in kept:
        torch.testing.assert_close(tensor, value_when_kept, rtol=0, atol=0)


def _case():
    return make_case(batch=8, group=4, seq=6, hidden_size=16, anchor_prob=1.0, correct_prob=1.0)


@pytest.mark.parametrize("kept_side", ["grad_input", "grad_output"])
def test_kept_module_gradient_is_not_modified(kept_side):
    """hidden = x * 1.0 feeds a linear head and the loss; a module hook on the head keeps one
    of its gradients, each kept with a clone of its value at the time it was kept."""
    kept = []

    def hook(module, grad_input, grad_output):
        _keep(kept, (grad_input if kept_side == "grad_input" else grad_output)[0])

    case = _case()
    x = case.hidden.clone().requires_grad_()
    h = x * 1.0
    torch.manual_seed(0)
    head = torch.nn.Linear(case.hidden.shape[-1], 5, dtype=x.dtype)
    head.register_full_backward_hook(hook)
    logits = head(h)
    (logits.square().mean() + ha.loss(h, case.anchors, case.rewards, **case.kwargs())).backward()
    expected = reference_grad(x, case, head=lambda t: head.double()(t).square().mean())
    torch.testing.assert_close(x.grad, expected)
    _assert_unchanged(kept)


def test_gradient_stashed_by_a_function_is_not_modified():
    """An identity op whose backward stashes its gradient and passes the same tensor on: the
    LM head's gradient w.r.t. hidden is then exactly the stashed tensor."""
    kept = []

    class Stash(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            _keep(kept, g)
            return g

    case = _case()
    x = case.hidden.clone().requires_grad_()
    h = x * 1.0
    align = ha.loss(h, case.anchors, case.rewards, **case.kwargs())
    (Stash.apply(h).sin().sum() + align).backward()
    _assert_unchanged(kept)
    torch.testing.assert_close(x.grad, reference_grad(x, case, head=lambda t: t.sin().sum()))


def test_tensor_hook_after_the_loss_keeps_the_delivered_gradient():
    kept = []
    case = _case()
    x = case.hidden.clone().requires_grad_()
    h = x * 1.0
    total = head_loss(h) + ha.loss(h, case.anchors, case.rewards, **case.kwargs())
    h.register_hook(lambda g: _keep(kept, g))
    # A second backward through the same graph accumulates into x.grad: the kept tensor must
    # not be what gets accumulated into.
    total.backward(retain_graph=True)
    total.backward()
    _assert_unchanged(kept)
    torch.testing.assert_close(x.grad, 2 * reference_grad(x, case, head=head_loss))


@pytest.mark.parametrize("leaf", [False, True])
def test_row_grad_kept_by_an_earlier_hook_materialises_to_the_full_gradient(leaf):
    """A hook registered before the loss receives the symbolic sum and keeps it unmaterialised;
    whenever it is read later it is the complete gradient, and reading it changes nothing."""
    kept = []
    case = _case()
    x = case.hidden.clone().requires_grad_()
    h = x if leaf else x * 1.0
    h.register_hook(lambda g: kept.append(g))
    (head_loss(h) + ha.loss(h, case.anchors, case.rewards, **case.kwargs())).backward()
    expected = reference_grad(x, case, head=head_loss)
    (g,) = kept
    assert type(g) is AnchorRowGrad
    grad_before = x.grad.clone()
    torch.testing.assert_close(g * 1, expected)
    torch.testing.assert_close(g.materialize(), expected)
    torch.testing.assert_close(x.grad, grad_before, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, expected)


def test_engine_accumulates_with_add_not_in_place():
    """The subclass intercepts only out-of-place `add`: the engine never accumulates into a
    tensor subclass or with one in place (if that changed, this spy would see `add_`)."""
    seen = []
    original = AnchorRowGrad.__torch_dispatch__.__func__

    def spy(cls, func, types, args=(), kwargs=None):
        seen.append(func)
        return original(cls, func, types, args, kwargs)

    case = _case()
    AnchorRowGrad.__torch_dispatch__ = classmethod(spy)
    try:
        for align_first in (False, True):
            x = case.hidden.clone().requires_grad_()
            h = x * 1.0
            head = torch.nn.Linear(16, 5, dtype=x.dtype)
            if align_first:
                a = ha.loss(h, case.anchors, case.rewards, **case.kwargs())
            logits = head(h)
            if not align_first:
                a = ha.loss(h, case.anchors, case.rewards, **case.kwargs())
            (logits.square().sum() + a).backward()
    finally:
        AnchorRowGrad.__torch_dispatch__ = classmethod(original)
    assert torch.ops.aten.add.Tensor in seen
    assert torch.ops.aten.add_.Tensor not in seen
