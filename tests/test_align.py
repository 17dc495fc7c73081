"""hidden_align.loss against the float64 reference: values, statistics and gradients."""

import itertools

import pytest
import torch

import hidden_align as ha

from cases import make_case
from reference import alignment_loss

LOSS_TYPES = ["cosine", "centroid", "mse", "contrastive"]
REDUCTIONS = ["mean", "sum", "none"]


def scalarize(result, weights=None):
    """A scalar to differentiate: the loss, or a weighted sum of per-group values."""
    if isinstance(result, tuple):
        values = result[0]
        w = weights if weights is not None else torch.linspace(0.5, 1.5, values.numel())
        return (values * w.to(values.dtype)).sum()
    return result


def check_against_reference(case, loss_type, reduction, atol=1e-10, rtol=1e-9, **extra):
    hidden = case.hidden.detach().clone().requires_grad_()
    ours, stats = ha.loss(
        hidden,
        case.anchors,
        case.rewards,
        loss_type=loss_type,
        reduction=reduction,
        return_stats=True,
        **case.kwargs(),
        **extra,
    )
    h64 = case.hidden.detach().double().requires_grad_()
    ref, ref_stats = alignment_loss(
        h64,
        case.index,
        case.rewards,
        case.labels,
        loss_type=loss_type,
        reduction=reduction,
        **extra,
    )
    if reduction == "none":
        assert torch.equal(ours[1], ref[1])
        torch.testing.assert_close(ours[0].double(), ref[0].detach(), atol=atol, rtol=rtol)
    else:
        assert ours.shape == ()
        torch.testing.assert_close(ours.double(), ref.detach(), atol=atol, rtol=rtol)
    assert int(stats["valid_groups"]) == ref_stats["valid_groups"]
    assert int(stats["anchored_correct"]) == ref_stats["anchored_correct"]
    torch.testing.assert_close(
        stats["mean_cosine"].double(),
        ref_stats["mean_cosine"].double(),
        atol=atol,
        rtol=rtol,
        equal_nan=True,
    )
    (g_ours,) = torch.autograd.grad(scalarize(ours), hidden, allow_unused=False)
    ref_scalar = scalarize(ref)
    if ref_scalar.requires_grad:
        (g_ref,) = torch.autograd.grad(ref_scalar, h64, allow_unused=True)
        g_ref = torch.zeros_like(h64) if g_ref is None else g_ref
    else:
        g_ref = torch.zeros_like(h64)
    assert type(g_ours) is torch.Tensor and g_ours.shape == hidden.shape
    torch.testing.assert_close(g_ours.double(), g_ref, atol=atol, rtol=rtol)
    return ours, g_ours


@pytest.mark.parametrize(
    "loss_type,reduction,layout,anchor_form",
    list(itertools.product(LOSS_TYPES, REDUCTIONS, ["padded", "packed"], ["index", "mask"])),
)
def test_matches_reference(loss_type, reduction, layout, anchor_form):
    case = make_case(layout=layout, anchor_form=anchor_form)
    check_against_reference(case, loss_type, reduction)


@pytest.mark.parametrize("grouping", ["ids", "size"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grouping_forms(grouping, loss_type):
    case = make_case(batch=16, group=4, grouping=grouping)
    check_against_reference(case, loss_type, "mean")


@pytest.mark.parametrize(
    "batch,seq,hidden_size,group",
    [(1, 1, 1, 1), (1, 5, 3, 1), (2, 3, 1, 2), (3, 11, 7, 3), (6, 13, 1, 1), (9, 17, 33, 9)],
)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_odd_shapes(batch, seq, hidden_size, group, loss_type):
    case = make_case(batch=batch, seq=seq, hidden_size=hidden_size, group=group, correct_prob=0.8)
    check_against_reference(case, loss_type, "mean")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_groups_with_zero_one_two_and_all_correct(loss_type):
    # Four groups of four: 0, 1, 2 and 4 correct rollouts; every rollout anchored.
    correct = [0, 0, 0, 0] + [1, 0, 0, 0] + [0, 1, 1, 0] + [1, 1, 1, 1]
    case = make_case(batch=16, group=4, grouping="size", anchor_prob=1.0, correct=correct)
    result, _ = check_against_reference(case, loss_type, "none")
    valid = result[1].tolist()
    if loss_type == "contrastive":
        assert valid == [False, False, True, False]  # the all-correct group has no negative
    else:
        assert valid == [False, False, True, True]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_anchor_at_all_gives_zero_loss_and_zero_grad(reduction):
    case = make_case(anchor_prob=0.0)
    ours, grad = check_against_reference(case, "cosine", reduction)
    value = ours[0] if reduction == "none" else ours
    assert torch.all(value == 0) and not torch.isnan(value).any()
    assert torch.all(grad == 0)


def test_bool_and_accuracy_rewards_agree_with_scores():
    case = make_case()
    correct = case.rewards > 0
    kwargs = case.kwargs()
    a = ha.loss(case.hidden, case.anchors, case.rewards, **kwargs)
    b = ha.loss(case.hidden, case.anchors, correct, **kwargs)
    c = ha.loss(case.hidden, case.anchors, correct.double(), **kwargs)  # accuracies 1/0
    assert a.item() == b.item() == c.item()


def test_threshold_and_eps_and_tau_are_honoured():
    case = make_case(anchor_prob=1.0)
    case.rewards = torch.rand(case.rewards.shape[0], dtype=torch.float64)
    check_against_reference(case, "contrastive", "mean", threshold=0.3, tau=0.5)
    check_against_reference(case, "cosine", "sum", threshold=0.7, eps=1e-3)


def test_norm_clamp_of_tiny_states():
    case = make_case(anchor_prob=1.0, correct_prob=1.0)
    case.hidden = case.hidden * 1e-9  # norms below eps = 1e-8: u = h / eps
    for loss_type in LOSS_TYPES[:3]:
        check_against_reference(case, loss_type, "mean")


def test_strided_hidden_is_read_in_place():
    case = make_case(layout="padded")
    base = case.hidden.detach().transpose(0, 1).contiguous().transpose(0, 1)  # [B, T, H], T-major
    assert not base.is_contiguous()
    a = ha.loss(base, case.anchors, case.rewards, **case.kwargs())
    b = ha.loss(base.contiguous(), case.anchors, case.rewards, **case.kwargs())
    assert a.item() == b.item()
    sliced = torch.randn(12, 7, 10, dtype=torch.float64)[..., ::2]  # feature stride 2
    a = ha.loss(sliced, case.anchors, case.rewards, **case.kwargs())
    b = ha.loss(sliced.contiguous(), case.anchors, case.rewards, **case.kwargs())
    assert a.item() == b.item()


def test_deterministic_bits():
    case = make_case(batch=64, seq=9, hidden_size=300, group=16, dtype=torch.float32)
    runs = []
    for _ in range(3):
        h = case.hidden.detach().clone().requires_grad_()
        value = ha.loss(h, case.anchors, case.rewards, **case.kwargs())
        value.backward()
        runs.append((value.detach(), h.grad))
    for value, grad in runs[1:]:
        assert torch.equal(value, runs[0][0]) and torch.equal(grad, runs[0][1])


def test_loss_dtype_follows_accumulator():
    for dtype, expected in [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ]:
        case = make_case(dtype=dtype)
        assert ha.loss(case.hidden, case.anchors, case.rewards, **case.kwargs()).dtype == expected


def _backends():
    names = ["cpu"]
    if ha.cuda_status()["emulation_built"]:
        names.append("cuda-emulated")
    return names


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("threshold", [1.5, -0.5, 3.0])
def test_uint8_rewards_are_numbers_compared_with_the_threshold(backend, threshold):
    """uint8 rewards follow `rewards > threshold` on every backend (only bool means true/false),
    with thresholds outside [0, 1) where the two rules would differ."""
    case = make_case(batch=8, group=4, dtype=torch.float32, anchor_prob=1.0)
    levels = torch.tensor([0, 1, 2, 3, 4, 2, 1, 3], dtype=torch.uint8)
    with ha.backend(backend):
        ours, stats = ha.loss(
            case.hidden,
            case.anchors,
            levels,
            threshold=threshold,
            return_stats=True,
            **case.kwargs(),
        )
    correct = levels.double() > threshold
    ref, _ = alignment_loss(
        case.hidden.double(), case.index, torch.where(correct, 1.0, 0.0), case.labels
    )
    assert int(stats["anchored_correct"]) == int(correct.sum())
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)
