"""Random inputs for the DAPO tests."""

from __future__ import annotations

import torch

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
