"""The alignment term inside OpenRLHF's own classes (0.11.1 or 0.11.2, whichever is installed),
on the CPU, through the patches :mod:`hidden_align.integrations.openrlhf.worker` applies.

One rollout batch goes through OpenRLHF's real pipeline: ``RemoteExperienceMaker`` (index,
micro-batches, the actor group's ``forward`` dispatch through ``RayActorGroup`` onto a
``PolicyModelActor`` rank, group advantages), ``append`` into the rank's ``NaiveReplayBuffer``,
and ``PolicyModelActor.fit`` -> ``ActorPPOTrainer.ppo_train`` (the replay buffer's shuffled
micro-batches, OpenRLHF's normalisers, ``training_step``) on OpenRLHF's ``Actor`` around a small
Qwen2, padded and packed. What needs a GPU or a cluster is replaced: flash-attn, DeepSpeed and
vLLM at import (``openrlhf_support``), ``ray.put``/``ray.get`` by the identity (the "remote"
rank runs in this process), ``torch.cuda`` device calls, and DeepSpeed's engine by
:class:`CPUStrategy`, which does what DeepSpeed does with a backward (divide by the
gradient-accumulation steps, step at their boundary). ``torch.distributed`` is real: a gloo
group of one process.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import types
from pathlib import Path

import openrlhf_support
import pytest
import torch
import torch.nn.functional as F
from openrlhf_support import load_openrlhf

import hidden_align as ha
from hidden_align.integrations.openrlhf import trainer as ha_trainer
from hidden_align.integrations.openrlhf import worker
from hidden_align.integrations.openrlhf.settings import Settings
from hidden_align.integrations.openrlhf.train_ppo_ray import runtime_env

TESTS = Path(__file__).resolve().parent

MODULES = (
    "openrlhf.models",
    "openrlhf.trainer.ppo_utils.experience",
    "openrlhf.trainer.ppo_utils.experience_maker",
    "openrlhf.trainer.ray.launcher",
    "openrlhf.trainer.ray.ppo_actor",
)

MARKER = [5, 6]  # "Answer:" in a tokenizer of its own
PROMPTS = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
N = 4  # rollouts per prompt
COEF = 0.25
DYNAMIC_TOKENS = 30  # dynamic batching's token budget per micro-batch: four or five of them


def _namespace(m: dict, version: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        version=version,
        Actor=m["openrlhf.models"].Actor,
        Experience=m["openrlhf.trainer.ppo_utils.experience"].Experience,
        experience=m["openrlhf.trainer.ppo_utils.experience"],
        maker=m["openrlhf.trainer.ppo_utils.experience_maker"],
        launcher=m["openrlhf.trainer.ray.launcher"],
        ppo_actor=m["openrlhf.trainer.ray.ppo_actor"],
    )


@pytest.fixture(scope="module")
def orl():
    loaded = load_openrlhf(*MODULES)
    return _namespace(loaded.modules, loaded.version)


@pytest.fixture
def patched(orl):
    """The patches applied (as a Ray worker's setup hook applies them), removed afterwards."""
    worker.setup()
    yield
    worker.restore()


@pytest.fixture
def process_group(tmp_path):
    """A gloo group of this one process (OpenRLHF's trainer calls barrier and all_reduce)."""
    dist = torch.distributed
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def cpu_only(monkeypatch):
    cpu_stand_ins(monkeypatch.setattr)


def cpu_stand_ins(setattr_) -> None:
    """OpenRLHF's CUDA calls on a CPU machine (``current_device()`` gives the CPU; see
    :func:`replay_buffer_device`), and Ray's object store as the identity: the ranks run in
    this process."""
    setattr_(torch.cuda, "current_device", lambda: "cpu")
    setattr_(torch.cuda, "synchronize", lambda *a, **k: None)
    setattr_(torch.cuda, "empty_cache", lambda: None)
    import ray

    setattr_(ray, "put", lambda value: value)
    setattr_(ray, "get", lambda refs, **kwargs: refs)


class CPUStrategy:
    """What OpenRLHF's trainer asks of its ``DeepspeedStrategy``, done as DeepSpeed does it:
    each backward divided by the accumulation steps, the optimizer stepped at every
    ``accumulated_gradient``-th micro-batch (the gradient of that step recorded first)."""

    ring_attn_group = None

    def __init__(self, args, accumulated_gradient: int, world: int = 1) -> None:
        self.args = args
        self.accumulated_gradient = accumulated_gradient
        self.world = world
        self.micro_steps = 0
        self.step_gradients = []

    def backward(self, loss, model, optimizer, **kwargs):
        (loss / self.accumulated_gradient).backward()

    def optimizer_step(self, optimizer, model, scheduler, name="model", **kwargs):
        self.micro_steps += 1
        if self.micro_steps % self.accumulated_gradient == 0:
            grads = {n: p.grad for n, p in model.model.named_parameters() if p.grad is not None}
            for g in grads.values():  # DeepSpeed averages the gradients over the ranks
                torch.distributed.all_reduce(g)
                g /= self.world
            self.step_gradients.append({n: g.clone() for n, g in grads.items()})
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()

    def get_grad_norm(self, model):
        return 0.0

    def all_reduce(self, data, op="mean"):
        if isinstance(data, dict):
            return {k: self.all_reduce(v, op) for k, v in data.items()}
        dist = torch.distributed
        reduce = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        if isinstance(data, torch.Tensor):
            out = data.clone()
            dist.all_reduce(out, op=reduce)
            return out / self.world if op == "mean" else out
        value = torch.tensor(float(data), dtype=torch.float64)
        dist.all_reduce(value, op=reduce)
        return value.item() / (self.world if op == "mean" else 1)

    def is_rank_0(self):
        return True

    def print(self, *args):
        pass


@contextlib.contextmanager
def replay_buffer_device():
    """``NaiveReplayBuffer`` names its ``cuda:<index>`` device when it is built (it moves
    nothing there on this path): an index for the trainer's constructor only."""
    current = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0
    try:
        yield
    finally:
        torch.cuda.current_device = current


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
    model = transformers.Qwen2ForCausalLM(config)
    model.config.use_cache = False  # as OpenRLHF's Actor sets it
    return model


def make_args(packing: bool, micro_train: int):
    ns = types.SimpleNamespace
    advantage = ns(
        estimator="group_norm",
        gamma=1.0,
        lambd=1.0,
        no_std_norm=False,
        # 0.11.1's correction options, then 0.11.2's
        is_correction_enable=False,
        is_correction_threshold=[0.5, 5.0],
        is_correction_type="tis",
        is_correction_level="off",
        is_correction_mode="mask",
        is_correction_gating="ratio",
    )
    return ns(
        actor=ns(
            eps_clip_low_high=(0.2, 0.28),
            dual_clip=None,
            policy_loss_type="ppo",
            aux_loss_coef=0.0,
            entropy_coef=None,
            loss_agg_mode="token-mean",
            num_nodes=1,
            num_gpus_per_node=1,
        ),
        algo=ns(
            advantage=advantage,
            kl=ns(use_loss=False, init_coef=0.0, estimator="k1", unbiased_gradient=False),
        ),
        ds=ns(packing_samples=packing, ring_attn_size=1, tensor_parallel_size=1),
        train=ns(
            dynamic_batch_enable=False,
            max_epochs=1,
            colocate_all=False,
            colocate_actor_ref=False,
            async_enable=False,
            micro_batch_size=micro_train,
        ),
        vllm=ns(sync_backend="gloo"),
        rollout=ns(
            batch_size=len(PROMPTS), n_samples_per_prompt=N, micro_batch_size=5, max_new_tokens=None
        ),
        reward=ns(clip_range=None),
        data=ns(max_len=64),
    )


def rollout_samples(Experience):
    """Three prompts x four rollouts, one ``Experience`` each, as OpenRLHF's sample generator
    makes them (``sequences [1, S]``, ``action_mask [1, S - 1]`` over the shifted tokens, the
    reward function's reward and score). Every group has correct and incorrect rollouts, and
    one rollout without the marker."""
    g = torch.Generator().manual_seed(1)
    samples = []
    for p, prompt in enumerate(PROMPTS):
        for r in range(N):
            body = torch.randint(20, 40, (3 + (r + p) % 3,), generator=g).tolist()
            answer = MARKER + [30 + r % 2] if r != 3 else []
            tokens = torch.tensor(prompt + body + answer + [2])
            action = torch.zeros_like(tokens)
            action[len(prompt) :] = 1
            score = torch.tensor([float(r != 1)])
            samples.append(
                Experience(
                    sequences=tokens[None],
                    attention_mask=torch.ones_like(tokens)[None],
                    action_mask=action[None, 1:],
                    prompts=[f"prompt {p}"],
                    labels=[f"label {p}"],
                    rewards=score.clone(),
                    scores=score.clone(),
                    response_length=action.sum()[None],
                    truncated=torch.tensor([False]),
                    total_length=torch.tensor([float(len(tokens))]),
                    info={"reward": score.clone(), "score": score.clone()},
                )
            )
    return samples


def actor_group(orl, model_actor, rank=0, world=1):
    """OpenRLHF's ``RayActorGroup`` over ``world`` ranks, of which ``rank`` runs in this
    process: its own ``async_run_method_batch`` chunks the micro-batches and dispatches each
    chunk to its rank's ``execute_batch``. The other ranks' chunks are theirs (their own
    process runs them); here they get placeholder log-probs and are never trained on."""

    def elsewhere(method_name, data, start, end):
        if method_name == "forward":
            return [torch.zeros(m.shape) for m in data["action_mask"][start:end]]
        return [None] * (end - start)

    def handle(call):
        return types.SimpleNamespace(execute_batch=types.SimpleNamespace(remote=call))

    group = object.__new__(orl.launcher.RayActorGroup)
    group._actor_handlers = [
        handle(model_actor.execute_batch if r == rank else elsewhere) for r in range(world)
    ]
    group.duplicate_actors = 1
    return group


def run_one_batch(
    orl,
    *,
    packing=False,
    micro_train=3,
    lr=0.0,
    rank=0,
    world=1,
    rollout_micro=5,
    edit=None,
    dynamic=False,
):
    """One rollout batch through OpenRLHF: experience maker, replay buffer, ``fit`` (data-
    parallel rank ``rank`` of ``world``, one optimizer step). Returns the strategy (its
    recorded step gradient), the status, the model and the experiences.

    ``dynamic``: OpenRLHF's dynamic batching (packed rows, micro-batches of at most
    ``DYNAMIC_TOKENS`` tokens balanced by length; DeepSpeed then accumulates over one
    micro-batch and OpenRLHF steps at the end of each training batch)."""
    args = make_args(packing or dynamic, micro_train)
    args.rollout.micro_batch_size = rollout_micro
    rows = len(PROMPTS) * N
    if dynamic:
        args.train.dynamic_batch_enable = True
        args.train.batch_size = rows  # one optimizer step
        args.train.max_tokens_per_gpu = args.rollout.max_tokens_per_gpu = DYNAMIC_TOKENS
        strategy = CPUStrategy(args, 1, world)
        mesh = types.SimpleNamespace(get_group=lambda: None)  # the default group
        strategy.ds_device_mesh = {"dp": mesh}
    else:
        strategy = CPUStrategy(args, rows // world // micro_train, world)
    model = tiny_qwen2()
    actor = orl.Actor(model)
    actor.packing_samples = packing  # set by Actor only when it loads a model by name
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    with replay_buffer_device():
        trainer = orl.ppo_actor.ActorPPOTrainer(
            strategy,
            actor,
            None,
            optimizer,
            scheduler,
            micro_train_batch_size=micro_train,
            tokenizer=None,
        )
    model_actor = object.__new__(orl.ppo_actor.PolicyModelActor.__ray_actor_class__)
    model_actor.actor, model_actor.trainer, model_actor.strategy = actor, trainer, strategy
    group = actor_group(orl, model_actor, rank, world)
    kl_ctl = types.SimpleNamespace(value=0.0)
    maker = orl.maker.RemoteExperienceMaker(
        group, None, None, None, kl_ctl, strategy, types.SimpleNamespace(pad_token_id=0)
    )
    samples = rollout_samples(orl.Experience)
    if edit is not None:
        edit(args, samples)
    experiences = maker.make_experience_batch(samples)
    if dynamic:  # as OpenRLHF's trainer does before append
        experiences = orl.experience.balance_experiences(experiences, args)
    group.async_run_method_batch(method_name="append", experience=experiences)
    torch.manual_seed(3)  # the replay buffer's shuffle
    status = model_actor.fit(kl_ctl=0.0)
    return types.SimpleNamespace(
        strategy=strategy, status=status, model=model, trainer=trainer, experiences=experiences
    )


def full_batch_alignment(model):
    """``ha.loss`` over the whole rollout batch from the model's last hidden state, padded, and
    its gradient: what the shares of all micro-batches must add up to."""
    rows = rollout_samples(lambda **kw: types.SimpleNamespace(**kw))
    width = max(r.sequences.shape[1] for r in rows)
    seq = torch.stack([F.pad(r.sequences[0], (0, width - r.sequences.shape[1])) for r in rows])
    att = torch.stack([F.pad(r.attention_mask[0], (0, width - r.sequences.shape[1])) for r in rows])
    act = torch.stack([F.pad(r.action_mask[0], (0, width - r.sequences.shape[1])) for r in rows])
    in_response = F.pad(act.bool(), (1, 0))
    anchors = ha.find_anchors(seq, in_response, [MARKER])
    position_ids = (att.cumsum(-1) - 1).clamp(min=0)
    hidden = model.get_decoder()(seq, attention_mask=att, position_ids=position_ids)[0]
    scores = torch.cat([r.scores for r in rows])
    groups = torch.arange(len(rows)) // N
    loss = ha.loss(hidden, anchors, scores, group_ids=groups)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return loss.detach(), {n: g for n, g in zip(params, grads) if g is not None}, anchors


def _env(monkeypatch, coef, **extra):
    settings = Settings(coef=coef, markers=(tuple(MARKER),), **extra)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("layout", ["padded", "packed", "dynamic"])
def test_gradient_is_policy_plus_full_batch_alignment(
    orl, patched, process_group, cpu_only, monkeypatch, layout
):
    """Micro-batches of 3 rows that split every group (shuffled by OpenRLHF's replay buffer;
    or OpenRLHF's dynamic batching, by length), one optimizer step: the accumulated gradient
    equals the policy loss's plus ``coef`` x the full-batch ``ha.loss``'s."""
    options = {"packing": layout == "packed", "dynamic": layout == "dynamic"}
    _env(monkeypatch, COEF)
    with_term = run_one_batch(orl, **options)
    _env(monkeypatch, 0.0)
    without = run_one_batch(orl, **options)
    if layout == "dynamic":
        assert len(with_term.trainer.replay_buffer.dynamic_indices) >= 3
    (grad_with,), (grad_without,) = (
        with_term.strategy.step_gradients,
        without.strategy.step_gradients,
    )
    align, grad_align, anchors = full_batch_alignment(tiny_qwen2())
    assert (anchors >= 0).sum() == 9 and align > 0
    assert set(grad_with) == set(grad_without)
    checked = 0
    for name, g in grad_with.items():
        expected = grad_without[name] + COEF * grad_align.get(name, torch.zeros_like(g))
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6, msg=name)
        if name in grad_align and grad_align[name].abs().max() > 1e-4:
            checked += 1
    assert checked >= 10  # the term's gradient is not lost in the tolerance
    status = with_term.status
    torch.testing.assert_close(status[ha_trainer.METRIC_LOSS], align.item(), rtol=1e-4, atol=0)
    assert status[ha_trainer.METRIC_GROUPS] == 3
    assert -1.0 <= status[ha_trainer.METRIC_COSINE] <= 1.0
    assert not any(k.startswith("hidden_align") for k in without.status)
    assert ha_trainer.GROUP_KEY not in status and ha_trainer.SCORE_KEY not in status


def test_micro_batches_split_every_group(orl, patched, process_group, cpu_only, monkeypatch):
    """The case above is the hard one: no micro-batch holds a whole group."""
    _env(monkeypatch, COEF)
    seen = []
    original = orl.ppo_actor.ActorPPOTrainer.training_step

    def spy(self, experience, *args, **kwargs):
        seen.append(ha_trainer._as_tensor(experience.info[ha_trainer.GROUP_KEY]).tolist())
        return original(self, experience, *args, **kwargs)

    monkeypatch.setattr(orl.ppo_actor.ActorPPOTrainer, "training_step", spy)
    run_one_batch(orl)
    assert len(seen) == 4
    for group in range(len(PROMPTS)):
        assert sum(group in batch for batch in seen) >= 2


def test_coefficient_zero_equals_plain_openrlhf(orl, process_group, cpu_only, monkeypatch):
    """With ``coef`` 0 every parameter after one step equals plain OpenRLHF's (its own
    ``PolicyLoss``, unpatched classes), to float32 rounding: the fused loss replaces
    OpenRLHF's, and nothing of the term runs."""
    plain = run_one_batch(orl, lr=1.0)
    worker.setup()
    try:
        _env(monkeypatch, 0.0)
        ours = run_one_batch(orl, lr=1.0)
    finally:
        worker.restore()
    assert type(ours.trainer.actor_loss_fn).__module__.startswith("hidden_align")
    assert not type(plain.trainer.actor_loss_fn).__module__.startswith("hidden_align")
    assert ha_trainer.state_of(ours.trainer) is None
    assert not any(m._forward_hooks for m in ours.model.modules())
    changed = 0
    for (name, p), q in zip(plain.model.named_parameters(), ours.model.parameters()):
        torch.testing.assert_close(q, p, msg=name)
        changed += int(not torch.equal(p, tiny_qwen2().get_parameter(name)))
    assert changed > 10  # the step moved the parameters
    torch.testing.assert_close(ours.status["policy_loss"], plain.status["policy_loss"])


def test_micro_batch_scope(orl, patched, process_group, cpu_only, monkeypatch):
    """``--align.scope micro_batch``: each micro-batch's own groups, no statistics pass."""
    _env(monkeypatch, COEF, scope="micro_batch")
    run = run_one_batch(orl)
    assert ha_trainer.state_of(run.trainer).parts == []
    assert ha_trainer.METRIC_LOSS in run.status
    assert ha_trainer.METRIC_COSINE not in run.status


def test_correctness_is_read_before_length_penalties(
    orl, patched, process_group, cpu_only, monkeypatch
):
    """OpenRLHF's length penalties change ``rewards`` in place after the experience maker's
    forward: with ``--align.correct rewards`` the update still reads the rewards the
    statistics were made from (here equal to the scores), so the gradient is the one read
    from ``scores``."""

    def truncate_first_rollouts(args, samples):
        args.reward.stop_properly_penalty_coef = 0.0  # truncated rewards become 0
        for s in samples[::N]:
            s.truncated = torch.tensor([True])

    runs = {}
    for field in ("rewards", "scores"):
        _env(monkeypatch, COEF, correct=field)
        runs[field] = run_one_batch(orl, edit=truncate_first_rollouts)
    penalised = torch.cat([e.rewards for e in runs["rewards"].experiences])
    assert (penalised == 0).sum() > (torch.arange(len(PROMPTS) * N) % N == 1).sum()
    (a,), (b,) = runs["rewards"].strategy.step_gradients, runs["scores"].strategy.step_gradients
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_groups_numbered_on_over_rollout_batches(orl):
    """An actor that skips ``fit`` keeps earlier rollout batches in its replay buffer: the
    groups of each batch are numbered after the previous ones'. One rollout per prompt is
    refused."""
    maker = types.SimpleNamespace(args=make_args(False, 3))

    def batch():
        samples = rollout_samples(orl.Experience)
        for i, sample in enumerate(samples):
            sample.index = [i]  # as split_rollout_samples sets it
        return samples

    first = ha_trainer._rollout_rows(maker, batch(), "scores")
    second = ha_trainer._rollout_rows(maker, batch(), "scores")
    assert torch.cat([r["group"] for r in first]).tolist() == [
        g for g in range(3) for _ in range(N)
    ]
    assert torch.cat([r["group"] for r in second]).unique().tolist() == [3, 4, 5]
    maker.args.rollout.n_samples_per_prompt = 1
    with pytest.raises(RuntimeError, match="n_samples_per_prompt is 1"):
        ha_trainer._rollout_rows(maker, batch(), "scores")


def test_scores_are_required(orl, patched, process_group, cpu_only, monkeypatch):
    """Rollouts without the configured score field (a reward model scores them later) are
    refused in the experience maker, naming the remedy."""
    _env(monkeypatch, COEF, correct="rewards")
    samples = rollout_samples(orl.Experience)
    for s in samples:
        s.rewards = None
    maker = orl.maker.RemoteExperienceMaker(
        None,
        None,
        None,
        None,
        None,
        CPUStrategy(make_args(False, 3), 1),
        types.SimpleNamespace(pad_token_id=0),
    )
    with pytest.raises(RuntimeError, match="reward function"):
        maker.make_experience(maker.split_rollout_samples(samples))


def test_training_step_without_experience_maker(orl, patched, process_group, cpu_only, monkeypatch):
    """Rows that did not come through the patched experience maker: a clear error at
    ``fit``, raised after the ranks agreed (here: one)."""
    _env(monkeypatch, COEF)
    args = make_args(False, 3)
    strategy = CPUStrategy(args, 4)
    actor = orl.Actor(tiny_qwen2())
    optimizer = torch.optim.SGD(actor.model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    with replay_buffer_device():
        trainer = orl.ppo_actor.ActorPPOTrainer(strategy, actor, None, optimizer, scheduler, 3)
    batch = orl.Experience.concat_experiences(rollout_samples(orl.Experience), 0)
    batch.action_log_probs = torch.zeros(batch.action_mask.shape)
    batch.advantages = torch.zeros(batch.action_mask.shape)
    trainer.replay_buffer.append(batch)
    with pytest.raises(RuntimeError, match="received no micro-batch"):
        trainer.ppo_train(0.0)


# ---- the launcher and the Ray workers --------------------------------------------------------


def _python(code: str, env: dict | None = None, args=()) -> subprocess.CompletedProcess:
    """A fresh interpreter with the GPU-only modules stubbed, as a CPU machine needs."""
    prelude = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import openrlhf_support; "
    prelude += "openrlhf_support.install_stubs()\n"
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
    )


LAUNCH = """
    from hidden_align.integrations.openrlhf.train_ppo_ray import main
    main()
"""


def test_launcher_help_shows_both(orl):
    out = _python(LAUNCH, args=["--help"])
    assert out.returncode == 0, out.stderr
    assert "--align.coef" in out.stdout and "--align.markers" in out.stdout
    # OpenRLHF's own parser printed its options after ours.
    assert (
        "--actor.num_gpus_per_node" in out.stdout and "--rollout.n_samples_per_prompt" in out.stdout
    )


def test_launcher_passes_openrlhf_arguments_and_sets_up_ray(orl):
    """OpenRLHF's own parsing and checks run on its arguments (ours taken out), and the
    ``ray.init`` of its ``train`` gets the setup hook and the settings."""
    code = textwrap.dedent("""
        import json, ray
        def fake_init(*args, **kwargs):
            print("RUNTIME_ENV=" + json.dumps(kwargs["runtime_env"]))
            raise SystemExit(0)
        ray.is_initialized = lambda: False
        ray.init = fake_init
    """) + textwrap.dedent(LAUNCH)
    args = [
        "--actor.model_name_or_path", "Qwen/Qwen2.5-0.5B",
        "--actor.num_gpus_per_node", "1",
        "--align.coef", "0.05",
        "--align.markers", "Answer:", "[5, 6]",
        "--rollout.n_samples_per_prompt", "8",
        "--algo.advantage.estimator", "group_norm",
        "--reward.remote_url", "http://127.0.0.1:5000/get_reward",
        "--vllm.num_engines", "1",
    ]  # fmt: skip
    out = _python(code, args=args)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RUNTIME_ENV="))
    env = json.loads(line.split("=", 1)[1])
    assert env["worker_process_setup_hook"] == worker.SETUP_HOOK
    # OpenRLHF's own variables kept, ours added.
    assert "TOKENIZERS_PARALLELISM" in env["env_vars"]
    settings = Settings.from_env(env["env_vars"])
    assert settings.coef == 0.05 and settings.markers == ("Answer:", (5, 6))


def test_launcher_refuses_bad_settings(orl):
    out = _python(LAUNCH, args=["--align.loss_type", "contrastive"])
    assert out.returncode == 2
    assert "HIDDEN_ALIGN_LOSS_TYPE" in out.stderr and "contrastive" in out.stderr


WORKER = """
    import os
    from ray._private.runtime_env.setup_hook import load_and_execute_setup_hook
    # What Ray's default_worker does at start when the job names a setup hook.
    assert load_and_execute_setup_hook(os.environ["HOOK"]) is None
    import importlib, json
    ppo_actor = importlib.import_module("openrlhf.trainer.ray.ppo_actor")
    maker = importlib.import_module("openrlhf.trainer.ppo_utils.experience_maker")
    launcher = importlib.import_module("openrlhf.trainer.ray.launcher")
    from hidden_align.integrations.openrlhf import trainer
    loss = ppo_actor.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28)
    print(json.dumps({
        "loss": type(loss).__module__ + "." + type(loss).__name__,
        "gspo": type(ppo_actor.PolicyLoss(policy_loss_type="gspo")).__module__,
        "training_step": ppo_actor.ActorPPOTrainer.training_step is trainer._training_step,
        "ppo_train": ppo_actor.ActorPPOTrainer.ppo_train is trainer._ppo_train,
        "execute_batch": launcher.BaseModelActor.execute_batch is trainer._execute_batch,
        "make_experience":
            maker.RemoteExperienceMaker.make_experience is trainer._make_experience,
        "coef": trainer.settings().coef,
    }))
"""


def test_ray_worker_setup_hook_patches_on_import(orl, monkeypatch):
    """A fresh process that starts as a Ray worker of the launcher's job does (the job's
    environment variables, Ray's own setup-hook loader), then imports OpenRLHF as its actors
    do: the classes it uses are patched."""
    monkeypatch.setenv("HIDDEN_ALIGN_ALLOW_UNTESTED_OPENRLHF", "1")
    env = runtime_env(Settings(coef=0.3, markers=(tuple(MARKER),)))
    assert env["env_vars"]["HIDDEN_ALIGN_ALLOW_UNTESTED_OPENRLHF"] == "1"
    variables = {**env["env_vars"], "HOOK": env["worker_process_setup_hook"]}
    out = _python(WORKER, env=variables)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result.pop("loss").startswith("hidden_align.integrations.openrlhf.policy_loss.")
    assert result.pop("gspo").startswith("openrlhf.")
    assert result.pop("coef") == 0.3
    assert all(result.values()), result


RAY_JOB = """
    import json, os, ray
    from hidden_align.integrations.openrlhf import train_ppo_ray
    from hidden_align.integrations.openrlhf.settings import Settings

    # What the launcher does before OpenRLHF's train() calls ray.init with its runtime_env.
    train_ppo_ray._wrap_ray_init(Settings(coef=0.3, markers=((5, 6),)))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "true"}},
    )

    def probe():
        import importlib, sys
        sys.path.insert(0, TESTS)
        import openrlhf_support
        openrlhf_support.install_stubs()  # this machine has no GPU stack
        ppo_actor = importlib.import_module("openrlhf.trainer.ray.ppo_actor")
        from hidden_align.integrations.openrlhf import trainer
        return {
            "pid": os.getpid(),
            "patched": ppo_actor.ActorPPOTrainer.training_step is trainer._training_step,
            "coef": trainer.settings().coef,
            "own_env": os.environ.get("OWN_ENV"),
        }

    @ray.remote(num_cpus=1)
    class Rank:  # an actor with a runtime_env of its own, as OpenRLHF gives its vLLM engines
        def probe(self):
            return probe()

    rank = Rank.options(runtime_env={"env_vars": {"OWN_ENV": "1"}}).remote()
    results = ray.get([rank.probe.remote(), ray.remote(probe).remote()])
    print("RESULTS=" + json.dumps(results + [{"driver": os.getpid()}]))
    ray.shutdown()
"""


def test_real_ray_workers_are_patched(orl):
    """A local Ray cluster started through the launcher's ``ray.init``: an actor with its own
    ``runtime_env`` and a task, each a fresh worker process, import OpenRLHF's trainer and get
    the patched classes and the settings."""
    pytest.importorskip("ray")
    code = f"TESTS = {str(TESTS)!r}\n" + textwrap.dedent(RAY_JOB)
    # Ray's socket paths must stay under 108 bytes: a short folder of its own.
    ray_dir = tempfile.mkdtemp(prefix="ha-ray-", dir="/tmp")
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={**os.environ, "RAY_TMPDIR": ray_dir, "RAY_AUTH_MODE": "disabled"},
            timeout=300,
        )
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULTS="))
    actor, task, driver = json.loads(line.split("=", 1)[1])
    for worker_result in (actor, task):
        assert worker_result["pid"] != driver["driver"]
        assert worker_result["patched"] and worker_result["coef"] == 0.3
    assert actor["own_env"] == "1"


# ---- two data-parallel ranks ---------------------------------------------------------------


def _rank_worker(rank: int, init: str, path: str) -> None:
    """One of two actor ranks (gloo): the experience maker's dispatch gives it half of the
    micro-batches; its gradient of the one optimizer step, averaged over the ranks, is saved."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        with openrlhf_support.stub_modules():
            orl = _namespace({name: importlib.import_module(name) for name in MODULES}, "?")
        os.environ.update(Settings(coef=COEF, markers=(tuple(MARKER),)).to_env())
        cpu_stand_ins(setattr)
        worker.setup()
        run = run_one_batch(orl, rank=rank, world=2, rollout_micro=3)
        (grads,) = run.strategy.step_gradients
        torch.save({"grads": grads, "status": run.status}, os.path.join(path, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_give_the_one_rank_gradient(
    orl, patched, process_group, cpu_only, monkeypatch, tmp_path
):
    """The rollout batch split over two gloo ranks by OpenRLHF's own dispatch (each rank's
    micro-batches split its groups further): the step's gradient, averaged over the ranks as
    DeepSpeed does, equals that of one rank holding the whole batch; the statistics are
    all-reduced, and ``dp_size`` and ``global_batch_size`` scale the term as the policy loss."""
    ctx = torch.multiprocessing.get_context("spawn")
    init = f"file://{tmp_path}/rendezvous"
    procs = [ctx.Process(target=_rank_worker, args=(r, init, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    _env(monkeypatch, COEF)
    one = run_one_batch(orl, rollout_micro=3)
    (expected,) = one.strategy.step_gradients
    for name, g in expected.items():
        for rank in ranks:
            torch.testing.assert_close(rank["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    for rank in ranks:
        torch.testing.assert_close(
            rank["status"][ha_trainer.METRIC_LOSS],
            one.status[ha_trainer.METRIC_LOSS],
            rtol=1e-4,
            atol=0,
        )


VERSION_PROBE = """
    import importlib.metadata, sys
    real = importlib.metadata.version
    importlib.metadata.version = lambda name: "0.10.0" if name == "openrlhf" else real(name)
    try:
        import hidden_align.integrations.openrlhf as integration
    except ImportError as exc:
        print("REFUSED", exc)
    else:
        print("LOADED", integration.PolicyLoss.OPENRLHF_VERSION)
"""


@pytest.mark.parametrize("allow", [None, "1"])
def test_untested_openrlhf_is_refused_at_import(allow):
    """An OpenRLHF other than 0.11.1 and 0.11.2: ``ImportError`` naming both and the override;
    with ``HIDDEN_ALIGN_ALLOW_UNTESTED_OPENRLHF=1`` a warning and 0.11.1's API (older)."""
    env = {k: v for k, v in os.environ.items() if k != "HIDDEN_ALIGN_ALLOW_UNTESTED_OPENRLHF"}
    if allow:
        env["HIDDEN_ALIGN_ALLOW_UNTESTED_OPENRLHF"] = allow
    out = subprocess.run(
        [sys.executable, "-W", "always", "-c", textwrap.dedent(VERSION_PROBE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    if allow:
        assert out.stdout.strip() == "LOADED 0.11.1"
        assert "OpenRLHF 0.10.0 is untested" in out.stderr
    else:
        assert out.stdout.startswith("REFUSED")
        for text in (
            "0.11.1 and 0.11.2",
            "OpenRLHF 0.10.0",
            "HIDDEN_ALIGN_ALLOW_UNTESTED_OPENRLHF",
        ):
            assert text in out.stdout
