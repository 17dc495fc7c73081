"""How the alignment gradient reaches `hidden`: exact in every autograd position, and added in
place into the gradient `hidden` already receives (no pass over all of `hidden`)."""

import pytest
import torch

import hidden_align as ha
from hidden_align._row_grad import AnchorRowGrad

from cases import make_case
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


def _consumer_of(root, target):
    """The node under `root` with an edge into `target` (the LM head's last op on hidden)."""
    todo, seen = [root], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nexts = [n for n, _ in node.next_functions]
        if target in nexts:
            return node
        todo.extend(nexts)
    raise AssertionError("no consumer found")


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

    _consumer_of(logits.grad_fn, h.grad_fn).register_hook(record_head)
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
