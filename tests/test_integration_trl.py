"""``hidden_align.integrations.trl.HiddenAlignGRPOTrainer`` end to end on the CPU, with TRL's own
trainer: a tiny randomly initialised Qwen2 causal LM, a byte-level BPE tokenizer trained here on
a small corpus (nothing downloaded), a toy verifiable reward and two optimiser steps.

* the alignment metrics appear in ``trainer.state.log_history``;
* with ``align_coef=0`` the run is plain ``GRPOTrainer``, bit for bit (parameters and logs);
* with ``align_coef > 0`` the parameters move differently;
* on one batch, the term the trainer adds to TRL's loss (and to its gradient) is
  ``align_coef * ha.loss(...) / gradient_accumulation_steps`` on hidden states computed
  separately by ``output_hidden_states=True``, with anchors, rewards and groups derived here from
  the batch's tokens (for the last hidden state and for a decoder layer's output).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import hidden_align as ha

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except Exception as exc:  # noqa: BLE001 - any import failure means TRL cannot run here
        pytest.skip(
            f"trl is not importable ({type(exc).__name__}: {exc}); install it: pip install trl",
            allow_module_level=True,
        )
    # Outside the skip: with TRL present, a failure here is ours.
    from hidden_align.integrations.trl import HiddenAlignGRPOTrainer

# The tiny Qwen2, its tokenizer and the prompts, shared with the run on two processes.
from trl_ranks import ANSWERS, COEF, GROUP, PROMPTS, build_tokenizer, make_model  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # A model this small trains faster on one thread, and steadily on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def markers(tokenizer):
    # A random policy writes no real answer marker; half of the vocabulary as one-token
    # "markers" gives nearly every completion an anchor, so groups with two correct anchored
    # completions occur in every step.
    return [[i] for i in range(3, len(tokenizer), 2)]


def correct(completions, answer, **kwargs):
    """Toy verifiable reward: 1 when the completion shows a digit of the reference answer."""
    return [float(any(d in c for d in a)) for c, a in zip(completions, answer)]


def brevity(completions, **kwargs):
    """A second reward, never above the threshold: correctness must come from `correct`."""
    return [-len(c) / 100 for c in completions]


def make_trainer(
    cls,
    tokenizer,
    out_dir,
    accumulation=2,
    per_generation=None,
    dropout=0.0,
    config=None,
    **extra,
):
    args = GRPOConfig(
        output_dir=str(out_dir),
        use_cpu=True,
        per_device_train_batch_size=8,
        # By default a generation batch of 16, shuffled into 2 micro-steps of one optimiser step.
        gradient_accumulation_steps=accumulation,
        steps_per_generation=per_generation,
        num_generations=GROUP,
        max_completion_length=12,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        learning_rate=1e-2,
        seed=0,
        bf16=False,
        disable_tqdm=True,
        **(config or {}),
    )
    data = Dataset.from_dict({"prompt": PROMPTS, "answer": ANSWERS})
    return cls(
        model=make_model(tokenizer, attention_dropout=dropout),
        reward_funcs=[brevity, correct],
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        **extra,
    )


def train(cls, tokenizer, out_dir, **extra):
    trainer = make_trainer(cls, tokenizer, out_dir, **extra)
    trainer.train()
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    steps = [log for log in trainer.state.log_history if "loss" in log]
    return params, steps, getattr(trainer, "align_statistics_source", None)


# (gradient_accumulation_steps, steps_per_generation, where the statistics come from): one
# generation per optimiser step, where TRL runs no no-grad pass; and a generation batch over two
# optimiser steps, where TRL's pass for old_per_token_logps serves the statistics.
SCHEDULES = {"own_pass": (2, None), "trl_pass": (2, 4)}


@pytest.fixture(scope="module", params=sorted(SCHEDULES))
def runs(request, tokenizer, markers, tmp_path_factory):
    out = tmp_path_factory.mktemp("trl")
    accumulation, per_generation = SCHEDULES[request.param]
    # With dropout: the statistics pass must not draw random numbers (align_coef 0 is plain
    # GRPOTrainer bit for bit, and step 1's metrics do not depend on the coefficient).
    schedule = {"accumulation": accumulation, "per_generation": per_generation, "dropout": 0.1}
    align = {"align_markers": markers, "align_reward": "correct", **schedule}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = {
            "plain": train(GRPOTrainer, tokenizer, out, **schedule),
            "zero": train(HiddenAlignGRPOTrainer, tokenizer, out, align_coef=0.0, **align),
            "align": train(HiddenAlignGRPOTrainer, tokenizer, out, align_coef=COEF, **align),
        }
    assert result["zero"][2] == result["align"][2] == request.param
    return result


METRICS = ("hidden_align/align_loss", "hidden_align/anchor_cosine")


def test_metrics_are_logged(runs):
    for name in ("zero", "align"):
        steps = runs[name][1]
        assert len(steps) == 2
        for log in steps:
            assert all(key in log for key in METRICS), log.keys()
            assert math.isfinite(log["hidden_align/align_loss"])
            assert 0 < log["hidden_align/anchored_fraction"] <= 1
        # The anchor cosine is None in a step without a valid group; the seeded run has them.
        cosines = [log["hidden_align/anchor_cosine"] for log in steps]
        assert all(c is not None and -1 <= c <= 1 for c in cosines), cosines
    # Step 1 sees the same model and batch whatever the coefficient: the same diagnostics.
    first = [runs[name][1][0] for name in ("zero", "align")]
    assert all(first[0][k] == first[1][k] for k in METRICS)
    assert runs["plain"][1][0].keys().isdisjoint(METRICS)


def test_coef_zero_is_plain_grpo(runs):
    plain, zero = runs["plain"], runs["zero"]
    assert plain[0].keys() == zero[0].keys()
    for name, value in plain[0].items():
        assert torch.equal(value, zero[0][name]), name
    assert len(plain[1]) == len(zero[1]) == 2

    def logged(log):  # every logged value but the wall-clock time and our metrics
        return {k: v for k, v in log.items() if k != "step_time" and "hidden_align" not in k}

    for a, b in zip(plain[1], zero[1]):
        assert logged(a) == logged(b)


def test_alignment_term_changes_training(runs):
    zero, align = runs["zero"], runs["align"]
    moved = [name for name, value in align[0].items() if not torch.equal(value, zero[0][name])]
    assert moved
    assert zero[1][0]["grad_norm"] != align[1][0]["grad_norm"]
    assert zero[1][0]["loss"] != align[1][0]["loss"]


def _grads(loss, params):
    # The reference forward serves two terms: keep its graph.
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def test_micro_batch_term_equals_ha_loss_on_separate_hidden_states(tokenizer, markers, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(
            HiddenAlignGRPOTrainer,
            tokenizer,
            tmp_path,
            align_coef=COEF,
            align_markers=markers,
            align_reward="correct",
            align_scope="micro_batch",
        )
    model = trainer.model
    model.train()
    # As in training (GRPOConfig's default): the layer hook then sits inside the checkpoint.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # What the training loop sets before each step; TRL's loss and ours divide by it.
    trainer.current_gradient_accumulation_steps = 2
    batch = next(iter(trainer.get_train_dataloader()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scored = trainer._generate_and_score_completions(batch)
    # Shuffled as TRL shuffles before its micro-batches: groups are no longer contiguous.
    order = torch.randperm(len(scored["prompt_ids"]))
    inputs = {
        k: v[order] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in scored.items()
    }

    # Rewards and groups from the tokens, independently of the trainer's bookkeeping.
    label, rewards = _labels_and_rewards(tokenizer, inputs)
    assert sorted(torch.bincount(label).tolist())[-2:] == [GROUP, GROUP]
    assert torch.equal(rewards, inputs["hidden_align_reward"])

    params = [p for p in model.parameters() if p.requires_grad]
    trainer.align_coef = 0.0
    base = trainer.compute_loss(model, inputs)
    base_grads = _grads(base, params)
    hidden, anchors = _separate_forward(model, markers, inputs)
    for layer, index in ((None, -1), (0, 1)):
        trainer.align_coef, trainer.align_layer = COEF, layer
        total = trainer.compute_loss(model, inputs)
        expected, stats = ha.loss(
            hidden[index], anchors, rewards, group_ids=label, return_stats=True
        )
        assert int(stats["valid_groups"]) >= 1
        term = COEF * expected / 2
        torch.testing.assert_close(total - base, term, rtol=1e-5, atol=1e-6)
        term_grads = _grads(term, params)
        assert any(g is not None and g.abs().max() > 0 for g in term_grads)
        for got, ref, zero in zip(_grads(total, params), term_grads, base_grads):
            if ref is None:  # the LM head: the term does not reach it
                torch.testing.assert_close(got, zero, rtol=0, atol=0)
            else:
                torch.testing.assert_close(got - zero, ref, rtol=1e-4, atol=1e-6)


def _labels_and_rewards(tokenizer, inputs):
    """Each row's prompt index and reward, read from its tokens."""
    prompts = tokenizer.batch_decode(inputs["prompt_ids"], skip_special_tokens=True)
    label = torch.tensor([PROMPTS.index(p) for p in prompts])
    completions = tokenizer.batch_decode(inputs["completion_ids"], skip_special_tokens=True)
    return label, torch.tensor(correct(completions, [ANSWERS[i] for i in label]))


def _separate_forward(model, markers, rows):
    """``(hidden states of every layer, anchors)`` of a batch's rows, from a forward of the
    model with ``output_hidden_states=True`` and anchors found here."""
    token_ids = torch.cat([rows["prompt_ids"], rows["completion_ids"]], 1)
    attention = torch.cat([rows["prompt_mask"], rows["completion_mask"]], 1)
    in_completion = torch.cat([torch.zeros_like(rows["prompt_mask"]), rows["completion_mask"]], 1)
    anchors = ha.find_anchors(token_ids, in_completion, markers)
    out = model(
        input_ids=token_ids, attention_mask=attention, output_hidden_states=True, use_cache=False
    )
    return out.hidden_states, anchors


# (gradient_accumulation_steps, steps_per_generation, where the statistics come from, variant).
# Variants: "sharded", the model counts as sharded (a pass of our own then runs TRL's whole
# forward, LM head included, instead of the backbone alone); "lora", a LoRA adapter with a KL
# term (beta > 0), whose reference log-probs TRL computes with the adapter off, in a no-grad
# pass of the same model right after the one the statistics come from.
MICRO_STEP_CASES = [
    (1, 1, "forward", ""),
    (2, 2, "own_pass", ""),
    (2, 2, "own_pass", "sharded"),
    (2, 4, "trl_pass", ""),
    (1, 2, "trl_pass", ""),
    (2, 4, "trl_pass", "lora"),
]


def _lora() -> dict:
    peft = pytest.importorskip("peft", reason="peft is not installed: pip install peft")
    # Random adapter weights (not the zero-initialised B): the adapter changes the states.
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return {"peft_config": lora, "config": {"beta": 0.1}}


@pytest.mark.parametrize(("accumulation", "per_generation", "source", "variant"), MICRO_STEP_CASES)
def test_micro_steps_add_up_to_the_generation_batch_loss(
    tokenizer, markers, tmp_path, monkeypatch, accumulation, per_generation, source, variant
):
    """Through TRL's own ``_prepare_inputs`` (generate, shuffle, split into micro-steps): the
    term's gradient, accumulated over the micro-steps of one generation batch, is
    ``align_coef x steps_per_generation / gradient_accumulation_steps x`` the gradient of
    ``hidden_align.loss`` over the whole generation batch (``align_coef x`` that gradient per
    optimiser step), with hidden states, anchors, rewards and groups computed here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(
            HiddenAlignGRPOTrainer,
            tokenizer,
            tmp_path,
            accumulation=accumulation,
            per_generation=per_generation,
            align_coef=COEF,
            align_markers=markers,
            align_reward="correct",
            **(_lora() if variant == "lora" else {}),
        )
    if source != "own_pass":  # the statistics must then cost no forward of their own
        monkeypatch.setattr(trainer, "_align_own_pass", None)
    # Read only by the statistics pass once the trainer is built (FSDP would set it).
    sharded = variant == "sharded"
    monkeypatch.setattr(trainer, "is_fsdp_enabled", sharded)
    model = trainer.model
    no_grad_passes = []  # TRL's no-grad forwards (LM head included): its own, or ours
    trl_forward = GRPOTrainer._get_per_token_logps_and_entropies

    def counted(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            no_grad_passes.append(1)
        return trl_forward(self, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", counted)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer.current_gradient_accumulation_steps = accumulation
    params = [p for p in model.parameters() if p.requires_grad]
    term = [torch.zeros_like(p) for p in params]
    value = torch.zeros(())
    generation = next(iter(trainer.get_train_dataloader()))
    for step in range(per_generation):
        trainer._step = step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inputs = trainer._prepare_inputs(generation)
        trainer.align_coef = 0.0
        base = trainer.compute_loss(model, inputs)
        trainer.align_coef = COEF
        total = trainer.compute_loss(model, inputs)
        value += (total - base).detach()
        for acc, got, zero in zip(term, _grads(total, params), _grads(base, params)):
            if got is not None:
                acc += got - zero
    assert trainer.align_statistics_source == source
    assert bool(no_grad_passes) == (source == "trl_pass" or sharded)

    # The whole generation batch, in one forward: the buffered micro-steps hold all its rows.
    rows = {
        key: torch.cat([batch[key] for batch in trainer._buffered_inputs])
        for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
    }
    label, rewards = _labels_and_rewards(tokenizer, rows)
    assert len(label) == 8 * per_generation
    hidden, anchors = _separate_forward(model, markers, rows)
    full, stats = ha.loss(hidden[-1], anchors, rewards, group_ids=label, return_stats=True)
    assert int(stats["valid_groups"]) >= 2
    factor = COEF * per_generation / accumulation
    torch.testing.assert_close(value, factor * full.detach(), rtol=1e-5, atol=1e-6)
    expected = _grads(factor * full, params)
    assert any(g is not None and g.abs().max() > 0 for g in expected)
    worst = max((g - (0 if r is None else r)).abs().max().item() for g, r in zip(term, expected))
    scale = max(r.abs().max().item() for r in expected if r is not None)
    case = f"{source} {variant}".strip()
    print(f"[{case}] largest gradient difference {worst:.1e} (largest element {scale:.1e})")
    for got, ref in zip(term, expected):
        torch.testing.assert_close(
            got, torch.zeros_like(got) if ref is None else ref, rtol=1e-4, atol=1e-6
        )


def test_evaluation_batch_is_its_own_generation_batch(tokenizer, markers, tmp_path):
    """In evaluation TRL generates per batch and does not accumulate: the term is
    ``align_coef x`` the batch's loss, its statistics taken from the loss's own forward."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(
            HiddenAlignGRPOTrainer,
            tokenizer,
            tmp_path,
            align_coef=COEF,
            align_markers=markers,
            align_reward="correct",
        )
        model = trainer.model
        model.eval()
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    params = [p for p in model.parameters() if p.requires_grad]
    trainer.align_coef = 0.0
    base = trainer.compute_loss(model, inputs)
    trainer.align_coef = COEF
    total = trainer.compute_loss(model, inputs)
    assert trainer.align_statistics_source is None  # what training uses is kept
    label, rewards = _labels_and_rewards(tokenizer, inputs)
    hidden, anchors = _separate_forward(model, markers, inputs)
    full = ha.loss(hidden[-1], anchors, rewards, group_ids=label)
    torch.testing.assert_close(total - base, COEF * full, rtol=1e-5, atol=1e-6)
    for got, zero, ref in zip(
        _grads(total, params), _grads(base, params), _grads(COEF * full, params)
    ):
        if ref is not None:
            torch.testing.assert_close(got - zero, ref, rtol=1e-4, atol=1e-6)


def test_markers_in_tool_output_are_not_anchors(tokenizer, markers, tmp_path):
    """TRL marks tool results and environment output with tool_mask 0 and leaves them out of
    its loss: a marker a tool printed there must not become the anchor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(HiddenAlignGRPOTrainer, tokenizer, tmp_path, align_markers=markers)
        batch = next(iter(trainer.get_train_dataloader()))
        inputs = dict(trainer._generate_and_score_completions(batch))
    completion_ids = inputs["completion_ids"].clone()
    completion_mask = inputs["completion_mask"].clone()
    # A tool's output closes every completion and prints a marker token three times.
    completion_ids[:, -3:] = markers[0][0]
    completion_mask[:, -3:] = 1
    tool_mask = torch.ones_like(completion_mask)
    tool_mask[:, -3:] = 0
    inputs.update(completion_ids=completion_ids, completion_mask=completion_mask)
    batch_size, width = completion_ids.shape
    total = inputs["prompt_ids"].shape[1] + width
    hidden = torch.randn(batch_size, total, 8)

    _, plain = trainer.compute_align_loss(inputs, hidden)
    assert (plain["anchors"] == total - 2).all()  # the tool's last marker
    inputs["tool_mask"] = tool_mask
    _, tooled = trainer.compute_align_loss(inputs, hidden)
    assert (tooled["anchors"] <= total - 5).all()  # before the tool's output, or none
    model_text = torch.cat(
        [torch.zeros_like(inputs["prompt_mask"]), completion_mask * tool_mask], 1
    )
    token_ids = torch.cat([inputs["prompt_ids"], completion_ids], 1)
    assert torch.equal(tooled["anchors"], ha.find_anchors(token_ids, model_text, markers))


def test_arguments_are_checked(tokenizer, markers, tmp_path):
    with pytest.raises(ha.ArgumentError, match="align_markers: required"):
        HiddenAlignGRPOTrainer(model=None, reward_funcs=[correct])
    with pytest.raises(ha.ArgumentError, match="align_coef"):
        HiddenAlignGRPOTrainer(
            model=None, reward_funcs=[correct], align_coef=-1, align_markers=markers
        )
    with pytest.raises(ha.ArgumentError, match="align_loss_type"):
        HiddenAlignGRPOTrainer(
            model=None, reward_funcs=[correct], align_markers=markers, align_loss_type="l2"
        )
    with pytest.raises(ha.ArgumentError, match="align_scope"):
        HiddenAlignGRPOTrainer(
            model=None, reward_funcs=[correct], align_markers=markers, align_scope="rollout"
        )
    with pytest.raises(ha.ArgumentError, match="contrastive.*align_scope='micro_batch'"):
        HiddenAlignGRPOTrainer(
            model=None, reward_funcs=[correct], align_markers=markers, align_loss_type="contrastive"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            ha.ArgumentError, match=r"'accuracy' is not one of .*\['brevity', 'correct'\]"
        ):
            make_trainer(
                HiddenAlignGRPOTrainer,
                tokenizer,
                tmp_path,
                align_markers=markers,
                align_reward="accuracy",
            )
        with pytest.raises(ha.ArgumentError, match="align_layer: expected an index"):
            make_trainer(
                HiddenAlignGRPOTrainer, tokenizer, tmp_path, align_markers=markers, align_layer=2
            )
        with pytest.raises(ha.ArgumentError, match="align_markers: markers\\[0\\]"):
            make_trainer(HiddenAlignGRPOTrainer, tokenizer, tmp_path, align_markers=[5, 7])
        trainer = make_trainer(
            HiddenAlignGRPOTrainer,
            tokenizer,
            tmp_path,
            align_markers=["Answer:", [5, 7]],
            align_layer=-1,
        )
    assert trainer.align_reward == "brevity"  # the first, by default
    text, ids = trainer.align_markers  # strings as text, id lists as given
    assert isinstance(text, ha.TextMarkers) and text.strings == ("Answer:",) and ids == [5, 7]
