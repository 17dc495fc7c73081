"""``hidden_align.integrations.verl`` run through verl 0.9.1's own code, on the CPU.

Policy loss (``test_registry_*``): ``core_algos.get_policy_loss_fn("hidden_align")`` against
``get_policy_loss_fn("vanilla")`` on the same inputs, called directly and through verl's
``workers.utils.losses.ppo_loss``, which fills ``config.global_batch_info`` from the data as
the engine leaves it (``dp_size``, the all-reduced ``batch_num_tokens``, ``global_batch_size``,
``loss_scale_factor``) and slices the log-probs with ``no_padding_2_padding``; data prepared by
``DataProto.to_tensordict`` and ``padding.left_right_2_no_padding``; every ``loss_agg_mode``.

Alignment term (``test_alignment_*``), a tiny randomly initialised Qwen2 (2 layers, hidden 32,
built from a ``transformers`` config) in an ``FSDPEngineWithLMHead`` made without its
constructor (no FSDP wrapping or device mesh on the CPU; ``get_device_id`` and
``get_device_name`` of ``transformer_impl`` and ``seqlen_balancing`` patched to the CPU; a
one-process gloo group). verl functions that run: ``DataProto.to_tensordict``,
``left_right_2_no_padding`` (``unpad_input``), ``no_padding_2_padding``,
``tensordict_utils.assign_non_tensor`` / ``make_iterator`` / ``get``; the old-log-prob pass
``BaseEngine.infer_batch`` -> ``FSDPEngine.forward_backward_batch`` (``all_reduce`` of
``batch_num_tokens``, ``prepare_micro_batches`` with dynamic batch sizes:
``rearrange_micro_batches``; ``postprocess_batch_func`` with ``restore_dynamic_batch``) ->
``FSDPEngineWithLMHead.forward_step`` -> ``prepare_model_inputs`` / ``prepare_model_outputs``
(``_gather_and_unpad_packed``, ``logprobs_from_logits``, ``entropy_from_logits``), each through
our wrappers; the update ``FSDPEngine.forward_backward_batch`` (fixed micro-batches that split
every group, ``_gradient_sync_context``, one backward per micro-batch) -> ``forward_step`` ->
``losses.ppo_loss`` -> the registered ``hidden_align`` policy loss. Not run: the engine registry
and constructor (FSDP, device mesh, optimiser), ``TrainingWorker`` and Ray, Ulysses. The
accumulated gradient is checked against a direct full-batch computation on the padded batch
(``output_hidden_states``, verl's ``vanilla`` policy loss, ``hidden_align.loss`` without a
reference).
"""

from __future__ import annotations

import functools
import re
import socket
import types
import warnings

import numpy as np
import pytest
import torch

import hidden_align as ha

_INSTALL = "pip install verl==0.9.1"

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import verl
    except Exception as exc:  # noqa: BLE001 - any import failure means no verl to test against
        pytest.skip(f"verl is not importable ({exc}); {_INSTALL}", allow_module_level=True)
    if getattr(verl, "__version__", None) != "0.9.1":
        pytest.skip(
            f"written against verl 0.9.1, found {getattr(verl, '__version__', '?')}; {_INSTALL}",
            allow_module_level=True,
        )
    from verl import DataProto
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.utils import seqlen_balancing
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import ActorConfig, PolicyLossConfig
    from verl.workers.engine.fsdp import transformer_impl
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    from hidden_align.integrations import verl as ha_verl
    from hidden_align.integrations import verl_engine, verl_inputs
    from hidden_align.integrations.verl_settings import Settings

from tensordict import TensorDict  # noqa: E402 - a verl dependency
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
VOCAB, PROMPT, RESPONSE = 64, 5, 10
MARKERS = [[7, 8], [9]]  # token ids; random text avoids ids below 10


def actor_config(mode="token-mean", loss_mode="hidden_align", loss_scale_factor=None, batch=16):
    return ActorConfig(
        strategy="fsdp",
        rollout_n=4,
        ppo_mini_batch_size=batch,
        ppo_micro_batch_size_per_gpu=4,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=10.0,
        loss_agg_mode=mode,
        loss_scale_factor=loss_scale_factor,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode),
    )


def padded_batch(seed, batch=16, groups=4):
    """verl's padded rollout batch: left-padded prompts, right-padded responses holding a marker
    (at the response start in one row, so its anchor is the last prompt token), rows of each
    group scattered."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(10, VOCAB, (batch, PROMPT), generator=g)
    responses = torch.randint(10, VOCAB, (batch, RESPONSE), generator=g)
    prompt_len = torch.randint(1, PROMPT + 1, (batch,), generator=g)
    resp_len = torch.randint(4, RESPONSE + 1, (batch,), generator=g)
    for b in range(batch):
        if b % 7 == 3:
            continue  # no marker: no anchor
        marker = MARKERS[b % 2]
        start = 0 if b == 1 else int(torch.randint(0, int(resp_len[b]) - 2, (1,), generator=g))
        responses[b, start : start + len(marker)] = torch.tensor(marker)
    cols = torch.arange(PROMPT + RESPONSE)
    attention = (cols >= PROMPT - prompt_len[:, None]) & (cols < PROMPT + resp_len[:, None])
    attention = attention.long()
    response_mask = attention[:, PROMPT:].clone()
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    uids = np.array([f"prompt-{seed}-{i}" for i in torch.randperm(batch, generator=g) % groups])
    acc = torch.rand(batch, generator=g) < 0.75
    rm_scores = torch.zeros(batch, RESPONSE)
    rm_scores[torch.arange(batch), resp_len - 1] = torch.where(acc, 1.0, -1.0)
    tensors = dict(
        prompts=prompts,
        responses=responses,
        input_ids=torch.cat([prompts, responses], 1),
        attention_mask=attention,
        position_ids=positions,
        response_mask=response_mask,
        rm_scores=rm_scores,
    )
    return tensors, {"uid": uids, "acc": acc.numpy()}


def no_padding(tensors, non_tensors, **extra):
    proto = DataProto(
        batch=TensorDict(dict(tensors, **extra), batch_size=[len(non_tensors["uid"])]),
        non_tensor_batch=dict(non_tensors),
        meta_info={"temperature": 1.0},
    )
    return left_right_2_no_padding(proto.to_tensordict())


# ---- the policy loss through verl's registry ----------------------------------------------


def policy_inputs(seed, tensors):
    g = torch.Generator().manual_seed(seed)
    shape = tensors["responses"].shape
    log_prob = -torch.rand(shape, generator=g) * 3
    old = log_prob + (torch.rand(shape, generator=g) - 0.5)
    adv = torch.randn(shape, generator=g)
    weights = torch.rand(shape, generator=g) + 0.5
    return log_prob, old, adv, weights


def metric_values(metrics):
    return {k: float(np.mean(getattr(v, "values", [v]))) for k, v in metrics.items()}


@pytest.mark.parametrize(
    "mode,scale", [(m, None) for m in MODES] + [("seq-mean-token-sum-norm", 24)]
)
def test_registry_parity(mode, scale):
    tensors, non_tensors = padded_batch(1, batch=12)
    log_prob, old, adv, weights = policy_inputs(2, tensors)
    data = no_padding(tensors, non_tensors, old_log_probs=old, advantages=adv)
    data["rollout_is_weights"] = weights
    # What FSDPEngine.forward_backward_batch leaves on the data of one of two ranks: the token
    # count all-reduced over both, and the global batch size.
    other_rank_tokens = 37
    tu.assign_non_tensor(
        data,
        dp_size=2,
        batch_num_tokens=int(data["loss_mask"].sum()) + other_rank_tokens,
        global_batch_size=2 * data.batch_size[0],
    )
    offsets = data["input_ids"].offsets()
    seq_values = torch.randn(int(offsets[-1])) * 0.1 - 2
    # The response positions of the packed log-probs carry log_prob (no_padding_2_padding's rule).
    resp_len = tensors["attention_mask"][:, PROMPT:].sum(1)
    for b in range(len(resp_len)):
        end = int(offsets[b + 1])
        seq_values[end - int(resp_len[b]) - 1 : end - 1] = log_prob[b, : int(resp_len[b])]

    results = {}
    for name in ("vanilla", "hidden_align"):
        config = actor_config(mode, name, scale, batch=12)
        leaf = seq_values.clone().requires_grad_()
        packed = torch.nested.nested_tensor_from_jagged(leaf, offsets)
        loss, metrics = ppo_loss(config, {"log_probs": packed}, data)
        (grad,) = torch.autograd.grad(loss, leaf)
        # The same inputs straight through the registry, with the info ppo_loss filled in.
        x = log_prob.clone().requires_grad_()
        direct, direct_metrics = get_policy_loss_fn(name)(
            old_log_prob=old,
            log_prob=x,
            advantages=adv,
            response_mask=tensors["response_mask"].bool(),
            loss_agg_mode=mode,
            config=config,
        )
        (direct_grad,) = torch.autograd.grad(direct, x)
        assert config.global_batch_info == {
            "dp_size": 2,
            "batch_num_tokens": int(data["loss_mask"].sum()) + other_rank_tokens,
            "global_batch_size": 24,
            "loss_scale_factor": scale,
        }
        results[name] = (loss, metric_values(metrics), grad, direct, direct_metrics, direct_grad)

    ref, ours = results["vanilla"], results["hidden_align"]
    assert ours[0].dtype == torch.float32
    for i in (0, 3):
        torch.testing.assert_close(ours[i], ref[i], rtol=2e-6, atol=1e-6)
    for i in (2, 5):
        torch.testing.assert_close(ours[i], ref[i], rtol=2e-6, atol=1e-7)
    for i in (1, 4):
        assert ours[i].keys() == ref[i].keys()
        for key in ref[i]:
            assert isinstance(ours[i][key], float), key
            assert ours[i][key] == pytest.approx(ref[i][key], rel=2e-6, abs=2e-6), key


@pytest.mark.parametrize("mode", MODES)
def test_registry_bf16_log_prob_with_f32_batch(mode):
    """verl's FSDP forward runs under bf16 autocast, and ``logprobs_from_logits`` returns bf16
    log-probs without flash-attn's cross-entropy; old log-probs, advantages and weights stay
    float32 in the batch. ``vanilla`` computes in the promoted float32: so must we, with the
    gradient back in bfloat16."""
    tensors, _ = padded_batch(11, batch=8)
    log_prob, old, adv, weights = policy_inputs(12, tensors)
    log_prob = log_prob.bfloat16()
    mask = tensors["response_mask"].bool()
    results = {}
    calls = [("vanilla", get_policy_loss_fn("vanilla"))]
    calls += [("registry", get_policy_loss_fn("hidden_align")), ("wrapper", ha_verl.policy_loss)]
    for name, fn in calls:
        config = actor_config(mode, "vanilla" if name == "vanilla" else "hidden_align", batch=8)
        config.global_batch_info.update(
            dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=8
        )
        x = log_prob.clone().requires_grad_()
        loss, metrics = fn(
            old_log_prob=old,
            log_prob=x,
            advantages=adv,
            response_mask=mask,
            loss_agg_mode=mode,
            config=config,
            rollout_is_weights=weights,
        )
        (grad,) = torch.autograd.grad(loss, x)
        results[name] = (loss, metrics, grad)
    ref_loss, ref_metrics, ref_grad = results["vanilla"]
    assert ref_loss.dtype == torch.float32 and ref_grad.dtype == torch.bfloat16
    for name in ("registry", "wrapper"):
        loss, metrics, grad = results[name]
        assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16, name
        torch.testing.assert_close(loss, ref_loss, rtol=2e-6, atol=1e-6)
        # Each a float32 gradient (the two equal to float32 rounding) rounded once to bfloat16:
        # at most one bfloat16 ulp apart.
        torch.testing.assert_close(grad, ref_grad, rtol=8e-3, atol=1e-7)
        assert metrics.keys() == ref_metrics.keys()
        for key in ref_metrics:
            assert metrics[key] == pytest.approx(float(ref_metrics[key]), rel=2e-6, abs=2e-6)


def test_registry_refuses_double_backward():
    """The wrapper goes through the fused op: its gradient is first-order only, and a second
    derivative raises instead of silently dropping the second-order terms."""
    tensors, _ = padded_batch(13, batch=4)
    log_prob, old, adv, _ = policy_inputs(14, tensors)
    x = log_prob.clone().requires_grad_()
    config = actor_config(batch=4)
    loss, _ = get_policy_loss_fn("hidden_align")(
        old, x, adv, tensors["response_mask"].bool(), "token-mean", config
    )
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad((g**2).sum(), x)


def test_registry_clip_fallback_and_missing_config():
    """``clip_ratio_low/high`` None fall back to ``clip_ratio``, as in verl."""
    tensors, _ = padded_batch(3, batch=4)
    log_prob, old, adv, _ = policy_inputs(4, tensors)
    mask = tensors["response_mask"].bool()
    out = {}
    for name in ("vanilla", "hidden_align"):
        config = ActorConfig(
            strategy="fsdp",
            rollout_n=1,
            ppo_mini_batch_size=4,
            ppo_micro_batch_size_per_gpu=4,
            clip_ratio=0.1,
            clip_ratio_low=None,
            clip_ratio_high=None,
        )
        out[name] = get_policy_loss_fn(name)(old, log_prob, adv, mask, "token-mean", config)
    torch.testing.assert_close(out["hidden_align"][0], out["vanilla"][0], rtol=2e-6, atol=1e-6)
    assert out["hidden_align"][1] == pytest.approx(out["vanilla"][1], rel=2e-6, abs=2e-6)
    with pytest.raises(ValueError, match="config"):
        ha_verl.policy_loss(old, log_prob, adv, mask)


# ---- the alignment term through verl's engine ----------------------------------------------


@pytest.fixture(scope="module")
def process_group():
    dist = torch.distributed
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            pytest.skip("needs a one-process group")
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def build_engine(autocast=torch.float32):
    """An ``FSDPEngineWithLMHead`` without its constructor (the registry gives none on the
    CPU), over a tiny Qwen2 on the CPU, with what its forward and backward read."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    engine = object.__new__(transformer_impl.FSDPEngineWithLMHead)
    engine.module = Qwen2ForCausalLM(config)
    engine.pad_to_length = False
    engine.use_ulysses_sp = False
    engine.ulysses_sequence_parallel_size = 1
    engine.ulysses_device_mesh = None
    # verl's default (mixed_precision.param_dtype) is bfloat16: forward_step then runs the
    # model and the loss under torch.autocast, and the log-probs come out in bfloat16.
    engine._autocast_dtype = autocast
    engine.engine_config = types.SimpleNamespace(
        forward_only=False,
        use_no_sync_for_gradient_accumulation=True,
        entropy_checkpointing=False,
        entropy_from_logits_with_chunking=False,
    )
    engine.compute_entropy_from_logits = transformer_impl.verl_F.entropy_from_logits
    engine.model_config = types.SimpleNamespace(tokenizer=None)
    return engine


def cpu_verl() -> None:
    """For a whole process (a spawned rank): verl falls back to CUDA as its platform, and its
    engine and FSDP code ask for the device by name."""
    from verl.utils import fsdp_utils
    from verl.workers.engine.fsdp import utils as engine_utils

    for module in (transformer_impl, fsdp_utils):
        module.get_device_id = lambda: "cpu"
    for module in (transformer_impl, fsdp_utils, seqlen_balancing, engine_utils):
        module.get_device_name = lambda: "cpu"


@pytest.fixture
def engine_factory(process_group, monkeypatch):
    monkeypatch.setattr(transformer_impl, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(transformer_impl, "get_device_name", lambda: "cpu")
    monkeypatch.setattr(seqlen_balancing, "get_device_name", lambda: "cpu")
    for name in ("OFFSET", "OCCURRENCE", "LOSS_TYPE", "THRESHOLD", "CORRECT"):
        monkeypatch.delenv(f"HIDDEN_ALIGN_{name}", raising=False)
    monkeypatch.setenv("HIDDEN_ALIGN_MARKERS", "[[7, 8], [9]]")
    monkeypatch.setenv("HIDDEN_ALIGN_COEF", "0.5")

    def make(layer="norm", autocast=torch.float32):
        monkeypatch.setenv("HIDDEN_ALIGN_LAYER", layer)
        return build_engine(autocast)

    return make


def old_log_prob_pass(engine, tensors, non_tensors, rmpad):
    """The driver's ``_compute_old_log_prob`` around the worker's ``infer_batch``."""
    data = no_padding(tensors, non_tensors)
    tu.assign_non_tensor(
        data,
        calculate_entropy=True,
        compute_loss=False,
        use_remove_padding=rmpad,
        use_dynamic_bsz=True,
        max_token_len_per_gpu=40,
        use_fused_kernels=False,
    )
    output = engine.infer_batch(data, loss_function=None)
    return no_padding_2_padding(output["model_output"]["log_probs"], data).float()


def update(engine, tensors, non_tensors, rmpad, old, adv, mini_batch):
    """The driver's ``_update_actor`` and the worker's ``train_mini_batch`` / ``train_batch``,
    without the optimiser step (gradients accumulate over the mini-batches)."""
    data = no_padding(tensors, non_tensors, old_log_probs=old, advantages=adv)
    tu.assign_non_tensor(
        data,
        calculate_entropy=False,
        global_batch_size=mini_batch,
        use_remove_padding=rmpad,
        use_dynamic_bsz=False,
        micro_batch_size_per_gpu=3 if mini_batch % 3 == 0 else 4,
        use_fused_kernels=False,
    )
    loss = functools.partial(ppo_loss, config=actor_config(batch=mini_batch))
    outputs = []
    batches = tu.make_iterator(data, mini_batch, epochs=1, dataloader_kwargs={"shuffle": False})
    for mini in batches:
        outputs.append(engine.forward_backward_batch(mini, loss, forward_only=False))
    return outputs


def direct(model, tensors, non_tensors, old, adv, layer, coef, autocast=torch.float32):
    """Policy loss + coef * alignment loss on the padded full batch, no verl engine; the model
    forward under ``autocast`` as verl's ``forward_step`` runs it."""
    with torch.autocast("cpu", dtype=autocast, enabled=autocast != torch.float32):
        out = model(
            input_ids=tensors["input_ids"],
            attention_mask=tensors["attention_mask"],
            position_ids=tensors["position_ids"],
            output_hidden_states=True,
        )
    hidden = out.hidden_states[-1] if layer == "norm" else out.hidden_states[int(layer) + 1]
    logits = out.logits[:, PROMPT - 1 : -1]
    log_prob = torch.log_softmax(logits, -1).gather(-1, tensors["responses"][..., None])[..., 0]
    mask = tensors["response_mask"]
    config = actor_config(loss_mode="vanilla")
    config.global_batch_info.update(
        dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=len(mask)
    )
    pg, _ = get_policy_loss_fn("vanilla")(old, log_prob, adv, mask.bool(), "token-mean", config)
    in_response = torch.cat([torch.zeros_like(tensors["prompts"]), mask], 1)
    anchors = ha.find_anchors(tensors["input_ids"], in_response, MARKERS)
    acc = torch.as_tensor(non_tensors["acc"])
    align, stats = ha.loss(
        hidden, anchors, acc, group_ids=list(non_tensors["uid"]), return_stats=True
    )
    return pg + coef * align, align, stats


def full_batch_gradients(model, total, align, stats, coef) -> dict:
    """What a test compares with: the gradient of ``total`` (:func:`direct`) in float32, the
    alignment term's part of it alone, the alignment loss and the statistics."""
    params = dict(model.named_parameters())
    term = torch.autograd.grad(
        coef * align, list(params.values()), retain_graph=True, allow_unused=True
    )
    total.backward()
    return {
        "grads": {n: p.grad.float() for n, p in params.items()},
        "term": {
            n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), term)
        },
        "align": float(align.detach()),
        "stats": stats,
    }


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "rmpad,layer,autocast",
    [
        (True, "norm", "float32"),
        (True, "0", "float32"),
        (False, "norm", "float32"),
        (True, "norm", "bfloat16"),
        (False, "0", "bfloat16"),
    ],
)
def test_alignment_matches_full_batch(engine_factory, monkeypatch, rmpad, layer, autocast):
    autocast = getattr(torch, autocast)
    bf16 = autocast == torch.bfloat16
    engine = engine_factory(layer, autocast)
    seen = []  # the dtypes of log_prob, old_log_prob and advantages the fused loss receives

    def spy(log_prob, *args, **kwargs):
        seen.append((log_prob.dtype, args[0].dtype, args[1].dtype))
        return policy_loss(log_prob, *args, **kwargs)

    policy_loss = ha_verl.dapo.policy_loss
    monkeypatch.setattr(ha_verl.dapo, "policy_loss", spy)
    model = engine.module
    tensors, non_tensors = padded_batch(5)
    # Every group has rollouts in several of the update's micro-batches (4 rows each).
    chunks = [set(non_tensors["uid"][i : i + 4]) for i in range(0, 16, 4)]
    assert all(sum(uid in c for c in chunks) > 1 for uid in set(non_tensors["uid"]))
    old = old_log_prob_pass(engine, tensors, non_tensors, rmpad)
    ref = verl_engine.state_of(engine).reference
    assert ref.total_rows == 16 and ref.source == "acc" and ref.valid_groups >= 3
    adv = torch.randn(old.shape, generator=torch.Generator().manual_seed(6))

    model.zero_grad()
    (out,) = update(engine, tensors, non_tensors, rmpad, old, adv, mini_batch=16)
    accumulated = grads(model)
    metrics = {k: v.aggregate() for k, v in out["metrics"].items()}
    # verl's default: bfloat16 log-probs (no flash-attn cross-entropy) with float32 old
    # log-probs and advantages from the batch.
    assert set(seen) == {(autocast, torch.float32, torch.float32)}

    model.zero_grad()
    total, align, stats = direct(model, tensors, non_tensors, old, adv, layer, 0.5, autocast)
    # The term matters: its gradient is not lost in the tolerance.
    params = [p for p in model.parameters()]
    term = torch.autograd.grad(align, params, retain_graph=True, allow_unused=True)
    assert max(float(g.abs().max()) for g in term if g is not None) > 1e-3
    total.backward()
    expected = grads(model)

    # Under bfloat16 autocast the engine's micro-batched (and packed) forward and this padded
    # one round their bfloat16 matmuls differently: a few bfloat16 ulps apart (under 1.2% of
    # each parameter's largest gradient here), against float32 rounding without autocast.
    rel = 1e-4 if bf16 else 1e-5
    assert sum(out["loss"]) == pytest.approx(float(total.detach()), rel=rel, abs=1e-6)
    assert accumulated.keys() == expected.keys()
    for name in expected:
        if bf16:
            atol = 3e-2 * float(expected[name].abs().max())
            torch.testing.assert_close(accumulated[name], expected[name], rtol=3e-2, atol=atol)
        else:
            torch.testing.assert_close(accumulated[name], expected[name], rtol=1e-4, atol=2e-6)
    assert metrics["actor/ha_align_loss"] == pytest.approx(float(align.detach()), rel=rel, abs=1e-6)
    # A cosine near 0 (mean over groups): bfloat16 rounding is absolute there.
    cosine = pytest.approx(float(stats["mean_cosine"]), rel, abs=2e-4 if bf16 else None)
    assert metrics["actor/ha_anchor_cosine"] == cosine
    assert metrics["actor/ha_valid_groups"] == int(stats["valid_groups"])
    assert {"actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl"} <= metrics.keys()


def test_alignment_mini_batches_scale_to_the_full_loss(engine_factory):
    """Two mini-batches: each step's term is scaled by the mini-batch count, so the metric
    (verl's mean over mini-batches) is the full-batch loss and the accumulated alignment
    gradient twice the full-batch one."""
    engine = engine_factory()
    model = engine.module
    tensors, non_tensors = padded_batch(7)
    old = old_log_prob_pass(engine, tensors, non_tensors, True)
    adv = torch.zeros_like(old)  # no policy gradient: only the term remains

    model.zero_grad()
    outs = update(engine, tensors, non_tensors, True, old, adv, mini_batch=8)
    accumulated = grads(model)
    per_step = [o["metrics"]["actor/ha_align_loss"].aggregate() for o in outs]

    model.zero_grad()
    _, align, _ = direct(model, tensors, non_tensors, old, adv, "norm", coef=0.5)
    (2 * 0.5 * align).backward()
    assert np.mean(per_step) == pytest.approx(float(align.detach()), rel=1e-5)
    for name, grad in grads(model).items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=2e-6)


def test_alignment_needs_the_old_log_prob_pass(engine_factory):
    engine = engine_factory()
    tensors, non_tensors = padded_batch(8)
    old = torch.zeros(tensors["responses"].shape)
    with pytest.raises(RuntimeError, match="no group statistics"):
        update(engine, tensors, non_tensors, True, old, old, mini_batch=16)
    # Statistics of another batch: its groups are unknown to them.
    old_log_prob_pass(engine, *padded_batch(9), True)
    with pytest.raises(RuntimeError, match="another batch"):
        update(engine, tensors, non_tensors, True, old, old, mini_batch=16)


def test_reference_policy_pass_collects_nothing(engine_factory):
    """The reference-policy pass (``calculate_entropy`` off) leaves the statistics alone."""
    engine = engine_factory()
    tensors, non_tensors = padded_batch(10)
    old_log_prob_pass(engine, tensors, non_tensors, True)
    ref = verl_engine.state_of(engine).reference
    data = no_padding(tensors, non_tensors)
    tu.assign_non_tensor(
        data,
        calculate_entropy=False,
        use_remove_padding=True,
        use_dynamic_bsz=False,
        micro_batch_size_per_gpu=8,
    )
    engine.infer_batch(data, loss_function=None)
    assert verl_engine.state_of(engine).reference is ref


def test_hook_target_finds_wrapped_stacks():
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    inner = Qwen2ForCausalLM(config)
    wrapped = torch.nn.Module()  # a PEFT-like prefix: base_model.model.model.layers
    wrapped.base_model = torch.nn.Module()
    wrapped.base_model.model = inner
    target = verl_inputs.hook_target
    assert target(wrapped, "norm", None) is inner.model.norm
    assert target(wrapped, "-1", -1) is inner.model.layers[2]
    assert target(wrapped, "layers.1.mlp", None) is inner.model.layers[1].mlp
    with pytest.raises(RuntimeError, match="out of range"):
        target(wrapped, "3", 3)
    with pytest.raises(RuntimeError, match="names 0 modules"):
        target(wrapped, "lm_head_x", None)


def test_marker_strings_use_the_actor_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate("A n s : x Ġ Ċ An Ans ĠAns".split())}
    tok = Tokenizer(models.BPE(vocab, [("A", "n"), ("An", "s"), ("Ġ", "Ans")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    state = verl_engine.EngineState(Settings(markers=("Ans:", (5, 6))))
    engine = types.SimpleNamespace(model_config=types.SimpleNamespace(tokenizer=tok))
    text, ids = verl_engine._markers(engine, state)
    assert isinstance(text, ha.TextMarkers) and text.strings == ("Ans:",) and ids == [5, 6]
    # The string is matched as text ("An" "s" ":", " Ans" ":"), the id tuple token for token.
    tokens = torch.tensor([[4, 7, 2, 3, 4], [4, 9, 3, 4, 4], [4, 4, 4, 5, 6]])
    anchors = ha.find_anchors(tokens, torch.ones(3, 5), [text, ids])
    assert anchors.tolist() == [0, 0, 2]
    state = verl_engine.EngineState(Settings(markers=("Ans:",)))
    engine.model_config.tokenizer = None
    with pytest.raises(RuntimeError, match="tokenizer"):
        verl_engine._markers(engine, state)


def test_correctness_lookup_order():
    """Where ``HIDDEN_ALIGN_CORRECT`` is read: a key of the batch first (verl's default trainer);
    then each rollout's ``extra_fields["reward_extra_info"]`` (verl's V1 trainer); ``rm_scores``
    only where the batch has no ``extra_fields``. A V1 batch in which a rollout lacks the key
    raises, naming the key, where it looked and the rollout, rather than reading ``rm_scores``
    for that rollout or the batch; ``HIDDEN_ALIGN_CORRECT=rm_scores`` reads the score."""
    correctness = verl_inputs._correctness
    # V1 layout: nested per-token scores with the reward on the last token. The first rollout is
    # correct but overlong: DAPO's penalty brings its score to 0, below the threshold.
    rm_scores = torch.nested.as_nested_tensor(
        [torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0, -1.0]), torch.tensor([1.0])],
        layout=torch.jagged,
    )
    uids = ["p0", "p0", "p1"]
    extra = [{"reward_extra_info": {"acc": acc, "score": 1.0}} for acc in (True, False, True)]

    def batch(**fields):
        return tu.get_tensordict({"uid": uids, "rm_scores": rm_scores, **fields})

    def read(data, key="acc"):
        values, source = correctness(data, key, "cpu")
        assert values.dtype == torch.float32
        return values.tolist(), source

    assert read(batch(acc=[0.0, 1.0, 0.0], extra_fields=extra)) == ([0.0, 1.0, 0.0], "acc")
    v1 = ([1.0, 0.0, 1.0], "extra_fields.reward_extra_info.acc")
    assert read(batch(extra_fields=extra)) == v1
    # Each micro-batch reads its own rows (verl's split keeps the per-rollout dicts).
    part = tu.index_select_tensor_dict(batch(extra_fields=extra), torch.tensor([2, 0]))
    assert read(part) == ([1.0, 1.0], v1[1])
    assert read(batch(extra_fields=extra), "rm_scores") == ([0.0, -1.0, 1.0], "rm_scores")
    assert read(batch()) == ([0.0, -1.0, 1.0], "rm_scores")

    for fields in (
        [extra[0], {"reward_extra_info": {"score": 0.0}}, extra[2]],  # one rollout lacks it
        [extra[0], {}, None],  # no reward_extra_info at all
        [{"reward_extra_info": {}}] * 3,  # a reward manager that writes no extra info
    ):
        missing = [
            i for i, f in enumerate(fields) if "acc" not in (f or {}).get("reward_extra_info", {})
        ]
        shown = ", ".join(f"{i} (uid {uids[i]!r})" for i in missing)
        message = (
            f"no key 'acc', and {len(missing)} of its 3 rollouts have no 'acc' in "
            f"extra_fields['reward_extra_info'] (verl's V1 trainer keeps the reward manager's "
            f"extra info there): rollouts {shown}. Set HIDDEN_ALIGN_CORRECT"
        )
        with pytest.raises(RuntimeError, match=re.escape(message)):
            correctness(batch(extra_fields=fields), "acc", "cpu")
    with pytest.raises(RuntimeError, match="neither 'acc' nor 'rm_scores'"):
        correctness(tu.get_tensordict({"uid": uids, "responses": rm_scores}), "acc", "cpu")


def test_settings_from_env():
    assert Settings.from_env({}) == Settings()
    assert Settings().markers == ("Answer:", "\\boxed{") and Settings().coef == 0.1
    s = Settings.from_env(
        {
            "HIDDEN_ALIGN_COEF": "0.25",
            "HIDDEN_ALIGN_MARKERS": '["Answer:", [7, 8]]',
            "HIDDEN_ALIGN_LAYER": "-2",
            "HIDDEN_ALIGN_LOSS_TYPE": "mse",
            "HIDDEN_ALIGN_OFFSET": "0",
            "HIDDEN_ALIGN_CORRECT": "score",
        }
    )
    assert (s.coef, s.markers, s.layer_index, s.loss_type, s.offset, s.correct_key) == (
        0.25,
        ("Answer:", (7, 8)),
        -2,
        "mse",
        0,
        "score",
    )
    assert Settings.from_env({"HIDDEN_ALIGN_MARKERS": "Answer:"}).markers == ("Answer:",)
    for env, match in [
        ({"HIDDEN_ALIGN_COEF": "x"}, "HIDDEN_ALIGN_COEF"),
        ({"HIDDEN_ALIGN_LOSS_TYPE": "contrastive"}, "HIDDEN_ALIGN_LOSS_TYPE"),
        ({"HIDDEN_ALIGN_MARKERS": "[[]]"}, "HIDDEN_ALIGN_MARKERS"),
        ({"HIDDEN_ALIGN_MARKERS": "[1.5]"}, "HIDDEN_ALIGN_MARKERS"),
    ]:
        with pytest.raises(ValueError, match=match):
            Settings.from_env(env)


def test_install_checks_the_verl_version(monkeypatch):
    monkeypatch.setattr(ha_verl.verl, "__version__", "0.8.0")
    monkeypatch.setenv("HIDDEN_ALIGN_COEF", "0.1")
    with pytest.raises(RuntimeError, match="verl 0.8.0"):
        ha_verl.install()
    monkeypatch.setenv("HIDDEN_ALIGN_COEF", "0")
    with pytest.warns(UserWarning, match="policy loss only"):
        ha_verl.install()
    assert get_policy_loss_fn("hidden_align") is ha_verl.policy_loss
    # Applied once: installing again leaves the engine's methods as they are.
    assert verl_engine.patch() is False
