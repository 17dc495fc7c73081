"""The accuracy rule for bfloat16/float16 results (flash-attention's): the max abs error of ours
against the float64 reference is at most twice the max abs error of PyTorch's own computation of
the same formula in the half dtype, plus a small absolute floor. Used for values and gradients by
the CPU, emulated-CUDA and GPU suites."""

from __future__ import annotations

import math

import torch

# Our kernels accumulate in float32, so ours can be off by float32 rounding (about 1e-7 on the
# O(1) values here, a few 1e-7 after sums of thousands of terms) where PyTorch's half-precision
# error vanishes by luck (an exact fraction, a value that rounds to itself); the floor absorbs
# that. It is at least 400x below the gradients these rules check (max |grad| from 4e-4 at the
# GPU suite's shapes to 6e-2), so a zero gradient, or one scaled by 0.9, cannot hide in it.
FLOOR = 1e-6


def max_abs_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    """max |x - exact| in float64 over the positions where exact is not NaN (where it is, x must
    be NaN too)."""
    x = x.detach().double().cpu()
    exact = exact.detach().double().cpu()
    assert x.shape == exact.shape, (x.shape, exact.shape)
    nan = torch.isnan(exact)
    assert torch.equal(torch.isnan(x), nan), "NaN where the reference has none, or vice versa"
    diff = (x - exact)[~nan].abs()
    return diff.max().item() if diff.numel() else 0.0


def assert_within_twice_torch_error(
    ours: torch.Tensor,
    exact: torch.Tensor,
    low: torch.Tensor,
    name: str,
    floor: float = FLOOR,
    reject_zero: bool = True,
) -> None:
    """err(ours) <= 2 err(low) + floor, errors against `exact` (the float64 reference); `low` is
    the same formula computed by PyTorch in the half dtype. With reject_zero (the default), the
    bound must also stay below max |exact|, so that the check would fail a result of zeros: a
    yardstick as large as the result itself checks nothing (turn it off for statistics whose
    exact value may be near zero)."""
    err = max_abs_error(ours, exact)
    err_low = max_abs_error(low, exact)
    assert math.isfinite(err_low), f"{name}: PyTorch's half-precision result is not finite"
    bound = 2 * err_low + floor
    assert err <= bound, (
        f"{name}: max abs error {err:.3g} > 2 x PyTorch's half-precision error {err_low:.3g} "
        f"+ {floor:.1g} = {bound:.3g}"
    )
    if reject_zero:
        scale = exact.detach().double().abs().nan_to_num(0.0).max().item() if exact.numel() else 0
        assert scale == 0 or bound < scale, (
            f"{name}: the bound {bound:.3g} is not below max |reference| {scale:.3g}: "
            "it would pass a zero result"
        )
