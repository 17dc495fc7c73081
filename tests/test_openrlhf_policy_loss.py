"""``hidden_align.integrations.openrlhf``'s ``PolicyLossV0111`` and ``PolicyLossV0112`` against
the installed OpenRLHF's own ``openrlhf.models.loss.PolicyLoss``.

The test command runs this file twice: with OpenRLHF 0.11.1 in the main environment and with
0.11.2 in a virtual environment over it (``scripts/overlay_venv.sh``). A parity test of the
version that is not installed skips with the install command as the reason; the argument
checks and the properties that need no OpenRLHF run in both. OpenRLHF's model package imports
``flash_attn`` and ``deepspeed``; ``openrlhf_support.load_openrlhf`` stands them in for the
import only.
"""

from __future__ import annotations

import inspect
import math
import types

import pytest
import torch
from openrlhf_support import load_openrlhf

import hidden_align as ha
import hidden_align.integrations.openrlhf as integration
from hidden_align.integrations.openrlhf import PolicyLossV0111, PolicyLossV0112

OURS = {"0.11.1": PolicyLossV0111, "0.11.2": PolicyLossV0112}


@pytest.fixture(scope="module")
def openrlhf_models():
    """The installed OpenRLHF's version and ``openrlhf.models``, or a skip with the install
    command."""
    loaded = load_openrlhf("openrlhf.models")
    return types.SimpleNamespace(version=loaded.version, models=loaded.modules["openrlhf.models"])


def openrlhf_policy_loss(openrlhf_models, version):
    """OpenRLHF's ``PolicyLoss`` when ``version`` is the installed one; a skip otherwise."""
    if openrlhf_models.version != version:
        pytest.skip(
            f"needs OpenRLHF {version}, found {openrlhf_models.version} "
            f"(pip install --no-deps openrlhf=={version})"
        )
    return openrlhf_models.models.PolicyLoss


@pytest.fixture(params=sorted(OURS))
def pair(request, openrlhf_models):
    """OpenRLHF's ``PolicyLoss`` (``theirs``) and ours (``ours``) of one version; the version
    that is not installed skips."""
    version = request.param
    theirs = openrlhf_policy_loss(openrlhf_models, version)
    return types.SimpleNamespace(version=version, theirs=theirs, ours=OURS[version])


@pytest.fixture
def orl_v0111(openrlhf_models):
    return openrlhf_policy_loss(openrlhf_models, "0.11.1")


@pytest.fixture
def orl_v0112(openrlhf_models):
    return openrlhf_policy_loss(openrlhf_models, "0.11.2")


def test_policy_loss_follows_installed_version():
    """``PolicyLoss`` is the installed release's class (the current one, 0.11.2, without
    OpenRLHF)."""
    version = integration.installed_openrlhf_version()
    if version not in (None, *OURS):
        pytest.skip(f"OpenRLHF {version} is none of {sorted(OURS)}")
    expected = OURS.get(version, PolicyLossV0112)
    assert integration.PolicyLoss is expected
    assert expected.OPENRLHF_VERSION == (version or "0.11.2")


# --- cases ----------------------------------------------------------------------------------

B, T = 7, 13


def case(dtype=torch.float32, seed=0, advantages="token"):
    """Log-probs with ratios inside and outside the clip range, log-ratios beyond the +-20 clamp
    (with a positive advantage, so their loss stays of the size of the others'), one where a
    dual clip binds, an empty row and a bool mask, as OpenRLHF's ``action_mask``."""
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(B, T, generator=g) * 0.5 - 1.0).to(dtype)
    old = (lp.float() + torch.randn(B, T, generator=g) * 0.4).to(dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False
    mask[0, :3] = True
    # +25 and -22: the clamped log-ratios cancel, the unclamped ones (OpenRLHF's ppo_kl) do not.
    old[0, 0], old[0, 1] = lp[0, 0] - 25.0, lp[0, 1] + 22.0
    # A ratio of e^1.5 with a negative advantage: beyond a dual clip of 3.
    old[2, 0], mask[2, 0] = lp[2, 0] - 1.5, True
    if advantages == "token":
        adv = torch.randn(B, T, generator=g).to(dtype)
    else:  # one advantage per rollout broadcast over its tokens, as GRPO gives
        adv = torch.randn(B, 1, generator=g).to(dtype)
    adv[0], adv[2] = adv[0].abs() + 0.1, -adv[2].abs() - 0.1
    if advantages == "rollout":
        adv = adv.expand(B, T).contiguous()
    rollout = (old.float() + torch.randn(B, T, generator=g) * 0.5).to(dtype)
    return lp, old, adv, mask, rollout


def run(fn, lp, *args, **kwargs):
    """``fn``'s outputs (``(loss, clip_ratio, ppo_kl, vllm_kl[, is_filter_ratio])``) and the
    gradient w.r.t. ``lp``."""
    x = lp.detach().clone().requires_grad_()
    out = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(out[0], x)
    return out, grad


def tolerances(dtype):
    # float32: OpenRLHF sums in float32, the op accumulates in float64. float64: each sequence's
    # mean divides by count + 1e-8 in the op; OpenRLHF adds 1e-8 to the integer count in float32,
    # where it vanishes (a relative difference of 1e-8 / count).
    if dtype == torch.float32:
        return {"rtol": 2e-6, "atol": 1e-6}
    return {"rtol": 2e-9, "atol": 1e-9}


OUTPUTS = ("loss", "clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio")
# Fractions of counts, float32 in both: OpenRLHF divides by the count, the op (clip_ratio) by
# count + 1e-8.
FRACTIONS = ("clip_ratio", "is_filter_ratio")


def assert_same(theirs, ours, dtype):
    (t_out, t_grad), (o_out, o_grad) = theirs, ours
    assert len(o_out) == len(t_out)
    tol = tolerances(dtype)
    for name, t, o in zip(OUTPUTS, t_out, o_out):
        if t is None:
            assert o is None, name
            continue
        assert o.shape == t.shape == (), name
        assert o.dtype == t.dtype, (name, o.dtype, t.dtype)
        assert not o.requires_grad or name == "loss", name
        metric_tol = {"rtol": 2e-7, "atol": 1e-7} if name in FRACTIONS else tol
        torch.testing.assert_close(o, t, **metric_tol, msg=name)
    torch.testing.assert_close(o_grad, t_grad, **tol)


NORMALISERS = [
    (1, None, None),
    (2, None, None),  # OpenRLHF ignores dp_size without the mode's normaliser
    (2, 37.0, 5.0),
    (1, 30, 4),
    (4, torch.tensor(41.5), torch.tensor(6.0)),  # get_loss_batch_info's 0-d float32 tensors
]


def normalisers(dp_size, batch_num_tokens, global_batch_size):
    return {
        "dp_size": dp_size,
        "batch_num_tokens": batch_num_tokens,
        "global_batch_size": global_batch_size,
    }


# --- both versions, no correction -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("dp_size, batch_num_tokens, global_batch_size", NORMALISERS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64])  # the sample generator's: int64
def test_matches_openrlhf(
    pair,
    dtype,
    token_level_loss,
    dual_clip,
    dp_size,
    batch_num_tokens,
    global_batch_size,
    mask_dtype,
):
    lp, old, adv, mask, _ = case(dtype)
    mask = mask.to(mask_dtype)
    args = (0.2, 0.28, dual_clip, token_level_loss)
    norms = normalisers(dp_size, batch_num_tokens, global_batch_size)
    theirs = run(pair.theirs(*args), lp, old, adv, action_mask=mask, **norms)
    ours = run(pair.ours(*args), lp, old, adv, action_mask=mask, **norms)
    assert_same(theirs, ours, dtype)


@pytest.mark.parametrize("advantages", ["rollout", "column"])
@pytest.mark.parametrize("token_level_loss", [True, False])
def test_rollout_advantages_match(pair, advantages, token_level_loss):
    """Advantages constant over each row, given ``[B, T]`` or ``[B, 1]`` (broadcast)."""
    lp, old, adv, mask, _ = case(torch.float64, seed=3, advantages=advantages)
    kwargs = {"dual_clip": 3.0, "token_level_loss": token_level_loss}
    theirs = run(pair.theirs(**kwargs), lp, old, adv, mask)
    ours = run(pair.ours(**kwargs), lp, old, adv, mask)
    assert_same(theirs, ours, torch.float64)


def test_without_mask_matches(pair):
    """``action_mask=None``: OpenRLHF's token mode takes the plain mean."""
    lp, old, adv, _, _ = case(torch.float64, seed=4)
    assert_same(run(pair.theirs(), lp, old, adv), run(pair.ours(), lp, old, adv), lp.dtype)


@pytest.mark.parametrize("token_level_loss", [True, False])
def test_nan_at_masked_old_log_probs(pair, token_level_loss):
    """OpenRLHF #1240: NaN where ``action_mask`` is false makes OpenRLHF's loss and ppo_kl NaN
    (``x * mask`` keeps NaN); here it changes nothing."""
    lp, old, adv, mask, _ = case(torch.float32, seed=6)
    dirty = old.clone()
    dirty[~mask] = float("nan")
    args = (0.2, 0.28, 3.0, token_level_loss)
    fn = pair.ours(*args)
    (t_loss, _, t_kl, *_), _ = run(pair.theirs(*args), lp, dirty, adv, mask)
    assert t_loss.isnan() and t_kl.isnan()
    clean, dirty_out = run(fn, lp, old, adv, mask), run(fn, lp, dirty, adv, mask)
    for a, b in zip(clean[0][:3], dirty_out[0][:3]):
        assert torch.equal(a, b)
    assert torch.equal(clean[1], dirty_out[1])
    reference = run(pair.theirs(*args), lp, old, adv, mask)
    assert_same(reference, dirty_out, torch.float32)


@pytest.mark.parametrize("token_level_loss", [True, False])
def test_empty_batch_gives_zero(pair, token_level_loss):
    """No valid token: OpenRLHF divides 0 by 0 (NaN); here the loss and metrics are 0 and the
    gradient is zero."""
    lp, old, adv, mask, _ = case(torch.float32, seed=8)
    mask[:] = False
    (t_loss, t_clip, t_kl, *_), _ = run(
        pair.theirs(token_level_loss=token_level_loss), lp, old, adv, mask
    )
    assert t_loss.isnan() and t_clip.isnan() and t_kl.isnan()
    (loss, clip, kl, *_), grad = run(
        pair.ours(token_level_loss=token_level_loss), lp, old, adv, mask
    )
    assert loss.item() == clip.item() == kl.item() == 0.0
    assert torch.count_nonzero(grad) == 0


def test_mixed_dtypes_promote(pair):
    """float32 log-probs with float64 old log-probs: both compute in float64, and the gradient
    comes back in float32."""
    lp, old, adv, mask, _ = case(torch.float64, seed=10)
    lp = lp.float()
    theirs = run(pair.theirs(dual_clip=3.0), lp, old, adv, mask)
    ours = run(pair.ours(dual_clip=3.0), lp, old, adv, mask)
    assert ours[1].dtype == theirs[1].dtype == torch.float32
    assert_same(theirs, ours, torch.float64)


# Every constructor argument away from its default, positionally, per version.
NON_DEFAULT_ARGS = {
    "0.11.1": (0.1, 0.3, 2.5, False, "ppo", True, [0.5, 3.0], "icepop"),
    "0.11.2": (0.1, 0.3, 2.5, False, "ppo", "token", "clip", "ratio", [0.5, 3.0]),
}


def test_same_signatures(pair):
    """Constructor and forward: the same parameter names, order and defaults; the same
    attributes after construction, with the defaults and with every argument given."""
    for name in ("__init__", "forward"):
        theirs = inspect.signature(getattr(pair.theirs, name)).parameters
        ours = inspect.signature(getattr(pair.ours, name)).parameters
        assert list(ours) == list(theirs)
        assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]
    attrs = list(inspect.signature(pair.ours.__init__).parameters)[1:]
    for args in ((), NON_DEFAULT_ARGS[pair.version]):
        theirs, ours = pair.theirs(*args), pair.ours(*args)
        for attr in attrs:
            assert getattr(ours, attr) == getattr(theirs, attr), attr


@pytest.mark.parametrize("cls", [PolicyLossV0111, PolicyLossV0112])
def test_dual_clip_off_is_plain_ppo(cls):
    """The bound used without dual clip never binds, even at the +-20 log-ratio clamp."""
    lp, old, adv, mask, _ = case(torch.float64, seed=9)
    old[mask] = lp[mask] + 30.0 * torch.sign(torch.randn(int(mask.sum()), dtype=torch.float64))
    ratio = (lp - old).clamp(-20, 20).exp()
    per_token = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    expected = per_token[mask].sum() / mask.sum()
    loss = cls()(lp, old, adv, mask)[0]
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


CORRECTION_ON = {
    PolicyLossV0111: {"enable_vllm_is_correction": True, "vllm_is_truncated_threshold": [0.5, 2.0]},
    PolicyLossV0112: {"is_correction_level": "token"},
}


@pytest.mark.parametrize("cls", [PolicyLossV0111, PolicyLossV0112])
def test_shared_argument_errors(cls):
    """The checks both versions share (no OpenRLHF needed)."""
    with pytest.raises(ha.ArgumentError, match="dual_clip"):
        cls(dual_clip=1.0)
    with pytest.raises(ha.ArgumentError, match="dual_clip"):
        cls(dual_clip="3")
    with pytest.raises(ha.ArgumentError, match="clip_eps_low"):
        cls(clip_eps_low=None)
    with pytest.raises(ha.ArgumentError, match="gspo"):
        cls(policy_loss_type="gspo")
    with pytest.raises(ha.ArgumentError, match="policy_loss_type"):
        cls(policy_loss_type="grpo")
    lp, old, adv, mask, _ = case()
    with pytest.raises(ha.ArgumentError, match="rollout_log_probs"):
        cls(**CORRECTION_ON[cls])(lp, old, adv, mask)
    with pytest.raises(ha.ShapeError, match="rollout_log_probs"):
        cls(**CORRECTION_ON[cls])(lp, old, adv, mask, old[:, 1:])
    with pytest.raises(ha.ShapeError, match="action_mask"):
        cls()(lp, old, adv, mask[:, 1:])
    with pytest.raises(ha.ShapeError, match="log_probs"):
        cls()(lp[0], old[0], adv[0])
    with pytest.raises(ha.ArgumentError, match="dp_size"):
        cls()(lp, old, adv, mask, dp_size=0)
    with pytest.raises(ha.ArgumentError, match="dp_size"):
        cls()(lp, old, adv, mask, dp_size=2.0, batch_num_tokens=10.0)
    with pytest.raises(ha.ArgumentError, match="batch_num_tokens"):
        cls()(lp, old, adv, mask, batch_num_tokens="10")
    with pytest.raises(ha.ArgumentError, match="global_batch_size"):
        cls(token_level_loss=False)(lp, old, adv, mask, global_batch_size=torch.ones(2))


# --- OpenRLHF 0.11.1: the vLLM correction ---------------------------------------------------

# seq-mask-tis with a narrow band, so that it drops some sequences and keeps others.
IS_CASES = [("tis", [0.5, 2.0]), ("icepop", [0.5, 2.0]), ("seq-mask-tis", [0.9, 1.1])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("kind, threshold", IS_CASES)
def test_v0111_vllm_is_correction_matches(orl_v0111, dtype, token_level_loss, kind, threshold):
    lp, old, adv, mask, rollout = case(dtype, seed=5)
    kwargs = {
        "clip_eps_high": 0.28,
        "token_level_loss": token_level_loss,
        "enable_vllm_is_correction": True,
        "vllm_is_truncated_threshold": threshold,
        "vllm_is_correction_type": kind,
    }
    norms = {"dp_size": 2, "batch_num_tokens": 40.0, "global_batch_size": 6.0}
    theirs = run(orl_v0111(**kwargs), lp, old, adv, mask, rollout, **norms)
    ours = run(PolicyLossV0111(**kwargs), lp, old, adv, mask, rollout, **norms)
    assert_same(theirs, ours, dtype)
    if kind == "seq-mask-tis":  # the filter drops some sequences and keeps others
        seq = torch.where(mask, old - rollout, 0).sum(-1) / mask.sum(-1).clamp(min=1)
        kept = (seq.exp() >= threshold[0]) & (seq.exp() <= threshold[1])
        assert kept[mask.any(-1)].any() and not kept[mask.any(-1)].all()


@pytest.mark.parametrize("kind", ["tis", "icepop", "seq-mask-tis"])
def test_v0111_garbage_at_masked_rollout_log_probs(orl_v0111, kind):
    """NaN and inf in ``rollout_log_probs`` and ``old_log_probs`` at masked positions: NaN in
    OpenRLHF's ppo_kl and vllm_kl, and in its loss but for icepop (whose filter is a
    ``torch.where`` in 0.11.1); nothing here."""
    lp, old, adv, mask, rollout = case(torch.float32, seed=7)
    dirty_old, dirty_rollout = old.clone(), rollout.clone()
    dirty_rollout[~mask] = float("nan")
    dirty_old[~mask] = float("inf")
    kwargs = {
        "enable_vllm_is_correction": True,
        "vllm_is_truncated_threshold": [0.5, 2.0],
        "vllm_is_correction_type": kind,
    }
    (t_loss, _, t_kl, t_vllm_kl), _ = run(
        orl_v0111(**kwargs), lp, dirty_old, adv, mask, dirty_rollout
    )
    assert t_kl.isnan() and t_vllm_kl.isnan()
    assert t_loss.isnan() == (kind != "icepop")
    fn = PolicyLossV0111(**kwargs)
    clean, dirty = (
        run(fn, lp, old, adv, mask, rollout),
        run(fn, lp, dirty_old, adv, mask, dirty_rollout),
    )
    for a, b in zip(clean[0], dirty[0]):
        assert torch.equal(a, b)
    assert torch.equal(clean[1], dirty[1])


def test_v0111_argument_errors():
    with pytest.raises(ValueError, match="vllm_is_correction_type"):
        PolicyLossV0111(vllm_is_correction_type="mis")
    with pytest.raises(ha.ArgumentError, match="vllm_is_truncated_threshold"):
        PolicyLossV0111(enable_vllm_is_correction=True)
    with pytest.raises(ha.ArgumentError, match="low <= high"):
        PolicyLossV0111(enable_vllm_is_correction=True, vllm_is_truncated_threshold=[2.0, 0.5])


# --- OpenRLHF 0.11.2: the is_correction_* correction ----------------------------------------

# Every (level, mode, gating) OpenRLHF 0.11.2 accepts with the correction on, with a band that
# filters some units of case(seed=5) and keeps others (test_is_correction_matches asserts it).
# A divergence takes an upper bound only; one band has a negative low, which OpenRLHF accepts.
CORRECTIONS = [
    ("token", "mask", "ratio", (0.5, 2.0)),  # ICEPOP
    ("token", "clip", "ratio", (0.5, 2.0)),  # TIS
    ("token", "mask", "binary_kl", (0.0, 0.05)),
    ("token", "mask", "tv", (0.0, 0.15)),
    ("seq", "mask", "ratio", (0.85, 1.2)),  # seq-mask-tis
    ("seq", "mask", "binary_kl", (-0.5, 0.1)),  # FlashREINFORCE's trust region
    ("seq", "mask", "tv", (0.0, 0.13)),
]
# With the correction off OpenRLHF accepts every mode and gating but clip with a divergence.
CORRECTIONS_OFF = [
    ("off", "mask", "ratio"),
    ("off", "mask", "binary_kl"),
    ("off", "mask", "tv"),
    ("off", "clip", "ratio"),
]
V0112_NORMALISERS = [NORMALISERS[0], NORMALISERS[2], NORMALISERS[4]]


def correction_kwargs(level, mode, gating, threshold=(0.5, 5.0), **kwargs):
    return {
        "is_correction_level": level,
        "is_correction_mode": mode,
        "is_correction_gating": gating,
        "is_correction_threshold": threshold,
        **kwargs,
    }


def test_v0112_corrections_cover_every_accepted_combination():
    accepted = set()
    for level in PolicyLossV0112._LEVELS:
        for mode in PolicyLossV0112._MODES:
            for gating in PolicyLossV0112._GATINGS:
                threshold = (0.5, 2.0) if gating == "ratio" else (0.0, 0.1)
                try:
                    PolicyLossV0112(**correction_kwargs(level, mode, gating, threshold))
                except ha.ArgumentError:
                    continue
                accepted.add((level, mode, gating))
    assert accepted == {c[:3] for c in CORRECTIONS} | set(CORRECTIONS_OFF)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("dp_size, batch_num_tokens, global_batch_size", V0112_NORMALISERS)
@pytest.mark.parametrize("level, mode, gating, threshold", CORRECTIONS)
def test_v0112_is_correction_matches(
    orl_v0112,
    dtype,
    token_level_loss,
    dual_clip,
    dp_size,
    batch_num_tokens,
    global_batch_size,
    level,
    mode,
    gating,
    threshold,
):
    lp, old, adv, mask, rollout = case(dtype, seed=5)
    kwargs = correction_kwargs(
        level, mode, gating, threshold, dual_clip=dual_clip, token_level_loss=token_level_loss
    )
    norms = normalisers(dp_size, batch_num_tokens, global_batch_size)
    theirs = run(orl_v0112(0.2, 0.28, **kwargs), lp, old, adv, mask, rollout, **norms)
    ours = run(PolicyLossV0112(0.2, 0.28, **kwargs), lp, old, adv, mask, rollout, **norms)
    assert_same(theirs, ours, dtype)
    # The gate filtered some units and kept others: at token level a fraction of the valid
    # tokens; at sequence level the empty row (counted as filtered) and at least one more of
    # the B rows, and not all of them.
    is_filter_ratio = ours[0][4].item()
    if level == "token":
        assert 0.0 < is_filter_ratio < 1.0
    else:
        assert 2 <= round(is_filter_ratio * B) < B


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("level, mode, gating", CORRECTIONS_OFF)
def test_v0112_correction_off_matches(orl_v0112, dtype, token_level_loss, level, mode, gating):
    """With the level off the other correction arguments change nothing: no weights, and
    ``vllm_kl`` and ``is_filter_ratio`` None, given ``rollout_log_probs`` or not."""
    lp, old, adv, mask, rollout = case(dtype, seed=11)
    kwargs = correction_kwargs(level, mode, gating, token_level_loss=token_level_loss)
    for args in ((), (rollout,)):
        theirs = run(orl_v0112(**kwargs), lp, old, adv, mask, *args)
        ours = run(PolicyLossV0112(**kwargs), lp, old, adv, mask, *args)
        assert_same(theirs, ours, dtype)
        assert ours[0][3] is None and ours[0][4] is None


@pytest.mark.parametrize("mask_dtype", [None, torch.int64])
@pytest.mark.parametrize("level, mode, gating, threshold", CORRECTIONS)
def test_v0112_is_correction_mask_kinds_match(
    orl_v0112, mask_dtype, level, mode, gating, threshold
):
    """The sample generator's int64 ``action_mask``, and no mask (token mode: OpenRLHF's sample
    mode needs one)."""
    lp, old, adv, mask, rollout = case(torch.float64, seed=5)
    mask = None if mask_dtype is None else mask.to(mask_dtype)
    kwargs = correction_kwargs(level, mode, gating, threshold)
    theirs = run(orl_v0112(**kwargs), lp, old, adv, mask, rollout)
    ours = run(PolicyLossV0112(**kwargs), lp, old, adv, mask, rollout)
    assert_same(theirs, ours, torch.float64)


def test_v0112_mixed_dtypes_with_correction(orl_v0112):
    """float32 log-probs with float64 old and rollout log-probs: both compute in float64."""
    lp, old, adv, mask, rollout = case(torch.float64, seed=12)
    kwargs = correction_kwargs("seq", "mask", "tv", (0.0, 0.15))
    theirs = run(orl_v0112(**kwargs), lp.float(), old, adv, mask, rollout)
    ours = run(PolicyLossV0112(**kwargs), lp.float(), old, adv, mask, rollout)
    assert_same(theirs, ours, torch.float64)


@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("level, mode, gating, threshold", CORRECTIONS)
def test_v0112_garbage_at_masked_positions(
    orl_v0112, token_level_loss, level, mode, gating, threshold
):
    """NaN in ``rollout_log_probs`` and inf in ``old_log_probs`` at masked positions make
    OpenRLHF's ppo_kl and vllm_kl NaN (and at sequence level its per-sequence statistic NaN,
    so every sequence with a masked token is dropped); here they change nothing, and the
    outputs are OpenRLHF's on clean inputs."""
    lp, old, adv, mask, rollout = case(torch.float32, seed=7)
    dirty_old, dirty_rollout = old.clone(), rollout.clone()
    dirty_rollout[~mask] = float("nan")
    dirty_old[~mask] = float("inf")
    kwargs = correction_kwargs(level, mode, gating, threshold, token_level_loss=token_level_loss)
    (_, _, t_kl, t_vllm_kl, t_filter), _ = run(
        orl_v0112(**kwargs), lp, dirty_old, adv, mask, dirty_rollout
    )
    assert t_kl.isnan() and t_vllm_kl.isnan()
    if level == "seq":  # every row has a masked token: OpenRLHF drops them all
        assert t_filter.item() == 1.0
    fn = PolicyLossV0112(**kwargs)
    clean = run(fn, lp, old, adv, mask, rollout)
    dirty = run(fn, lp, dirty_old, adv, mask, dirty_rollout)
    for a, b in zip(clean[0], dirty[0]):
        assert torch.equal(a, b)
    assert torch.equal(clean[1], dirty[1])
    assert_same(run(orl_v0112(**kwargs), lp, old, adv, mask, rollout), dirty, torch.float32)


@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("level, mode, gating, threshold", CORRECTIONS)
def test_v0112_empty_batch(orl_v0112, token_level_loss, level, mode, gating, threshold):
    """No valid token: OpenRLHF's loss, metrics and token-level is_filter_ratio are NaN, and
    0 here. At sequence level every (empty) sequence counts as filtered in both: 1."""
    lp, old, adv, mask, rollout = case(torch.float32, seed=8)
    mask[:] = False
    kwargs = correction_kwargs(level, mode, gating, threshold, token_level_loss=token_level_loss)
    (t_loss, t_clip, t_kl, t_vllm_kl, t_filter), _ = run(
        orl_v0112(**kwargs), lp, old, adv, mask, rollout
    )
    assert t_loss.isnan() and t_clip.isnan() and t_kl.isnan() and t_vllm_kl.isnan()
    (loss, clip, kl, vllm_kl, is_filter_ratio), grad = run(
        PolicyLossV0112(**kwargs), lp, old, adv, mask, rollout
    )
    assert loss.item() == clip.item() == kl.item() == vllm_kl.item() == 0.0
    assert torch.count_nonzero(grad) == 0
    if level == "token":
        assert t_filter.isnan() and is_filter_ratio.item() == 0.0
    else:
        assert t_filter.item() == is_filter_ratio.item() == 1.0
    assert is_filter_ratio.dtype == t_filter.dtype == torch.float32


def test_v0112_no_sequences():
    """A batch of no sequences: 0 everywhere (OpenRLHF: NaN)."""
    empty = torch.zeros(0, T)
    fn = PolicyLossV0112(**correction_kwargs("seq", "mask", "ratio", (0.8, 1.25)))
    out = fn(empty, empty, empty, empty.bool(), empty)
    assert [o.item() for o in out] == [0.0] * 5


@pytest.mark.parametrize("gating, threshold", [("ratio", (0.0, math.inf)), ("tv", (0.0, 1.0))])
def test_v0112_empty_sequence_counts_as_filtered(orl_v0112, gating, threshold):
    """A band that keeps every non-empty sequence: only the empty row is filtered, in both."""
    lp, old, adv, mask, rollout = case(torch.float64, seed=5)
    kwargs = correction_kwargs("seq", "mask", gating, threshold, token_level_loss=False)
    theirs = run(orl_v0112(**kwargs), lp, old, adv, mask, rollout)
    ours = run(PolicyLossV0112(**kwargs), lp, old, adv, mask, rollout)
    assert_same(theirs, ours, torch.float64)
    assert ours[0][4].item() == pytest.approx(1 / B)


def test_v0112_mask_mode_weights_are_unclamped_ratios():
    """mask mode: a kept token's weight is its full ratio (not clamped to the band); clip mode
    clamps it. One token per row, ratio e^0.5, band (0.5, 1.5): mask keeps it with weight
    e^0.5 (gating on tv, which it passes), clip clamps it to 1.5."""
    lp = torch.zeros(1, 1, dtype=torch.float64)
    old = torch.full((1, 1), math.log(0.5), dtype=torch.float64)
    rollout = old - 0.5
    adv = torch.ones(1, 1, dtype=torch.float64)
    mask_fn = PolicyLossV0112(**correction_kwargs("token", "mask", "tv", (0.0, 0.5)))
    clip_fn = PolicyLossV0112(**correction_kwargs("token", "clip", "ratio", (0.5, 1.5)))
    plain = PolicyLossV0112()(lp, old, adv)[0]
    masked = mask_fn(lp, old, adv, rollout_log_probs=rollout)
    clipped = clip_fn(lp, old, adv, rollout_log_probs=rollout)
    torch.testing.assert_close(masked[0], plain * math.exp(0.5), rtol=1e-12, atol=0)
    torch.testing.assert_close(clipped[0], plain * 1.5, rtol=1e-12, atol=0)
    assert masked[4].item() == 0.0 and clipped[4].item() == 1.0


# Arguments OpenRLHF 0.11.2 refuses (AssertionError for dual_clip, ValueError for the rest) and
# the argument our ArgumentError names.
V0112_REFUSED = [
    ({"dual_clip": 1.0}, "dual_clip"),
    ({"dual_clip": 0.5}, "dual_clip"),
    ({"is_correction_level": "sequence"}, "is_correction_level"),
    ({"is_correction_level": None}, "is_correction_level"),
    ({"is_correction_mode": "drop"}, "is_correction_mode"),
    ({"is_correction_gating": "kl"}, "is_correction_gating"),
    ({"is_correction_level": "seq", "is_correction_mode": "clip"}, "is_correction_mode"),
    (correction_kwargs("token", "clip", "tv", (0.0, 0.1)), "is_correction_mode"),
    (correction_kwargs("token", "clip", "binary_kl", (0.0, 0.1)), "is_correction_mode"),
    # OpenRLHF checks clip's combination even with the correction off.
    (correction_kwargs("off", "clip", "binary_kl"), "is_correction_mode"),
    # A divergence with a lower bound > 0, the default band included.
    (correction_kwargs("token", "mask", "binary_kl"), "is_correction_threshold"),
    (correction_kwargs("seq", "mask", "tv", (0.01, 0.1)), "is_correction_threshold"),
]


@pytest.mark.parametrize("kwargs, argument", V0112_REFUSED)
def test_v0112_argument_errors(kwargs, argument):
    with pytest.raises(ha.ArgumentError, match=argument):
        PolicyLossV0112(**kwargs)


@pytest.mark.parametrize("kwargs, argument", V0112_REFUSED)
def test_v0112_openrlhf_refuses_the_same(orl_v0112, kwargs, argument):
    error = AssertionError if argument == "dual_clip" else ValueError
    with pytest.raises(error):
        orl_v0112(**kwargs)


# Thresholds OpenRLHF would unpack in forward (or gate nothing with); refused when the
# correction is on.
MALFORMED_THRESHOLDS = [None, (0.5,), [0.5, 1.0, 2.0], "ab", ("0.5", 2.0), (True, 2.0), (2.0, 0.5)]


@pytest.mark.parametrize("level", ["token", "seq"])
@pytest.mark.parametrize("threshold", MALFORMED_THRESHOLDS)
def test_v0112_malformed_threshold(level, threshold):
    with pytest.raises(ha.ArgumentError, match="is_correction_threshold"):
        PolicyLossV0112(is_correction_level=level, is_correction_threshold=threshold)


def test_v0112_threshold_unread_when_off():
    """As in OpenRLHF, the level off ignores the threshold (and a divergence's default band)."""
    for threshold in MALFORMED_THRESHOLDS:
        fn = PolicyLossV0112(is_correction_threshold=threshold)
        assert fn.is_correction_threshold is threshold
    PolicyLossV0112(is_correction_gating="binary_kl")
    # A list (the command line's) and ints work as the tuple default does.
    PolicyLossV0112(is_correction_level="token", is_correction_threshold=[0, 3])
