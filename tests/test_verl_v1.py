"""``hidden_align.integrations.verl`` in verl 0.9.1's default trainer (V1), through TransferQueue,
on the CPU.

verl's V1 trainer (``trainer.use_v1``, the default of ``ppo_trainer.yaml``) keeps every rollout
in TransferQueue and hands its workers keys only: each registered worker method is wrapped by
``tqbridge``, which fetches every field of its rows into a TensorDict. There ``prompts``,
``responses``, ``response_mask`` and ``rm_scores`` are nested, ``uid`` is the prompt id, and the
reward manager's extra info (``acc``) stays inside each rollout's ``extra_fields`` dict.

What runs, in one spawned process that leads its own process group (killed, with Ray's
processes, when it overruns ``RUN_S``; Ray and TransferQueue are shut down in its ``finally``):

* Ray, and TransferQueue started as verl's ``TaskRunnerV1`` starts it,
  ``tq.init(config.transfer_queue)``, with verl's own ``ppo_trainer`` config composed by Hydra.
  TransferQueue's controller and each storage unit reserve one of Ray's CPUs: Ray is given
  ``num_cpus=8`` and TransferQueue ``STORAGE_UNITS`` units (verl's config asks for 8), or
  ``tq.init`` waits for CPUs a small machine does not have;
* rollouts written as ``AgentLoopWorkerTQ`` writes them: the prompts' status tags, then per
  session ``kv_batch_put`` of ``list_of_dict_to_tensordict`` over ``AgentLoopOutput.as_dict()``
  and the prompt's fields under ``{uid}_{session}_0``, with its tag. Rewards as verl's DAPO reward
  manager gives them for ``math_dapo`` (score +-1; ``reward_extra_info`` ``score``, ``acc``,
  ``pred`` and the overlong fields; the overlong penalty added to the reward only): one correct
  rollout is overlong, its ``rm_scores`` 0, incorrect by the threshold, while ``acc`` says
  correct. Two sessions fail (their prompts end in status ``failure``, as an agent-loop error
  leaves them): 14 rollouts of 4 prompts;
* one step of verl's ``PPOTrainer._step_once`` (a subclass without rollout servers, whose two
  hooks do nothing): ``ReplayBuffer.sample`` (whole prompt groups), ``_balance_batch``
  (``upsample_batch_to_divisible_size`` adds 2 no-op rows, uid ``pad...``, one masked response
  token, up to ``ppo_mini_batch_size * rollout.n`` = 16), ``_compute_old_log_prob``
  (``compute_log_prob`` with ``calculate_entropy``: the statistics pass), ``_compute_advantage``
  (GRPO) and ``_update_actor`` (one mini-batch);
* the worker group's calls through verl's dispatch and collect for one data-parallel rank
  (``BatchData.chunk`` / ``concat``) into ``ActorRolloutRefWorker.compute_log_prob`` /
  ``update_actor`` (``tqbridge``), ``TrainingWorker.infer_batch`` / ``train_mini_batch`` /
  ``train_batch`` (``ppo_loss`` with the ``hidden_align`` policy loss, registered by
  ``external_lib`` through verl's ``import_external_libs``), into the patched
  ``FSDPEngineWithLMHead`` of test_integration_verl.py (made without its constructor: the
  registry gives none on the CPU; float32, no FSDP wrapping) in micro-batches of ``MICRO`` rows
  that split every group. The optimiser is SGD with learning rate 0, and ``clip_grad`` is too
  large to clip: the gradient is recorded as the step begins.

Not run: rollout servers and agent loops (vLLM / SGLang), the reward loop, weight sync, the
engine registry and constructor; the workers run in this process, not as Ray actors.

Checked against one unwrapped forward over the 14 real rollouts (test_integration_verl.py's
``direct`` on them padded: verl's ``vanilla`` policy loss with the old log-probs and advantages
the step wrote to TransferQueue, plus ``COEF`` * ``hidden_align.loss`` with ``acc``):

* the recorded gradient equals the reference's in float32 (``GRAD_RTOL``, ``GRAD_ATOL``); the
  padding rows, absent from the reference, contribute nothing;
* ``actor/ha_align_loss``, as verl's trainer reduces it, equals the full-batch loss;
* correctness came from ``extra_fields.reward_extra_info.acc``: the statistics count the
  overlong rollout as correct, and ``rm_scores`` would have moved the loss far beyond the
  tolerance.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
import types
import warnings

import pytest
import torch

_INSTALL = 'pip install -e ".[parity]" (verl 0.9.1, transferqueue 0.1.11 and what V1 imports)'

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import transfer_queue  # noqa: F401 - the store of verl's V1 trainer
        import verl.trainer.ppo.v1.trainer_base  # noqa: F401 - the V1 trainer and its imports
    except Exception as exc:  # noqa: BLE001 - any import failure means nothing to test against
        pytest.skip(
            f"verl's V1 trainer or transferqueue is not importable ({exc}); {_INSTALL}",
            allow_module_level=True,
        )
    # Skips this module where the installed verl is not 0.9.1.
    from test_integration_verl import (
        PROMPT,
        RESPONSE,
        build_engine,
        cpu_verl,
        direct,
        full_batch_gradients,
        padded_batch,
    )

import torch.multiprocessing as mp  # noqa: E402

COEF = 0.1  # the default HIDDEN_ALIGN_COEF
SEED, ROWS, GROUPS = 5, 16, 4  # padded_batch: 4 prompts of 4 sessions
FAILED = 2  # sessions whose agent loop failed, one in each of two prompts
MICRO = 4  # rows per micro-batch, old-log-prob pass and update
EOS = 2  # the padding rows' token; no marker
STORAGE_UNITS = 2  # TransferQueue's storage units (see the module docstring)
RUN_S = 120  # the spawned step (about 15 s alone); then it and what it started are killed
# The gradient of the step against the one-forward float32 reference: micro-batched packed
# forwards against one padded forward, float32 rounding only.
GRAD_RTOL, GRAD_ATOL = 1e-4, 2e-6
LOSS_RTOL = 1e-5
OVERLONG_PENALTY = -1.0  # DAPO's overlong reward at the end of the buffer: the score 1 becomes 0


# ---- the rollouts ---------------------------------------------------------------------------


def _rollouts() -> list:
    """The rollouts of padded_batch(SEED) as verl's agent loop returns them, unpadded, with the
    DAPO reward; ``failed`` marks the sessions that never finished, ``overlong`` the correct
    rollout whose reward the penalty took to 0."""
    tensors, non_tensors = padded_batch(SEED, ROWS, GROUPS)
    attention = tensors["attention_mask"]
    uids, acc = list(non_tensors["uid"]), [bool(a) for a in non_tensors["acc"]]
    sessions = {}
    out = []
    for b in range(ROWS):
        prompt_len = int(attention[b, :PROMPT].sum())
        resp_len = int(attention[b, PROMPT:].sum())
        out.append(
            {
                "row": b,
                "uid": uids[b],
                "session": sessions.setdefault(uids[b], 0),
                "prompt_ids": tensors["prompts"][b, PROMPT - prompt_len :].tolist(),
                "response_ids": tensors["responses"][b, :resp_len].tolist(),
                "acc": acc[b],
                "failed": False,
                "overlong": False,
            }
        )
        sessions[uids[b]] += 1
    anchored = [b for b in range(ROWS) if b % 7 != 3]  # padded_batch's rows with a marker
    # The overlong rollout: a correct anchored one in a group that keeps two more of them.
    for r in out:
        mates = [m for m in out if m["uid"] == r["uid"] and m["acc"] and m["row"] in anchored]
        if r["acc"] and r["row"] in anchored and len(mates) >= 3:
            r["overlong"] = True
            break
    # The failed sessions: the last of two other prompts.
    prompts = [u for u in dict.fromkeys(uids) if u != next(r["uid"] for r in out if r["overlong"])]
    for uid in prompts[:FAILED]:
        [r for r in out if r["uid"] == uid][-1]["failed"] = True
    return out


def _write_rollouts(rows: list) -> None:
    """What the trainer's ``_submit_batch_to_rollout`` and ``AgentLoopWorkerTQ`` write."""
    import transfer_queue as tq
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput
    from verl.utils.model import compute_position_id_with_mask
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    uids = list(dict.fromkeys(r["uid"] for r in rows))
    tags = [{"is_prompt": True, "status": "pending", "global_steps": 1} for _ in uids]
    tq.kv_batch_put(keys=uids, partition_id="train", tags=tags)
    for uid in uids:
        tq.kv_put(key=uid, partition_id="train", tag={"status": "running"})
    for r in rows:
        if r["failed"]:
            continue
        output = AgentLoopOutput(
            prompt_ids=r["prompt_ids"],
            response_ids=r["response_ids"],
            response_mask=[1] * len(r["response_ids"]),
            # The server's log-probs (rollout.calculate_log_probs, on by default).
            response_logprobs=[-0.5] * len(r["response_ids"]),
            num_turns=2,
            metrics=AgentLoopMetrics(),
            extra_fields={},
        )
        score = 1.0 if r["acc"] else -1.0
        penalty = OVERLONG_PENALTY if r["overlong"] else 0.0
        # AgentLoopWorker._compute_score: the reward loop's result on the final output.
        output.reward_score = score + penalty
        output.extra_fields["reward_extra_info"] = {
            "score": score,
            "acc": r["acc"],
            "pred": "42" if r["acc"] else "[INVALID]",
            "overlong_reward": penalty,
            "overlong": penalty < 0,
        }
        field = output.as_dict()
        field.update(
            uid=r["uid"],
            session_id=r["session"],
            global_steps=1,
            index=r["row"],
            data_source="math_dapo",
            raw_prompt=[{"role": "user", "content": f"question {r['uid']}"}],
            reward_model={"style": "rule", "ground_truth": "42"},
        )
        input_ids = torch.cat([field["prompts"], field["responses"]])
        field["loss_mask"] = field["response_mask"]
        field["input_ids"] = input_ids
        field["position_ids"] = compute_position_id_with_mask(torch.ones_like(input_ids)[None])[0]
        field["multi_modal_inputs"] = {}
        prompt_len, response_len = len(r["prompt_ids"]), len(r["response_ids"])
        tag = {
            "status": "success",
            "prompt_len": prompt_len,
            "response_len": response_len,
            "seq_len": prompt_len + response_len,
            "global_steps": 1,
            "min_global_steps": None,
            "max_global_steps": None,
        }
        tq.kv_batch_put(
            keys=[f"{r['uid']}_{r['session']}_0"],
            fields=list_of_dict_to_tensordict([field]),
            tags=[tag],
            partition_id="train",
        )
    for uid in uids:
        failed = any(r["failed"] for r in rows if r["uid"] == uid)
        status = "failure" if failed else "finished"
        tq.kv_put(key=uid, partition_id="train", tag={"status": status})


# ---- verl's trainer and workers, in this process --------------------------------------------


def _config():
    """verl's ``ppo_trainer`` config, composed as ``main_ppo`` composes it."""
    from hydra import compose, initialize_config_dir

    overrides = [
        "algorithm.adv_estimator=grpo",
        f"data.train_batch_size={GROUPS}",
        f"actor_rollout_ref.rollout.n={ROWS // GROUPS}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={GROUPS}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={MICRO}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={MICRO}",
        "actor_rollout_ref.actor.policy_loss.loss_mode=hidden_align",
        # The clip ratios of test_integration_verl.actor_config, which the reference uses.
        "actor_rollout_ref.actor.clip_ratio_high=0.28",
        "actor_rollout_ref.actor.clip_ratio_c=10.0",
        "actor_rollout_ref.actor.optim.clip_grad=1e9",
        "actor_rollout_ref.model.external_lib=hidden_align.integrations.verl",
        "actor_rollout_ref.model.use_remove_padding=true",
        f"transfer_queue.backend.SimpleStorage.num_data_storage_units={STORAGE_UNITS}",
    ]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def _actor(config, engine):
    """``ActorRolloutRefWorker`` (role ``actor``) with what its ``init_model`` gives the actor,
    around ``engine``: the actor's ``TrainingWorker`` is made without its constructor, which
    asks the engine registry for an engine."""
    from functools import partial

    from verl.single_controller.base.worker import Worker
    from verl.utils.config import omega_conf_to_dataclass
    from verl.utils.flops_counter import FlopsCounter
    from verl.utils.profiler import DistProfilerExtension
    from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker
    from verl.workers.utils.losses import ppo_loss

    worker = ActorRolloutRefWorker(config.actor_rollout_ref, role="actor")
    actor_config = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    engine_config = actor_config.engine
    engine_config.use_dynamic_bsz = config.actor_rollout_ref.actor.use_dynamic_bsz
    engine_config.infer_micro_batch_size_per_gpu = MICRO
    engine_config.micro_batch_size_per_gpu = MICRO
    engine_config.use_remove_padding = True
    engine_config.use_fused_kernels = False

    engine.engine_config = engine_config
    engine.optimizer_config = actor_config.optim
    engine.optimizer = torch.optim.SGD(engine.module.parameters(), lr=0.0)
    engine.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda _: 1.0)
    engine._is_offload_param = engine._is_offload_optimizer = engine._qat_enabled = False
    engine.ulysses_parallel_group = None

    actor = object.__new__(TrainingWorker)
    Worker.__init__(actor)
    DistProfilerExtension.__init__(actor, worker.profiler)
    actor.model_config = {"use_remove_padding": True}
    actor.engine_config = engine_config
    actor.device_name = "cpu"
    actor.engine = engine
    actor.flops_counter = FlopsCounter(engine.module.config)
    actor.loss_fn = None
    actor._register_dispatch_collect_info(mesh_name="train", dp_rank=0, is_collect=True)

    worker.actor = actor
    worker.loss_fn = partial(ppo_loss, config=actor_config)
    actor.set_loss_fn(worker.loss_fn)
    worker.set_dispatch_collect(mesh_name="actor", **actor.get_dispatch_collect())
    return worker


class _WorkerGroup:
    """The trainer's ``actor_rollout_wg`` for one data-parallel rank: verl's dispatch
    (``BatchData.chunk``, which turns the ``KVBatchMeta`` into a ``BatchMeta``) and collect
    (``BatchData.concat``) around the worker's registered methods."""

    def __init__(self, worker) -> None:
        self.worker = worker
        self._dispatch_info = {}
        self.received = []

    def _query_dispatch_info(self, mesh_name: str) -> list:
        return [self.worker._query_dispatch_info(mesh_name)]

    def _call(self, name: str, batch):
        from verl.protocol import BatchData

        (chunk,) = BatchData(batch).chunk(chunks=1)
        self.received.append((name, type(chunk).__name__))
        return BatchData([getattr(self.worker, name)(chunk)]).concat()

    def compute_log_prob(self, batch):
        return self._call("compute_log_prob", batch)

    def update_actor(self, batch):
        return self._call("update_actor", batch)


def _step(path: str) -> dict:
    import ray
    import transfer_queue as tq
    import verl.utils.flops_counter as flops_counter
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    from verl.utils import tensordict_utils as tu
    from verl.utils.import_utils import import_external_libs

    cpu_verl()
    flops_counter.get_torch_device = lambda: torch.cpu  # the MFU metric asks for the device
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{path}/rendezvous", rank=0, world_size=1
    )
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        config = _config()
        # What HFModelConfig does in every worker: the integration registers and patches.
        import_external_libs(config.actor_rollout_ref.model.external_lib)
        from hidden_align.integrations import verl_engine

        tq.init(config.transfer_queue)
        rows = _rollouts()
        _write_rollouts(rows)

        class Trainer(PPOTrainer):
            """verl's V1 trainer without rollout servers: the rollouts are in TransferQueue."""

            def on_step_end(self):
                return

            def on_sample_end(self):
                return

        engine = build_engine()
        seen = {}
        infer = engine.infer_batch

        def infer_batch(data, loss_function=None):
            # What reaches the engine from TransferQueue through tqbridge.
            nested = ("prompts", "responses", "response_mask", "rm_scores", "input_ids")
            seen.update(
                keys=sorted(data.keys()),
                nested={k: bool(data[k].is_nested) for k in nested},
                uids=tu.get(data, "uid"),
                extra_fields=tu.get(data, "extra_fields"),
            )
            return infer(data, loss_function=loss_function)

        engine.infer_batch = infer_batch
        steps = []
        worker = _actor(config, engine)

        def record(optimizer, args, kwargs):
            grads = engine.module.named_parameters()
            steps.append({n: p.grad.detach().clone() for n, p in grads if p.grad is not None})

        engine.optimizer.register_step_pre_hook(record)

        trainer = Trainer(config)
        trainer.global_steps = 1
        trainer.tokenizer = types.SimpleNamespace(eos_token_id=EOS, pad_token_id=0)
        # Rewards come with the rollouts (the reward loop), not from a colocated reward model.
        trainer.reward_loop_manager = types.SimpleNamespace(reward_loop_worker_handles=[])
        trainer.actor_rollout_wg = _WorkerGroup(worker)
        metrics = {}
        batch = trainer._step_once(metrics, {}, sample_batch_size=GROUPS)

        fields = ["old_log_probs", "advantages"]
        data = tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=fields
        )
        ref = verl_engine.state_of(engine).reference
        return {
            "rows": rows,
            "keys": list(batch.keys),
            "tags": list(batch.tags),
            "old": [t.clone() for t in data["old_log_probs"].unbind()],
            "adv": [t.clone() for t in data["advantages"].unbind()],
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            "grads": steps,
            "received": trainer.actor_rollout_wg.received,
            "seen": seen,
            "reference": {
                "source": ref.source,
                "total_rows": ref.total_rows,
                "valid_groups": ref.valid_groups,
                "count": int(ref.stats.count.sum()),
            },
        }
    finally:
        try:
            tq.close()
        finally:
            ray.shutdown()
            torch.distributed.destroy_process_group()


def _child(path: str) -> None:
    os.setsid()  # its own process group: a hang is killed with what it started
    torch.set_num_threads(1)
    os.environ.update(
        HIDDEN_ALIGN_MARKERS="[[7, 8], [9]]",
        HIDDEN_ALIGN_COEF=str(COEF),
        HIDDEN_ALIGN_LAYER="norm",
        HIDDEN_ALIGN_CORRECT="acc",
        # Ray's socket paths must stay under 108 bytes: the short folder of this run.
        RAY_TMPDIR=path,
        RAY_AUTH_MODE="disabled",
        # The rank layout a worker reads as Ray starts it (Worker.__init__).
        WORLD_SIZE="1",
        RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="0",
    )
    for name in ("OFFSET", "OCCURRENCE", "LOSS_TYPE", "THRESHOLD"):
        os.environ.pop(f"HIDDEN_ALIGN_{name}", None)
    start = time.monotonic()
    try:
        result = _step(path)
    except Exception as exc:  # noqa: BLE001 - reported by the tests that read the result
        import traceback

        result = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-4000:]}"}
    result["seconds"] = time.monotonic() - start
    tmp = os.path.join(path, ".result.pt")
    torch.save(result, tmp)
    os.replace(tmp, os.path.join(path, "result.pt"))


@pytest.fixture(scope="module")
def step():
    """One V1 step in a spawned process (bounded by ``RUN_S``); its result."""
    path = tempfile.mkdtemp(prefix="ha-v1-", dir="/tmp")  # short, for Ray's socket paths
    proc = mp.get_context("spawn").Process(target=_child, args=(path,))
    try:
        proc.start()
        proc.join(RUN_S)
        if proc.is_alive():
            pytest.fail(f"verl's V1 step did not finish within {RUN_S} s")
        result_file = os.path.join(path, "result.pt")
        assert os.path.exists(result_file), f"no result (exit code {proc.exitcode})"
        result = torch.load(result_file, weights_only=False)
    finally:
        if proc.is_alive():
            os.killpg(proc.pid, signal.SIGKILL)  # the process group _child leads
            proc.join(10)
        shutil.rmtree(path, ignore_errors=True)
    assert "error" not in result, result["error"]
    return result


# ---- the one-forward reference --------------------------------------------------------------


def _real_rows(step) -> list:
    """``(position in the step's batch, padded_batch row)`` of each real rollout, in row order."""
    row_of = {f"{r['uid']}_{r['session']}_0": r["row"] for r in step["rows"] if not r["failed"]}
    pairs = [
        (i, row_of[key])
        for i, (key, tag) in enumerate(zip(step["keys"], step["tags"]))
        if not tag.get("is_padding", False)
    ]
    return sorted(pairs, key=lambda pair: pair[1])


def _reference(step, correct: str = "acc") -> dict:
    """Policy loss + COEF * alignment loss over the real rollouts, padded, in one unwrapped
    float32 forward, with the old log-probs and advantages the step wrote to TransferQueue;
    correctness from ``acc`` or from the reward (``rm_scores``)."""
    pairs = _real_rows(step)
    index = [row for _, row in pairs]
    tensors, non_tensors = padded_batch(SEED, ROWS, GROUPS)
    tensors = {k: v[index] for k, v in tensors.items()}

    def padded(values):
        out = torch.zeros(len(pairs), RESPONSE)
        for j, (i, _) in enumerate(pairs):
            out[j, : len(values[i])] = values[i]
        return out

    rows = {r["row"]: r for r in step["rows"]}
    if correct == "acc":
        values = [float(rows[b]["acc"]) for b in index]
    else:  # what rm_scores sums to: the score plus the overlong penalty
        values = [
            (1.0 if rows[b]["acc"] else -1.0) + (OVERLONG_PENALTY if rows[b]["overlong"] else 0.0)
            for b in index
        ]
    non_tensors = {"uid": non_tensors["uid"][index], "acc": torch.tensor(values)}
    model = build_engine().module
    old, adv = padded(step["old"]), padded(step["adv"])
    total, align, stats = direct(model, tensors, non_tensors, old, adv, "norm", COEF)
    return full_batch_gradients(model, total, align, stats, COEF)


@pytest.fixture(scope="module")
def reference(step):
    return _reference(step)


# ---- the tests -------------------------------------------------------------------------------


def test_the_v1_batch_reaches_the_engine(step):
    """The step sampled every prompt group, padded it with no-op rows to a whole mini-batch,
    and handed the worker only TransferQueue metadata, which ``tqbridge`` turned into the V1
    layout: nested sequences, the prompt id as uid, the reward's extra info per rollout."""
    print(f"V1 step: {step['seconds']:.1f} s in the spawned process")
    assert step["received"] == [("compute_log_prob", "BatchMeta"), ("update_actor", "BatchMeta")]
    seen = step["seen"]
    assert all(seen["nested"].values()), seen["nested"]
    assert "acc" not in seen["keys"] and "extra_fields" in seen["keys"]
    pad = [i for i, tag in enumerate(step["tags"]) if tag.get("is_padding", False)]
    real = ROWS - FAILED
    assert len(step["keys"]) == ROWS and len(pad) == ROWS - real and len(_real_rows(step)) == real
    for i, (key, uid) in enumerate(zip(step["keys"], seen["uids"])):
        assert key.split("_")[0] == uid  # the prompt id: {uid}_{session}_{index}
        assert (i in pad) == uid.startswith("pad")
    # Both passes run micro-batches of MICRO consecutive rows (no shuffling): every prompt's
    # rollouts fall in several of them.
    for uid in {r["uid"] for r in step["rows"]}:
        micro = {i // MICRO for i, u in enumerate(seen["uids"]) if u == uid}
        assert len(micro) > 1, (uid, seen["uids"])
    # The padding rows copy the first rollout's extra fields (so an 'acc' too), but have no
    # unmasked response token: no anchor.
    for fields in seen["extra_fields"]:
        assert isinstance(fields["reward_extra_info"]["acc"], bool), fields
    assert step["metrics"]["actor/ha_valid_groups"] == step["reference"]["valid_groups"]
    assert step["reference"]["total_rows"] == ROWS


def test_v1_gradient_matches_the_full_batch(step, reference):
    """The update's gradient is that of policy loss + COEF * alignment loss over the whole
    batch; the padding rows, absent from the reference, add nothing."""
    (grads,) = step["grads"]  # one mini-batch: one optimiser step
    want = reference["grads"]
    assert grads.keys() == want.keys()
    max_abs = max(float((grads[n] - w).abs().max()) for n, w in want.items())
    max_rel = max(float((grads[n] - w).abs().max() / w.abs().max()) for n, w in want.items())
    print(f"V1 gradient: max abs diff {max_abs:.3g}, max rel diff {max_rel:.3g} (float32)")
    for name, w in want.items():
        torch.testing.assert_close(grads[name], w, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)
    # Neither part hides in the tolerance.
    term = max(float(g.abs().max()) for g in reference["term"].values())
    policy = max(float((want[n] - g).abs().max()) for n, g in reference["term"].items())
    assert min(term, policy) > 100 * GRAD_ATOL, (term, policy)


def test_v1_logged_alignment_loss_is_the_full_batch_loss(step, reference):
    metrics = step["metrics"]
    logged = metrics["actor/ha_align_loss"]
    print(f"V1 ha_align_loss {logged:.7g}, full batch {reference['align']:.7g}")
    assert logged == pytest.approx(reference["align"], rel=LOSS_RTOL)
    cosine = float(reference["stats"]["mean_cosine"])
    assert metrics["actor/ha_anchor_cosine"] == pytest.approx(cosine, rel=LOSS_RTOL, abs=1e-6)
    assert metrics["actor/ha_valid_groups"] == int(reference["stats"]["valid_groups"])


def test_v1_correctness_comes_from_extra_fields(step, reference):
    """``acc`` is read from each rollout's ``extra_fields["reward_extra_info"]``: the overlong
    rollout (reward 0, incorrect by ``rm_scores``) counts as correct, and ``rm_scores`` would
    have given another loss."""
    assert step["reference"]["source"] == "extra_fields.reward_extra_info.acc"
    (overlong,) = [r for r in step["rows"] if r["overlong"]]
    assert overlong["acc"] and not overlong["failed"]
    assert step["reference"]["count"] == int(reference["stats"]["anchored_correct"])
    by_reward = _reference(step, correct="rm_scores")
    assert int(by_reward["stats"]["anchored_correct"]) == step["reference"]["count"] - 1
    assert abs(by_reward["align"] - reference["align"]) > 100 * LOSS_RTOL * reference["align"]
