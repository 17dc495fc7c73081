"""``hidden_align.integrations.openrlhf`` against OpenRLHF 0.11.1's own ``PolicyLoss`` and
``Actor``, and the documented alignment-term lines of the actor's training step on a small real
Qwen2 model (CPU).

OpenRLHF is installed without its dependencies (``pip install --no-deps openrlhf==0.11.1``); its
model package imports ``flash_attn`` and ``deepspeed``, which CPU machines lack, so a fixture
puts small stand-ins in ``sys.modules`` for the import only and takes them out again (left
there, ``transformers`` and ``accelerate`` would take deepspeed for installed). The parity tests
skip with the install command as the reason when OpenRLHF 0.11.1 is not importable.
"""

from __future__ import annotations

import inspect
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from openrlhf_support import STUBS, load_openrlhf

import hidden_align as ha
from hidden_align.integrations.openrlhf import CapturedHidden, PolicyLoss, capture_last_hidden

OPENRLHF_VERSION = "0.11.1"
INSTALL = f"pip install --no-deps openrlhf=={OPENRLHF_VERSION}"


@pytest.fixture(scope="module")
def orl():
    """OpenRLHF's ``PolicyLoss``, ``Actor`` and ``ppo_utils.experience`` module, or a skip with
    the install command."""
    loaded = load_openrlhf("openrlhf.models", "openrlhf.trainer.ppo_utils.experience")
    models = loaded.modules["openrlhf.models"]
    return types.SimpleNamespace(
        PolicyLoss=models.PolicyLoss,
        Actor=models.Actor,
        experience=loaded.modules["openrlhf.trainer.ppo_utils.experience"],
        version=loaded.version,
    )


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
    """``(loss, clip_ratio, ppo_kl, vllm_kl)`` and the gradient w.r.t. ``lp``."""
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


def assert_same(theirs, ours, dtype):
    (t_out, t_grad), (o_out, o_grad) = theirs, ours
    tol = tolerances(dtype)
    for name, t, o in zip(("loss", "clip_ratio", "ppo_kl", "vllm_kl"), t_out, o_out):
        if t is None:
            assert o is None, name
            continue
        assert o.shape == t.shape == (), name
        assert o.dtype == t.dtype, (name, o.dtype, t.dtype)
        assert not o.requires_grad or name == "loss", name
        # clip_ratio is float32 in both; OpenRLHF divides by the count, the op by count + 1e-8.
        metric_tol = {"rtol": 2e-7, "atol": 1e-7} if name == "clip_ratio" else tol
        torch.testing.assert_close(o, t, **metric_tol, msg=name)
    torch.testing.assert_close(o_grad, t_grad, **tol)


NORMALISERS = [
    (1, None, None),
    (2, None, None),  # OpenRLHF ignores dp_size without the mode's normaliser
    (2, 37.0, 5.0),
    (1, 30, 4),
    (4, torch.tensor(41.5), torch.tensor(6.0)),  # get_loss_batch_info's 0-d float32 tensors
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("dp_size, batch_num_tokens, global_batch_size", NORMALISERS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64])  # the sample generator's: int64
def test_matches_openrlhf(
    orl,
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
    norms = {
        "dp_size": dp_size,
        "batch_num_tokens": batch_num_tokens,
        "global_batch_size": global_batch_size,
    }
    theirs = run(orl.PolicyLoss(*args), lp, old, adv, action_mask=mask, **norms)
    ours = run(PolicyLoss(*args), lp, old, adv, action_mask=mask, **norms)
    assert_same(theirs, ours, dtype)


@pytest.mark.parametrize("advantages", ["rollout", "column"])
@pytest.mark.parametrize("token_level_loss", [True, False])
def test_rollout_advantages_match(orl, advantages, token_level_loss):
    """Advantages constant over each row, given ``[B, T]`` or ``[B, 1]`` (broadcast)."""
    lp, old, adv, mask, _ = case(torch.float64, seed=3, advantages=advantages)
    kwargs = {"dual_clip": 3.0, "token_level_loss": token_level_loss}
    theirs = run(orl.PolicyLoss(**kwargs), lp, old, adv, mask)
    ours = run(PolicyLoss(**kwargs), lp, old, adv, mask)
    assert_same(theirs, ours, torch.float64)


def test_without_mask_matches(orl):
    """``action_mask=None``: OpenRLHF's token mode takes the plain mean."""
    lp, old, adv, _, _ = case(torch.float64, seed=4)
    assert_same(run(orl.PolicyLoss(), lp, old, adv), run(PolicyLoss(), lp, old, adv), lp.dtype)


# vLLM importance-sampling corrections; seq-mask-tis with a narrow band, so that it drops some
# sequences and keeps others.
IS_CASES = [("tis", [0.5, 2.0]), ("icepop", [0.5, 2.0]), ("seq-mask-tis", [0.9, 1.1])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("kind, threshold", IS_CASES)
def test_vllm_is_correction_matches(orl, dtype, token_level_loss, kind, threshold):
    lp, old, adv, mask, rollout = case(dtype, seed=5)
    kwargs = {
        "clip_eps_high": 0.28,
        "token_level_loss": token_level_loss,
        "enable_vllm_is_correction": True,
        "vllm_is_truncated_threshold": threshold,
        "vllm_is_correction_type": kind,
    }
    norms = {"dp_size": 2, "batch_num_tokens": 40.0, "global_batch_size": 6.0}
    theirs = run(orl.PolicyLoss(**kwargs), lp, old, adv, mask, rollout, **norms)
    ours = run(PolicyLoss(**kwargs), lp, old, adv, mask, rollout, **norms)
    assert_same(theirs, ours, dtype)
    if kind == "seq-mask-tis":  # the filter drops some sequences and keeps others
        seq = torch.where(mask, old - rollout, 0).sum(-1) / mask.sum(-1).clamp(min=1)
        kept = (seq.exp() >= threshold[0]) & (seq.exp() <= threshold[1])
        assert kept[mask.any(-1)].any() and not kept[mask.any(-1)].all()


@pytest.mark.parametrize("token_level_loss", [True, False])
def test_nan_at_masked_old_log_probs(orl, token_level_loss):
    """OpenRLHF #1240: NaN where ``action_mask`` is false makes OpenRLHF's loss and ppo_kl NaN
    (``x * mask`` keeps NaN); here it changes nothing."""
    lp, old, adv, mask, _ = case(torch.float32, seed=6)
    dirty = old.clone()
    dirty[~mask] = float("nan")
    fn = PolicyLoss(0.2, 0.28, 3.0, token_level_loss)
    (t_loss, _, t_kl, _), _ = run(
        orl.PolicyLoss(0.2, 0.28, 3.0, token_level_loss), lp, dirty, adv, mask
    )
    assert t_loss.isnan() and t_kl.isnan()
    clean, dirty_out = run(fn, lp, old, adv, mask), run(fn, lp, dirty, adv, mask)
    for a, b in zip(clean[0][:3], dirty_out[0][:3]):
        assert torch.equal(a, b)
    assert torch.equal(clean[1], dirty_out[1])
    reference = run(orl.PolicyLoss(0.2, 0.28, 3.0, token_level_loss), lp, old, adv, mask)
    assert_same(reference, dirty_out, torch.float32)


@pytest.mark.parametrize("kind", ["tis", "icepop", "seq-mask-tis"])
def test_garbage_at_masked_rollout_log_probs(orl, kind):
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
        orl.PolicyLoss(**kwargs), lp, dirty_old, adv, mask, dirty_rollout
    )
    assert t_kl.isnan() and t_vllm_kl.isnan()
    assert t_loss.isnan() == (kind != "icepop")
    fn = PolicyLoss(**kwargs)
    clean, dirty = (
        run(fn, lp, old, adv, mask, rollout),
        run(fn, lp, dirty_old, adv, mask, dirty_rollout),
    )
    for a, b in zip(clean[0], dirty[0]):
        assert torch.equal(a, b)
    assert torch.equal(clean[1], dirty[1])


@pytest.mark.parametrize("token_level_loss", [True, False])
def test_empty_batch_gives_zero(orl, token_level_loss):
    """No valid token: OpenRLHF divides 0 by 0 (NaN); here the loss and metrics are 0 and the
    gradient is zero."""
    lp, old, adv, mask, _ = case(torch.float32, seed=8)
    mask[:] = False
    (t_loss, t_clip, t_kl, _), _ = run(
        orl.PolicyLoss(token_level_loss=token_level_loss), lp, old, adv, mask
    )
    assert t_loss.isnan() and t_clip.isnan() and t_kl.isnan()
    (loss, clip, kl, _), grad = run(
        PolicyLoss(token_level_loss=token_level_loss), lp, old, adv, mask
    )
    assert loss.item() == clip.item() == kl.item() == 0.0
    assert torch.count_nonzero(grad) == 0


def test_mixed_dtypes_promote(orl):
    """float32 log-probs with float64 old log-probs: both compute in float64, and the gradient
    comes back in float32."""
    lp, old, adv, mask, _ = case(torch.float64, seed=10)
    lp = lp.float()
    theirs = run(orl.PolicyLoss(dual_clip=3.0), lp, old, adv, mask)
    ours = run(PolicyLoss(dual_clip=3.0), lp, old, adv, mask)
    assert ours[1].dtype == theirs[1].dtype == torch.float32
    assert_same(theirs, ours, torch.float64)


def test_same_signatures(orl):
    """Constructor and forward: the same parameter names, order and defaults; the same
    attributes after construction."""
    for name in ("__init__", "forward"):
        theirs = inspect.signature(getattr(orl.PolicyLoss, name)).parameters
        ours = inspect.signature(getattr(PolicyLoss, name)).parameters
        assert list(ours) == list(theirs)
        assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]
    args = (0.1, 0.3, 2.5, False, "ppo", True, [0.5, 3.0], "icepop")
    theirs, ours = orl.PolicyLoss(*args), PolicyLoss(*args)
    for attr in list(inspect.signature(PolicyLoss.__init__).parameters)[1:]:
        assert getattr(ours, attr) == getattr(theirs, attr), attr


def test_argument_errors():
    with pytest.raises(ha.ArgumentError, match="dual_clip"):
        PolicyLoss(dual_clip=1.0)
    with pytest.raises(ha.ArgumentError, match="gspo"):
        PolicyLoss(policy_loss_type="gspo")
    with pytest.raises(ha.ArgumentError, match="policy_loss_type"):
        PolicyLoss(policy_loss_type="grpo")
    with pytest.raises(ValueError, match="vllm_is_correction_type"):
        PolicyLoss(vllm_is_correction_type="mis")
    with pytest.raises(ha.ArgumentError, match="vllm_is_truncated_threshold"):
        PolicyLoss(enable_vllm_is_correction=True)
    with pytest.raises(ha.ArgumentError, match="low <= high"):
        PolicyLoss(enable_vllm_is_correction=True, vllm_is_truncated_threshold=[2.0, 0.5])
    lp, old, adv, mask, _ = case()
    fn = PolicyLoss(enable_vllm_is_correction=True, vllm_is_truncated_threshold=[0.5, 2.0])
    with pytest.raises(ha.ArgumentError, match="rollout_log_probs"):
        fn(lp, old, adv, mask)
    with pytest.raises(ha.ShapeError, match="action_mask"):
        PolicyLoss()(lp, old, adv, mask[:, 1:])
    with pytest.raises(ha.ArgumentError, match="dp_size"):
        PolicyLoss()(lp, old, adv, mask, dp_size=0)
    with pytest.raises(ha.ArgumentError, match="dp_size"):
        PolicyLoss()(lp, old, adv, mask, dp_size=2.0, batch_num_tokens=10.0)
    with pytest.raises(ha.ArgumentError, match="batch_num_tokens"):
        PolicyLoss()(lp, old, adv, mask, batch_num_tokens="10")
    with pytest.raises(ha.ArgumentError, match="global_batch_size"):
        PolicyLoss(token_level_loss=False)(lp, old, adv, mask, global_batch_size=torch.ones(2))


def test_dual_clip_off_is_plain_ppo():
    """The bound used without dual clip never binds, even at the +-20 log-ratio clamp."""
    lp, old, adv, mask, _ = case(torch.float64, seed=9)
    old[mask] = lp[mask] + 30.0 * torch.sign(torch.randn(int(mask.sum()), dtype=torch.float64))
    ratio = (lp - old).clamp(-20, 20).exp()
    per_token = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    expected = per_token[mask].sum() / mask.sum()
    loss = PolicyLoss()(lp, old, adv, mask)[0]
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


# --- the alignment term in the actor's training step ------------------------------------------


def test_capture_last_hidden():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    x = torch.randn(2, 4)
    with capture_last_hidden(net[0]) as cap:
        assert isinstance(cap, CapturedHidden)
        with pytest.raises(ha.ArgumentError, match="did not run"):
            _ = cap.hidden
        net(x)
        net(2 * x)  # the latest call wins
    torch.testing.assert_close(cap.hidden, net[0](2 * x))
    assert cap.hidden.requires_grad
    net(x)  # the hook is gone
    torch.testing.assert_close(cap.hidden, net[0](2 * x))
    assert not net[0]._forward_hooks
    with pytest.raises(ha.ArgumentError, match="module"):
        with capture_last_hidden(lambda v: v):
            pass
    for kind, expected in (("tuple", x), ("output", 3 * x)):
        module = Returns(kind)
        with capture_last_hidden(module) as cap:
            module(x)
        torch.testing.assert_close(cap.hidden, expected)
    module = Returns("dict")
    with pytest.raises(ha.ArgumentError, match="returned dict"):
        with capture_last_hidden(module):
            module(x)
    assert not module._forward_hooks


class Returns(torch.nn.Module):
    """Outputs of the shapes modules return: a tuple led by the hidden state, a model output
    with ``last_hidden_state`` (and other fields), a plain dict (refused)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "tuple":
            return x, 2 * x
        if self.kind == "output":
            return types.SimpleNamespace(logits=2 * x, last_hidden_state=3 * x)
        return {"h": x}


MARKER = [5, 6]  # "Answer:" in a tokenizer of its own
PROMPT_IDS = [[11, 12, 13], [21, 22]]
ROLLOUTS = 4


def tiny_qwen2():
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).float().eval()
    # As OpenRLHF's Actor sets it when it loads a model by name; without a cache, transformers
    # also keeps the sequences of a packed row apart (from the restarting position ids).
    model.config.use_cache = False
    return model


def rollout_samples(experience_cls):
    """Two prompts x four rollouts, one ``Experience`` each, as OpenRLHF 0.11.1's sample
    generator makes them: ``sequences [1, S]``, ``action_mask [1, S - 1]`` over the shifted
    tokens (position j: token j + 1 is an action), the prompt text and the 0/1 score."""
    g = torch.Generator().manual_seed(1)
    samples = []
    for p, prompt in enumerate(PROMPT_IDS):
        for r in range(ROLLOUTS):
            body = torch.randint(20, 40, (3 + r,), generator=g).tolist()
            answer = MARKER + [30 + r % 2] if (p + r) % 4 != 3 else []
            tokens = torch.tensor(prompt + body + answer + [2])
            action = torch.zeros_like(tokens)  # int64, as OpenRLHF makes it
            action[len(prompt) :] = 1
            score = torch.tensor([float(r % 2 == 0)])
            samples.append(
                experience_cls(
                    sequences=tokens[None],
                    attention_mask=torch.ones_like(tokens)[None],
                    action_mask=action[None, 1:],
                    prompts=[f"prompt {p}"],
                    labels=[f"label {p}"],
                    rewards=score,
                    scores=score,
                    response_length=action.sum()[None],
                    total_length=torch.tensor([float(len(tokens))]),
                    info={"score": score},
                )
            )
    return samples


def actor_step(trainer, experience, step=0):
    """``ActorPPOTrainer.training_step`` of OpenRLHF 0.11.1 cut down to the lines the README
    section adds or touches; ``trainer`` stands for ``self``. Under DeepSpeed the backbone is
    ``self.actor.model.module.get_decoder()`` (the engine wraps the model); here the model is
    not wrapped."""
    self = trainer
    sequences, action_mask = experience.sequences, experience.action_mask
    attention_mask = experience.attention_mask
    with capture_last_hidden(self.actor.model.get_decoder()) as captured:
        action_log_probs, output = self.actor(
            sequences, action_mask, attention_mask=attention_mask, return_output=True
        )
    actor_loss, clip_ratio, ppo_kl, vllm_kl = self.actor_loss_fn(
        action_log_probs,
        experience.action_log_probs,
        experience.advantages,
        action_mask=experience.action_mask,
        rollout_log_probs=experience.rollout_log_probs,
        **self.loss_batch_info,
    )
    kl_loss, kl_ctl = 0, 0.0
    loss = actor_loss + kl_loss * kl_ctl
    # --- the README lines, beside `if self.aux_loss:` ---
    if self.align_coef > 0:
        act = experience.action_mask
        in_response = F.pad(act, (sequences.shape[1] - act.shape[1], 0))
        anchors = ha.find_anchors(sequences, in_response, self.align_markers)
        hidden = captured.hidden
        if self.actor.packing_samples:
            hidden, anchors = hidden[0], ha.unpadded_rows(anchors, attention_mask)
        align = ha.loss(hidden, anchors, experience.scores, group_ids=experience.prompts)
        if self.args.train.dynamic_batch_enable:
            align = align * self.replay_buffer.dynamic_sample_loss_scale[step]
        loss += self.align_coef * align
        experience.info["align_loss"] = align.detach()
    return loss, actor_loss, action_log_probs


def trainer_and_experience(orl, variant):
    """The actor, a rollout batch that went through OpenRLHF's experience maker steps (old
    log-probs, group advantages) and its replay buffer (split into samples, unpadded, shuffled,
    re-batched: ``index`` is dropped, ``prompts`` travel with the rows), and the trainer's
    attributes the step reads."""
    model = tiny_qwen2()
    if variant == "lora":
        peft = pytest.importorskip("peft")
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        model = peft.get_peft_model(model, lora)
    actor = orl.Actor(model)
    # Set by Actor only when it loads a model by name.
    actor.packing_samples = variant == "packed"
    exp = orl.experience
    batch = exp.Experience.concat_experiences(rollout_samples(exp.Experience), 0)
    with torch.no_grad():
        old = actor(batch.sequences, batch.action_mask, batch.attention_mask)
    batch.action_log_probs = old + 0.05 * torch.randn(old.shape)
    adv = ha.dapo.group_advantages(batch.scores, group_ids=batch.prompts, eps=1e-9)
    batch.advantages = adv[:, None] * batch.action_mask
    items = exp.remove_padding_in_sequences(exp.split_experience_batch(batch))
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(2)).tolist()
    experience = exp.make_experience_batch([items[i] for i in order])
    assert experience.index is None and experience.rollout_log_probs is None
    trainer = types.SimpleNamespace(
        actor=actor,
        actor_loss_fn=PolicyLoss(0.2, 0.28),
        loss_batch_info={
            "dp_size": 1,
            "batch_num_tokens": experience.action_mask.sum().float(),
            "global_batch_size": torch.tensor(float(len(experience.sequences))),
        },
        align_coef=0.1,
        align_markers=[MARKER],
        args=types.SimpleNamespace(train=types.SimpleNamespace(dynamic_batch_enable=False)),
    )
    return trainer, experience, model


@pytest.mark.parametrize("variant", ["padded", "packed", "lora"])
def test_documented_actor_step(orl, variant):
    trainer, experience, model = trainer_and_experience(orl, variant)
    loss, actor_loss, log_probs = actor_step(trainer, experience)
    align = experience.info["align_loss"]
    torch.testing.assert_close(loss - actor_loss, 0.1 * align)

    # The same term from the model's own last hidden state, padded, computed directly.
    seq, att = experience.sequences, experience.attention_mask
    position_ids = (att.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(seq, attention_mask=att, position_ids=position_ids, output_hidden_states=True)
    valid = experience.action_mask.bool()
    in_response = torch.cat([torch.zeros_like(valid[:, :1]), valid], 1)
    anchors = ha.find_anchors(seq, in_response, [MARKER])
    assert (anchors >= 0).sum() == 6 and (anchors < 0).sum() == 2
    assert (seq[anchors >= 0, anchors[anchors >= 0] + 1] == MARKER[0]).all()
    gid = torch.tensor([int(p.split()[1]) for p in experience.prompts])
    expected = ha.loss(out.hidden_states[-1], anchors, experience.scores, group_ids=gid)
    torch.testing.assert_close(align, expected, rtol=1e-5, atol=1e-6)
    assert align.item() > 0

    # The step trained on the model's log-probs (packed rows too).
    ref = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, seq[:, 1:, None])[..., 0]
    torch.testing.assert_close(log_probs[valid], ref[valid], rtol=1e-5, atol=1e-5)

    # The alignment term's own gradient reaches the backbone's trainable parameters (all but
    # the head, which the hidden state does not pass through), and the step's loss backpropagates.
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and "lm_head" not in n}
    grads = torch.autograd.grad(loss - actor_loss, list(params.values()), retain_graph=True)
    assert all(g.isfinite().all() for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads) >= len(grads) // 2
    loss.backward()
    assert all(p.grad is not None for p in params.values())


def test_stubs_are_gone(orl):
    for name in STUBS:
        assert name not in sys.modules
