"""Low-precision inputs and gradcheck.

Rule for bfloat16/float16 (flash-attention's, tests/precision.py): the error against the float64
reference is at most twice the error of PyTorch's own low-precision computation of the same
formula, plus a small absolute floor.
"""

import pytest
import torch
from precision import assert_within_twice_torch_error

import hidden_align as ha

from cases import make_case
from reference import alignment_loss

LOSS_TYPES = ["cosine", "centroid", "mse", "contrastive"]


def torch_low_precision(hidden, case, loss_type):
    """The same loss computed by PyTorch entirely in hidden's dtype (the error yardstick)."""
    ref, _ = alignment_loss(hidden, case.index, case.rewards, case.labels, loss_type=loss_type)
    return ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_half_precision_within_twice_torch_error(dtype, loss_type, layout):
    case = make_case(batch=16, seq=9, hidden_size=64, group=8, dtype=dtype, layout=layout)
    exact_in = case.hidden.double().requires_grad_()
    exact, _ = alignment_loss(exact_in, case.index, case.rewards, case.labels, loss_type=loss_type)
    (g_exact,) = torch.autograd.grad(exact, exact_in)

    low_in = case.hidden.clone().requires_grad_()
    low = torch_low_precision(low_in, case, loss_type)
    (g_low,) = torch.autograd.grad(low, low_in)

    ours_in = case.hidden.clone().requires_grad_()
    ours = ha.loss(ours_in, case.anchors, case.rewards, loss_type=loss_type, **case.kwargs())
    (g_ours,) = torch.autograd.grad(ours, ours_in)
    assert g_ours.dtype == dtype

    assert_within_twice_torch_error(ours, exact, low, "loss")
    assert_within_twice_torch_error(g_ours, g_exact, g_low, "gradient")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_float32_close_to_reference(loss_type):
    case = make_case(batch=16, seq=9, hidden_size=64, group=8, dtype=torch.float32)
    h = case.hidden.clone().requires_grad_()
    ours = ha.loss(h, case.anchors, case.rewards, loss_type=loss_type, **case.kwargs())
    (g,) = torch.autograd.grad(ours, h)
    h64 = case.hidden.double().requires_grad_()
    ref, _ = alignment_loss(h64, case.index, case.rewards, case.labels, loss_type=loss_type)
    (g_ref,) = torch.autograd.grad(ref, h64)
    torch.testing.assert_close(ours.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gradcheck(loss_type, reduction, layout):
    case = make_case(batch=8, seq=4, hidden_size=3, group=4, layout=layout, anchor_prob=0.9)
    hidden = case.hidden.detach().clone().requires_grad_()

    def fn(h):
        out = ha.loss(
            h, case.anchors, case.rewards, loss_type=loss_type, reduction=reduction, **case.kwargs()
        )
        return out[0] if reduction == "none" else out

    assert torch.autograd.gradcheck(fn, (hidden,), eps=1e-6, atol=1e-7)


def test_eager_reference_agrees_with_reference():
    """The benchmark's eager formulation computes the same loss (so the speed ratio is fair)."""
    from reference import eager_alignment_loss

    case = make_case(batch=16, group=4, grouping="size", dtype=torch.float64)
    ours = ha.loss(case.hidden, case.anchors, case.rewards, group_size=4)
    eager = eager_alignment_loss(case.hidden, case.index, case.rewards, 4)
    torch.testing.assert_close(ours, eager.double(), atol=1e-6, rtol=1e-6)
