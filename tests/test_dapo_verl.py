"""Parity with verl's own functions (the `parity` extra). Skipped with a reason without verl.

Values to float32 rounding, metrics equal, gradients equal to autograd through verl. verl
leaks NaN from masked positions in some modes and divides by empty counts, so these tests use
finite garbage and non-empty batches (the documented differences are tested in test_dapo.py).
"""

import itertools
import warnings

import numpy as np
import pytest
import torch
from dapo_cases import MODES, NORMALISERS, policy_case, with_garbage

from hidden_align import dapo

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        from verl.trainer.ppo import core_algos
        from verl.workers.config import ActorConfig
    except Exception as exc:  # noqa: BLE001 - any import failure means no oracle
        pytest.skip(
            f"verl is not importable ({type(exc).__name__}: {exc}); install the parity extra: "
            "pip install -e '.[test,parity]'",
            allow_module_level=True,
        )


def verl_policy_loss(
    logp, old, adv, mask, mode, low=0.2, high=0.28, c=10.0, weights=None, **global_info
):
    cfg = ActorConfig(
        clip_ratio_low=low,
        clip_ratio_high=high,
        clip_ratio_c=c,
        strategy="fsdp",
        ppo_micro_batch_size_per_gpu=1,
        ppo_mini_batch_size=256,
        rollout_n=1,
    )
    cfg.global_batch_info.update(global_info)  # the field is frozen, its dict is not
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp)
    x = logp.detach().clone().requires_grad_()
    loss, metrics = core_algos.compute_policy_loss_vanilla(
        old, x, adv, mask.float(), loss_agg_mode=mode, config=cfg, rollout_is_weights=weights
    )
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), {k.split("/")[1]: v for k, v in metrics.items()}, g


def ours(logp, old, adv, mask, mode, low=0.2, high=0.28, c=10.0, weights=None, **global_info):
    x = logp.detach().clone().requires_grad_()
    loss, metrics = dapo.policy_loss(
        x,
        old,
        adv,
        mask,
        clip_ratio_low=low,
        clip_ratio_high=high,
        clip_ratio_c=c,
        loss_agg_mode=mode,
        rollout_is_weights=weights,
        **global_info,
    )
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), {k: v.item() for k, v in metrics.items()}, g


def assert_parity(a, b):
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=2e-6)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        # ppo_kl averages log-ratios up to |20| whose mean is small: float32 summation of such
        # terms (verl's and ours, in different orders) carries an absolute error near 1e-6.
        assert a[1][k] == pytest.approx(b[1][k], rel=2e-6, abs=2e-6), k
    torch.testing.assert_close(a[2], b[2], atol=1e-7, rtol=2e-6)


@pytest.mark.parametrize("mode,norm", list(itertools.product(MODES, range(len(NORMALISERS)))))
@pytest.mark.parametrize("per_rollout_adv", [False, True])
def test_policy_loss_parity(mode, norm, per_rollout_adv):
    logp, old, adv, mask = policy_case(
        batch=8, seq=33, per_rollout_adv=per_rollout_adv, masked_rows=(3,)
    )
    # Finite garbage at masked positions: verl multiplies by the mask, so only NaN would leak.
    logp, old = with_garbage(logp, mask, 7.5), with_garbage(old, mask, -3.0)
    kw = dict(mode=mode, **NORMALISERS[norm])
    assert_parity(ours(logp, old, adv, mask, **kw), verl_policy_loss(logp, old, adv, mask, **kw))


def test_policy_loss_parity_dual_clip_clamp_zero_advantage_and_weights():
    logp, old, adv, mask = policy_case(batch=8, seq=33, spread=10.0)
    assert ((logp - old).abs() > 20).any()  # the log-ratio clamp is active
    adv[:, 1] = 0.0
    weights = torch.rand_like(logp)
    for kw in [dict(c=3.0), dict(low=0.1, high=0.4, c=2.0), dict(weights=weights)]:
        for mode in ("token-mean", "seq-mean-token-mean"):
            assert_parity(
                ours(logp, old, adv, mask, mode, **kw),
                verl_policy_loss(logp, old, adv, mask, mode, **kw),
            )
    _, metrics, _ = ours(logp, old, adv, mask, "token-mean", c=3.0)
    assert metrics["pg_clipfrac_lower"] > 0 and metrics["pg_clipfrac"] > 0


@pytest.mark.parametrize("norm_by_std", [True, False])
@pytest.mark.parametrize("eps", [1e-6, 1e-9])
def test_group_advantages_parity(norm_by_std, eps):
    batch, g = 48, 6
    labels = (torch.arange(batch) // g)[torch.randperm(batch)]
    labels[0] = 1000  # a singleton group
    rewards = torch.zeros(batch, 7)
    rewards[torch.arange(batch), torch.randint(0, 7, (batch,))] = torch.where(
        torch.rand(batch) < 0.5, 1.0, -1.0
    )
    rewards[labels == 2] = 0.0  # a constant group
    response_mask = torch.ones(batch, 7)
    index = np.array([f"uid-{int(i)}" for i in labels])
    ref, _ = core_algos.compute_grpo_outcome_advantage(
        rewards, response_mask, index, epsilon=eps, norm_adv_by_std_in_grpo=norm_by_std
    )
    got = dapo.group_advantages(
        rewards, group_ids=dapo.group_ids_from_uids(index), eps=eps, norm_by_std=norm_by_std
    )
    torch.testing.assert_close(got, ref[:, 0], atol=1e-6, rtol=2e-6)
