"""Bad input raises the documented exception; NaN/inf handling; zero-copy import."""

import pytest
import torch

import hidden_align as ha
from hidden_align import _native

from cases import make_case

B, T, H = 4, 5, 3


def call(**overrides):
    args = dict(
        hidden=torch.randn(B, T, H),
        mask=torch.tensor([0, 1, -1, 4]),
        rewards=torch.tensor([1.0, 1.0, 0.0, 1.0]),
        group_size=2,
    )
    args.update(overrides)
    hidden, mask, rewards = args.pop("hidden"), args.pop("mask"), args.pop("rewards")
    return ha.loss(hidden, mask, rewards, **args)


@pytest.mark.parametrize(
    "overrides,error,pattern",
    [
        (dict(hidden=torch.randn(B, T)), ha.ArgumentError, r"mask: .*\[0, N\).*got 9"),
        (
            dict(hidden=torch.randn(B, T, H, 2)),
            ha.ShapeError,
            r"hidden: expected shape \[B, T, H\]",
        ),
        (dict(hidden=torch.randn(B + 1, T, H)), ha.ShapeError, "hidden.*B = 4"),
        (
            dict(hidden=torch.randint(0, 5, (B, T, H))),
            ha.DtypeError,
            "hidden: expected dtype float32",
        ),
        (dict(rewards=torch.ones(B, 1)), ha.ShapeError, r"rewards: expected shape \[B\]"),
        (dict(mask=torch.tensor([0, 1, 2])), ha.ShapeError, "mask"),
        (dict(mask=torch.tensor([0, 1, 5, 0])), ha.ArgumentError, r"mask: .*\[0, T\).*got 5"),
        (dict(mask=torch.tensor([0, -2, 1, 0])), ha.ArgumentError, "mask"),
        (dict(mask=torch.ones(B, T, dtype=torch.bool)), ha.ArgumentError, "at most one anchor"),
        (
            dict(mask=torch.zeros(B, T + 1, dtype=torch.bool)),
            ha.ShapeError,
            r"mask: expected shape \[B, T\]",
        ),
        (dict(mask=torch.zeros(B, dtype=torch.float32)), ha.DtypeError, "mask"),
        (
            dict(group_size=3),
            ha.ArgumentError,
            "group_size: expected a divisor of the batch size B = 4",
        ),
        (dict(group_size=0), ha.ArgumentError, "group_size"),
        (dict(group_size=-2), ha.ArgumentError, "group_size"),
        (dict(group_size=2.0), ha.ArgumentError, "group_size: expected an int"),
        (dict(group_size=None), ha.ArgumentError, "exactly one of group_ids and group_size"),
        (dict(group_ids=torch.zeros(B, dtype=torch.long)), ha.ArgumentError, "exactly one"),
        (
            dict(group_size=None, group_ids=torch.zeros(B + 1, dtype=torch.long)),
            ha.ShapeError,
            "group_ids",
        ),
        (dict(group_size=None, group_ids=torch.zeros(B)), ha.DtypeError, "group_ids"),
        (dict(loss_type="cos"), ha.ArgumentError, "loss_type"),
        (dict(reduction="avg"), ha.ArgumentError, "reduction"),
        (dict(eps=0.0), ha.ArgumentError, "eps"),
        (dict(tau=-1.0), ha.ArgumentError, "tau"),
        (dict(threshold=float("nan")), ha.ArgumentError, "threshold"),
        (dict(threshold="0.5"), ha.ArgumentError, "threshold: expected a number"),
        (dict(tau=None), ha.ArgumentError, "tau: expected a number"),
        (dict(hidden=[1.0]), ha.ArgumentError, "hidden: expected a torch.Tensor"),
        (dict(cu_seqlens=torch.tensor([0, 5, 10, 15, 20])), ha.ArgumentError, "cu_seqlens"),
    ],
)
def test_bad_input_raises(overrides, error, pattern):
    if isinstance(overrides.get("hidden"), torch.Tensor) and overrides["hidden"].dim() == 2:
        # 2-d hidden is the packed layout [N, H] with N = 4 rows: row 9 is out of range.
        overrides = dict(overrides, mask=torch.tensor([0, 1, -1, 9]))
    with pytest.raises(error, match=pattern):
        call(**overrides)


def test_packed_mask_needs_cu_seqlens_and_respects_sequences():
    hidden = torch.randn(10, H)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[1, 6]] = True
    rewards = torch.ones(2)
    with pytest.raises(ha.ArgumentError, match="cu_seqlens"):
        ha.loss(hidden, mask, rewards, group_size=2)
    with pytest.raises(ha.ArgumentError, match="non-decreasing"):
        ha.loss(hidden, mask, rewards, group_size=2, cu_seqlens=torch.tensor([0, 7, 4]))
    with pytest.raises(ha.ShapeError, match="cu_seqlens"):
        ha.loss(hidden, mask, rewards, group_size=2, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ha.ArgumentError, match="inside its sequence"):
        ha.loss(
            hidden, torch.tensor([6, 1]), rewards, group_size=2, cu_seqlens=torch.tensor([0, 4, 10])
        )
    two = mask.clone()
    two[2] = True
    with pytest.raises(ha.ArgumentError, match="at most one anchor"):
        ha.loss(hidden, two, rewards, group_size=2, cu_seqlens=torch.tensor([0, 4, 10]))
    ok = ha.loss(hidden, mask, rewards, group_size=2, cu_seqlens=torch.tensor([0, 4, 10]))
    assert torch.isfinite(ok)


def test_tensors_on_different_devices():
    meta = torch.ones(B, device="meta")
    with pytest.raises(ha.DeviceError, match="rewards: expected a tensor on cpu"):
        call(rewards=meta)
    with pytest.raises(ha.DeviceError, match="group_ids"):
        call(group_size=None, group_ids=torch.zeros(B, dtype=torch.long, device="meta"))


def test_errors_are_builtin_subclasses():
    assert issubclass(ha.ShapeError, ValueError) and issubclass(ha.ShapeError, ha.HiddenAlignError)
    assert issubclass(ha.DtypeError, TypeError)
    assert issubclass(ha.ArgumentError, ValueError)
    assert issubclass(ha.DeviceError, ValueError)
    assert issubclass(ha.CudaUnavailableError, RuntimeError)
    assert issubclass(ha.KernelError, RuntimeError)


def test_nan_in_a_participating_anchor_propagates_and_elsewhere_is_ignored():
    case = make_case(anchor_prob=1.0, correct_prob=1.0, dtype=torch.float32)
    clean = ha.loss(case.hidden, case.anchors, case.rewards, **case.kwargs())
    garbage = case.hidden.clone()
    b = 0
    pos = case.index[b].item()
    other = (pos + 1) % garbage.shape[1]
    garbage[b, other] = float("nan")  # a non-anchor row: never read
    assert ha.loss(garbage, case.anchors, case.rewards, **case.kwargs()).item() == clean.item()
    garbage[b, pos, 0] = float("inf")  # the anchor row itself
    h = garbage.requires_grad_()
    value = ha.loss(h, case.anchors, case.rewards, **case.kwargs())
    assert torch.isnan(value)
    value.backward()
    assert torch.isnan(h.grad).any()


def test_nan_reward_counts_as_incorrect():
    case = make_case(anchor_prob=1.0)
    rewards = case.rewards.clone()
    rewards[case.rewards <= 0] = float("nan")
    a = ha.loss(case.hidden, case.anchors, rewards, **case.kwargs())
    b = ha.loss(case.hidden, case.anchors, case.rewards, **case.kwargs())
    assert a.item() == b.item()


def test_zero_copy_import():
    hidden = torch.randn(6, 7, 8)
    assert _native.data_ptr(hidden) == hidden.data_ptr()
    view = hidden.transpose(0, 1)[1:]
    assert _native.data_ptr(view) == view.data_ptr()
    bf16 = torch.randn(3, 5, dtype=torch.bfloat16)[:, 1:]
    assert _native.data_ptr(bf16) == bf16.data_ptr()
