"""hidden_align.dapo against the formulas of docs/design.md section 5 (tests/reference.py)."""

import itertools
import warnings

import numpy as np
import pytest
import torch
from dapo_cases import (
    MODES,
    NORMALISERS,
    assert_matches,
    clear_of_clip_bounds,
    policy_case,
    run_ours,
    run_reference,
    with_garbage,
)
from precision import assert_within_twice_torch_error

import hidden_align as ha
from hidden_align import dapo

from reference import dynamic_sampling, grpo_advantages, overlong


@pytest.mark.parametrize("mode,norm", list(itertools.product(MODES, range(len(NORMALISERS)))))
@pytest.mark.parametrize("per_rollout_adv", [False, True])
def test_policy_loss_matches_reference(mode, norm, per_rollout_adv):
    logp, old, adv, mask = policy_case(dtype=torch.float64, per_rollout_adv=per_rollout_adv)
    kw = dict(loss_agg_mode=mode, **NORMALISERS[norm])
    assert_matches(
        run_ours(logp, old, adv, mask, **kw),
        run_reference(logp, old, adv, mask, **kw),
        atol=1e-12,
        rtol=1e-10,
    )


@pytest.mark.parametrize("mode", MODES)
def test_garbage_at_masked_positions_never_leaks(mode):
    logp, old, adv, mask = policy_case(dtype=torch.float32)
    clean = run_ours(logp, old, adv, mask, loss_agg_mode=mode)
    for value in (float("nan"), float("inf"), -float("inf")):
        dirty = [with_garbage(t, mask, value) for t in (logp, old, adv)]
        weights = with_garbage(torch.rand_like(logp), mask, value)
        loss, metrics, g = run_ours(*dirty, mask, loss_agg_mode=mode)
        assert torch.equal(loss, clean[0]) and torch.equal(g, clean[2])
        assert all(torch.equal(metrics[k], clean[1][k]) for k in metrics)
        loss_w, _, g_w = run_ours(*dirty, mask, loss_agg_mode=mode, rollout_is_weights=weights)
        assert torch.isfinite(loss_w) and torch.isfinite(g_w).all()
        assert torch.all(g[~mask] == 0)


def test_nan_at_a_valid_position_propagates():
    logp, old, adv, mask = policy_case(dtype=torch.float32, masked_rows=())
    logp = logp.clone()
    logp[0, 0] = float("nan")
    loss, _, g = run_ours(logp, old, adv, mask)
    assert torch.isnan(loss)


@pytest.mark.parametrize(
    "dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)]
)
def test_dtypes(dtype, atol):
    logp, old, adv, mask = policy_case(dtype=dtype)
    ours = run_ours(logp, old, adv, mask, loss_agg_mode="seq-mean-token-mean")
    assert ours[0].dtype == torch.float32 and ours[2].dtype == dtype
    ref = run_reference(logp, old, adv, mask, loss_agg_mode="seq-mean-token-mean")
    assert_matches(ours, ref, atol=atol, rtol=atol)


def test_clip_options_clamp_weights_and_mask_types():
    logp, old, adv, mask = policy_case(
        dtype=torch.float64, spread=10.0
    )  # |d| up to 30: clamp active
    assert ((logp - old).abs() > 20).any()
    weights = torch.rand_like(logp)
    for kw in [
        dict(clip_ratio_low=0.1, clip_ratio_high=0.5, clip_ratio_c=3.0),
        dict(log_ratio_clamp=None),
        dict(log_ratio_clamp=5.0),
        dict(rollout_is_weights=weights),
    ]:
        assert_matches(
            run_ours(logp, old, adv, mask, **kw),
            run_reference(logp, old, adv, mask, **kw),
            atol=1e-12,
            rtol=1e-10,
        )
    ref = run_ours(logp, old, adv, mask)
    for m in (
        mask.to(torch.uint8),
        mask.long(),
        mask.int(),
        mask.float(),
        mask.double(),
        mask.bfloat16(),
    ):
        ours = run_ours(logp, old, adv, m)
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[2], ref[2])


def test_strided_inputs():
    logp, old, adv, mask = policy_case(dtype=torch.float32)
    wide = torch.randn(6, 20)
    wide[:, 3:12] = logp
    strided = wide[:, 3:12].requires_grad_()  # run_ours keeps a tensor that requires grad
    assert not strided.is_contiguous()
    ours = run_ours(strided, old.t().contiguous().t(), adv, mask)
    ref = run_ours(logp, old, adv, mask)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[2], ref[2])


def test_all_masked_gives_zero_not_nan():
    logp, old, adv, mask = policy_case(dtype=torch.float32)
    mask = torch.zeros_like(mask)
    for mode in MODES:
        loss, metrics, g = run_ours(logp, old, adv, mask, loss_agg_mode=mode)
        assert loss.item() == 0 and torch.all(g == 0)
        assert all(v.item() == 0 for v in metrics.values())


def test_dual_clip_and_tie_gradients():
    # ratio exactly 1 (d = 0): L1 == L2, the gradient passes whole; A = 0 gives zero gradient.
    logp = torch.zeros(1, 4, dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 0.0, -2.0]], dtype=torch.float64)
    # last token: ratio e^3 ~ 20 with A < 0, beyond c = 3: the dual clip bounds its loss
    old = torch.tensor([[0.0, 0.0, 0.0, -3.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    kw = dict(clip_ratio_c=3.0)
    assert_matches(
        run_ours(logp, old, adv, mask, **kw),
        run_reference(logp, old, adv, mask, **kw),
        atol=1e-12,
        rtol=1e-12,
    )
    loss, metrics, _ = run_ours(logp, old, adv, mask, **kw)
    assert metrics["pg_clipfrac_lower"].item() == pytest.approx(0.25)  # the dual clip engaged once


def test_policy_loss_errors():
    logp, old, adv, mask = policy_case()
    with pytest.raises(ha.ShapeError, match="old_log_prob"):
        dapo.policy_loss(logp, old[:, :-1], adv, mask)
    with pytest.raises(ha.ShapeError, match="advantages"):
        dapo.policy_loss(logp, old, adv[:, :-1], mask)
    with pytest.raises(ha.ShapeError, match="response_mask"):
        dapo.policy_loss(logp, old, adv, mask[:-1])
    with pytest.raises(ha.ShapeError, match="log_prob"):
        dapo.policy_loss(logp[0], old[0], adv[0], mask[0])
    with pytest.raises(ha.DtypeError, match="old_log_prob: expected dtype float32"):
        dapo.policy_loss(logp, old.long(), adv, mask)
    with pytest.raises(ha.DtypeError, match="log_prob"):
        dapo.policy_loss(logp.long(), old.long(), adv.long(), mask)
    with pytest.raises(ha.ArgumentError, match="loss_agg_mode"):
        dapo.policy_loss(logp, old, adv, mask, loss_agg_mode="mean")
    with pytest.raises(ha.ArgumentError, match="clip_ratio_c"):
        dapo.policy_loss(logp, old, adv, mask, clip_ratio_c=1.0)
    with pytest.raises(ha.ArgumentError, match="batch_num_tokens"):
        dapo.policy_loss(logp, old, adv, mask, dp_size=2)
    with pytest.raises(ha.ArgumentError, match="global_batch_size"):
        dapo.policy_loss(logp, old, adv, mask, dp_size=2, loss_agg_mode="seq-mean-token-sum")
    with pytest.raises(ha.ArgumentError, match="dp_size"):
        dapo.policy_loss(logp, old, adv, mask, dp_size=0)
    with pytest.raises(ha.ArgumentError, match="clip_ratio_high: expected a number"):
        dapo.policy_loss(logp, old, adv, mask, clip_ratio_high="0.28")
    with pytest.raises(ha.DeviceError, match="response_mask"):
        dapo.policy_loss(logp, old, adv, mask.to("meta"))
    with pytest.raises(ha.ArgumentError, match="log_prob: expected a torch.Tensor"):
        dapo.policy_loss(logp.tolist(), old, adv, mask)


@pytest.mark.parametrize("grouping", ["ids", "size"])
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_group_advantages(grouping, norm_by_std):
    batch, g = 24, 4
    scores = torch.where(torch.rand(batch) < 0.5, 1.0, -1.0)
    scores[:g] = 1.0  # a constant group: std 0
    if grouping == "ids":
        labels = torch.arange(batch) // g * 5 - 9
        perm = torch.randperm(batch)
        scores, labels = scores[perm], labels[perm]
        kw = dict(group_ids=labels)
    else:
        labels = torch.arange(batch) // g
        kw = dict(group_size=g)
    ours = dapo.group_advantages(scores, norm_by_std=norm_by_std, **kw)
    assert ours.dtype == torch.float32
    ref = grpo_advantages(scores, labels, norm_by_std=norm_by_std)
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=1e-6)


def test_group_advantages_singletons_token_level_and_eps():
    labels = torch.tensor([3, 8, 8, 1, 1, 1])
    rewards = torch.randn(6, 5)
    ours = dapo.group_advantages(rewards, group_ids=labels, eps=1e-4)
    torch.testing.assert_close(
        ours.double(), grpo_advantages(rewards, labels, eps=1e-4), atol=1e-6, rtol=1e-6
    )
    assert ours[0].item() == pytest.approx(rewards[0].sum().item() / (1 + 1e-4), rel=1e-6)
    with pytest.raises(ha.ArgumentError, match="exactly one"):
        dapo.group_advantages(rewards, group_ids=labels, group_size=2)
    with pytest.raises(ha.ArgumentError, match="group_size"):
        dapo.group_advantages(rewards, group_size=4)
    with pytest.raises(ha.ShapeError, match="scores"):
        dapo.group_advantages(torch.randn(2, 3, 4), group_size=2)


def test_dynamic_sampling_mask():
    metric = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 5.0, float("nan"), 2.0, 2.0])
    labels = torch.tensor([0, 0, 1, 1, 2, 3, 3, 4, 4, 5])
    ours = dapo.dynamic_sampling_mask(metric, group_ids=labels)
    expected = [False, False, True, True, True, True, True, False, False, True]
    assert ours.tolist() == expected
    finite = metric.nan_to_num(3.0)
    assert (
        dapo.dynamic_sampling_mask(finite, group_ids=labels).tolist()
        == dynamic_sampling(finite, labels).tolist()
    )
    assert dapo.dynamic_sampling_mask(torch.tensor([1, 1, 0, 1]), group_size=2).tolist() == [
        False,
        False,
        True,
        True,
    ]


def test_overlong_penalty():
    lengths = torch.tensor([0, 100, 3000, 3584, 3585, 4000, 4096])
    ours = dapo.overlong_penalty(lengths, 4096, 512, 1.0)
    torch.testing.assert_close(ours.double(), overlong(lengths, 4096, 512, 1.0))
    assert ours[-1].item() == -1.0 and ours[3].item() == 0.0
    torch.testing.assert_close(
        dapo.overlong_penalty(lengths.float(), 4096, 512, 0.5).double(),
        overlong(lengths, 4096, 512, 0.5),
    )
    with pytest.raises(ha.ArgumentError, match="buffer_length"):
        dapo.overlong_penalty(lengths, 4096, 0)


def test_group_ids_from_uids_is_stable():
    ids = dapo.group_ids_from_uids(["a", "b", "a", "c"])
    assert ids.dtype == torch.int64 and ids[0] == ids[2] and len(set(ids.tolist())) == 3
    # Fixed across processes and runs (not Python's salted hash): a value pinned once, and the
    # first 8 bytes of BLAKE2b as documented.
    assert dapo.group_ids_from_uids(["uid-0", "uid-1"]).tolist() == [
        4827302405068625674,
        925704353719366854,
    ]
    assert dapo.group_ids_from_uids(["uid-0"]).item() == int.from_bytes(
        __import__("hashlib").blake2b(b"uid-0", digest_size=8).digest(), "little", signed=True
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_loss_retain_graph_and_leaf_accumulation(dtype):
    """The first backward hands out the factor saved by the forward; a second one recomputes."""
    logp, old, adv, mask = policy_case(dtype=dtype)
    if dtype != torch.float32:
        mask = clear_of_clip_bounds(logp, old, mask)
    x = logp.clone().requires_grad_()
    loss, _ = dapo.policy_loss(x, old, adv, mask, loss_agg_mode="seq-mean-token-sum")
    (2 * loss).backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 1.5 * first)
    ref = run_reference(logp, old, adv, mask, loss_agg_mode="seq-mean-token-sum")[2]
    if dtype == torch.float32:
        torch.testing.assert_close(first.double(), 2 * ref, atol=1e-5, rtol=1e-5)
    else:
        low = run_reference(logp, old, adv, mask, dtype=dtype, loss_agg_mode="seq-mean-token-sum")
        assert_within_twice_torch_error(first / 2, ref, low[2], "gradient")


def test_interior_mask_across_column_blocks():
    # Masked positions in the middle of rows longer than one 128-column block, no weights: a
    # masked token once left the (implicit) weight of later blocks' tokens at zero.
    logp, old, adv, mask = policy_case(batch=3, seq=300, dtype=torch.float64, masked_rows=())
    mask = mask & (torch.rand(mask.shape) > 0.3)
    for mode in MODES:
        assert_matches(
            run_ours(logp, old, adv, mask, loss_agg_mode=mode),
            run_reference(logp, old, adv, mask, loss_agg_mode=mode),
            atol=1e-12,
            rtol=1e-10,
        )


@pytest.mark.parametrize(
    "dtypes,widest",
    [
        # verl's FSDP forward under bf16 autocast: bf16 log-probs, float32 batch tensors.
        ((torch.bfloat16, torch.float32, torch.float32, None), torch.float32),
        ((torch.float32, torch.float64, torch.float32, None), torch.float64),
        ((torch.float16, torch.float16, torch.bfloat16, None), torch.float32),
        ((torch.float32, torch.float32, torch.float32, torch.float64), torch.float64),
        ((torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32), torch.float32),
    ],
)
def test_policy_loss_mixed_dtypes_compute_in_the_widest(dtypes, widest):
    """Mixed floating dtypes are promoted as PyTorch (and so verl's ``vanilla`` loss) promotes
    them: the op computes in the widest dtype, exactly as on inputs cast to it, and returns the
    gradient in ``log_prob``'s dtype (the widest-dtype gradient rounded once)."""
    logp, old, adv, mask = policy_case(dtype=torch.float64)
    weights = torch.rand_like(logp) + 0.5
    lp_t, old_t, adv_t, w_t = dtypes
    kw = dict(loss_agg_mode="seq-mean-token-mean")
    if w_t is not None:
        kw["rollout_is_weights"] = weights.to(w_t)
    mixed = run_ours(logp.to(lp_t), old.to(old_t), adv.to(adv_t), mask, **kw)
    wide_kw = dict(kw)
    if w_t is not None:
        wide_kw["rollout_is_weights"] = weights.to(w_t).to(widest)
    cast = [t.to(d).to(widest) for t, d in zip((logp, old, adv), dtypes)]
    wide = run_ours(*cast, mask, **wide_kw)
    assert (
        mixed[0].dtype
        == wide[0].dtype
        == (torch.float64 if widest == torch.float64 else torch.float32)
    )
    assert mixed[2].dtype == lp_t
    assert torch.equal(mixed[0], wide[0])
    assert all(torch.equal(mixed[1][k], wide[1][k]) for k in wide[1])
    assert torch.equal(mixed[2], wide[2].to(lp_t))


def test_policy_loss_mixed_dtypes_refuse_non_floating():
    """Promotion is among floating dtypes only: an integer or bool tensor is still refused,
    with the argument's name."""
    logp, old, adv, mask = policy_case(dtype=torch.float32)
    bad = dict(
        log_prob=(logp.long(), old, adv, {}),
        old_log_prob=(logp, old.long(), adv, {}),
        advantages=(logp, old.double(), adv.long(), {}),
        rollout_is_weights=(logp, old, adv, {"rollout_is_weights": torch.ones_like(logp).bool()}),
    )
    for name, (lp, o, a, kw) in bad.items():
        with pytest.raises(ha.DtypeError, match=f"^{name}: expected dtype float32"):
            dapo.policy_loss(lp, o, a, mask, **kw)
    with pytest.raises(ha.DtypeError, match="^old_log_prob: expected dtype"):
        dapo.policy_loss(logp, old.to(torch.complex64), adv, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_policy_loss_refuses_double_backward(dtype):
    """Under ``create_graph=True`` the first-order gradient is exact; differentiating it again
    raises rather than silently treating it as a constant (which drops the second-order
    terms)."""
    logp, old, adv, mask = policy_case(dtype=dtype)
    x = logp.clone().requires_grad_()
    plain = run_ours(x.detach(), old.float(), adv.float(), mask)[2]
    message = "hidden_align.dapo.policy_loss supports first-order gradients only"
    # bfloat16 log-probs with float32 old log-probs and advantages: through the promotion.
    loss, _ = dapo.policy_loss(x, old.float(), adv.float(), mask)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    assert g.requires_grad and g.dtype == dtype and torch.equal(g.detach(), plain)
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad((g**2).sum(), x)
    loss, _ = dapo.policy_loss(x, old.float(), adv.float(), mask)
    with warnings.catch_warnings():
        # torch's advice to prefer autograd.grad (a reference cycle x <-> x.grad).
        warnings.simplefilter("ignore", UserWarning)
        loss.backward(create_graph=True)
    assert torch.equal(x.grad.detach(), plain)
    with pytest.raises(RuntimeError, match=message):
        (x.grad**2).sum().backward()
    x.grad = None
    # Empty inputs: the first-order gradient under create_graph=True is still there.
    e = x.detach()[:0].requires_grad_()
    loss, _ = dapo.policy_loss(e, old[:0], adv[:0], mask[:0])
    (g,) = torch.autograd.grad(loss, e, create_graph=True)
    assert g.shape == (0, logp.shape[1]) and g.dtype == dtype


def test_constant_groups_are_exactly_constant_unlike_verl():
    """A deliberate difference from verl: a group whose scores are all equal has advantages
    exactly 0 and is dropped by dynamic sampling, also when the score is not dyadic (1 - 0.37,
    an overlong penalty). verl's float32 mean of such a group is off by an ulp, so its std is
    ~6e-8 instead of 0 and its advantages come out near -0.056 for every rollout (a bias, not
    a signal), and its DAPO filter keeps the group. Our group sums are float64, in which the
    sum of n equal float32 scores is exact."""
    n = 6  # one where both of verl's float32 computations miss (not 8: its np.std is exact)
    score = torch.full((2 * n,), 1.0) + torch.full((2 * n,), -0.37)
    score[n:] = torch.arange(n, dtype=torch.float32)  # a second group, with a signal
    labels = torch.arange(2 * n) // n
    ours = dapo.group_advantages(score, group_ids=labels)
    assert torch.equal(ours[:n], torch.zeros(n))
    torch.testing.assert_close(ours[n:].double(), grpo_advantages(score, labels)[n:])
    keep = dapo.dynamic_sampling_mask(score, group_ids=labels)
    assert keep.tolist() == [False] * n + [True] * n
    # verl's DAPO filter (recipe/dapo/dapo_ray_trainer.py) keeps a uid when the np.std of its
    # sequence rewards, token_level_rewards.sum(-1).numpy() (float32), is > 0.
    assert np.std(list(score[:n].numpy())) > 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from verl.trainer.ppo import core_algos
    except Exception as exc:  # noqa: BLE001 - any import failure means no verl to compare
        pytest.skip(f"verl is not importable ({exc}): its half of the comparison is skipped")
    rewards = torch.zeros(2 * n, 3)
    rewards[:, -1] = score
    index = np.array([f"uid-{i}" for i in labels.tolist()], dtype=object)
    for fn in (
        core_algos.compute_grpo_outcome_advantage,
        core_algos.compute_grpo_vectorized_outcome_advantage,
    ):
        theirs, _ = fn(rewards, torch.ones(2 * n, 3), index)
        assert (theirs[:n, 0].abs() > 0.05).all(), fn.__name__
        torch.testing.assert_close(theirs[n:, 0], ours[n:], atol=1e-6, rtol=1e-6)
