"""Random inputs for the DAPO tests."""

from __future__ import annotations

import math

import torch

from hidden_align import dapo

from reference import policy_loss as reference_policy_loss

MODES = [
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
]
# verl's global normalisers (global_batch_info): none, and two sets with dp_size > 1.
NORMALISERS = [
    {},
    {"batch_num_tokens": 37, "dp_size": 4, "global_batch_size": 11},
    {"batch_num_tokens": 20, "dp_size": 2, "global_batch_size": 7, "loss_scale_factor": 5},
]


def policy_case(
    batch=6, seq=9, dtype=torch.float32, per_rollout_adv=False, spread=1.0, masked_rows=(2,)
):
    """log-probs with log-ratios up to +-3*spread (clip and dual clip active), advantages of both
    signs and exact zeros, a ragged mask with fully masked rows, and garbage (NaN, inf) at
    masked positions."""
    logp = -torch.rand(batch, seq, dtype=torch.float64) * 3
    old = logp + (torch.rand(batch, seq, dtype=torch.float64) - 0.5) * 6 * spread
    if per_rollout_adv:
        adv = torch.randn(batch, dtype=torch.float64)
        adv[0] = 0.0
    else:
        adv = torch.randn(batch, seq, dtype=torch.float64)
        adv[:, 0] = 0.0
    lengths = torch.randint(1, seq + 1, (batch,))
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    for r in masked_rows:
        if r < batch:
            mask[r] = False
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask


def with_garbage(t: torch.Tensor, mask: torch.Tensor, value=float("nan")) -> torch.Tensor:
    """t with `value` at masked positions (advantages [B] are left alone)."""
    if t.dim() != mask.dim():
        return t
    return torch.where(mask, t, torch.full_like(t, value))


def clear_of_clip_bounds(logp, old, mask, margin=0.05, clip_low=0.2, clip_high=0.28, clip_c=10.0):
    """mask without the tokens whose log-ratio lies within `margin` of a clip bound (1 - clip_low,
    1 + clip_high, the dual clip clip_c). Rounded to a half dtype, such a token's ratio may cross
    the bound (or tie with it, and torch.maximum splits a tie's gradient), so PyTorch's own
    half-precision gradient there is 0 or half the exact one: its error, and with it the bound of
    tests/precision.py, would be as large as the gradient. The log-ratio of a half-precision
    computation is off by at most ~0.011 (bfloat16: half an ulp of d in [2, 4), the rounding of
    exp and of the bounds), so 0.05 leaves a wide margin; the clip decisions at the bounds
    themselves are tested in float32."""
    d = logp.double() - old.double()
    near = torch.zeros_like(mask, dtype=torch.bool)
    for bound in (1 - clip_low, 1 + clip_high, clip_c):
        near |= (d - math.log(bound)).abs() < margin
    return mask & ~near


def run_ours(logp, old, adv, mask, **kw):
    # A logp that requires grad is used as it is (a clone would drop an odd offset's layout).
    x = logp if logp.requires_grad else logp.detach().clone().requires_grad_()
    loss, metrics = dapo.policy_loss(x, old, adv, mask, **kw)
    (g,) = torch.autograd.grad(loss, x)
    return loss, metrics, g


def run_reference(logp, old, adv, mask, dtype=torch.float64, **kw):
    """The reference loss, metrics and gradient, computed in ``dtype`` (float64: the exact
    result; the inputs' half dtype: PyTorch's own low-precision result, the yardstick of
    tests/precision.py)."""
    names = {
        "clip_ratio_low": "clip_low",
        "clip_ratio_high": "clip_high",
        "clip_ratio_c": "clip_c",
        "log_ratio_clamp": "clamp",
        "loss_agg_mode": "agg",
        "rollout_is_weights": "weights",
    }
    kw = {names.get(k, k): v for k, v in kw.items()}
    x = logp.detach().to(dtype).requires_grad_()
    loss, metrics = reference_policy_loss(x, old, adv, mask, dtype=dtype, **kw)
    (g,) = torch.autograd.grad(loss, x) if loss.requires_grad else (torch.zeros_like(x),)
    return loss, metrics, g


def assert_matches(ours, ref, atol=1e-6, rtol=1e-5):
    loss, metrics, g = ours
    rloss, rmetrics, rg = ref
    torch.testing.assert_close(loss.double(), rloss.detach(), atol=atol, rtol=rtol)
    for k in rmetrics:
        torch.testing.assert_close(metrics[k].double(), rmetrics[k].detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(g.double(), rg, atol=atol, rtol=rtol)
