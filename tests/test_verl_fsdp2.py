"""``hidden_align.integrations.verl`` on two gloo ranks under FSDP2, against one process.

Two processes (``torch.multiprocessing`` spawn, gloo, as verl 0.9.1's own CPU test of FSDP2
gradient accumulation) each hold an ``FSDPEngineWithLMHead`` made without its constructor
(the registry gives none on the CPU; ``get_device_id`` / ``get_device_name`` of verl's FSDP
modules patched to the CPU), whose tiny randomly initialised Qwen2 (the one of
test_integration_verl.py, seeded) is wrapped by the engine's own ``_build_fsdp_module`` with
``strategy="fsdp2"``: verl's ``apply_fsdp2`` (``fully_shard`` per decoder layer, then the root)
and ``fsdp2_load_full_state_dict``, with verl's default mixed precision
``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` and the forward under
bfloat16 autocast (``_autocast_dtype``). The device mesh is the engine's ``_init_device_mesh``.

Each rank runs verl's old-log-prob pass (``BaseEngine.infer_batch`` with
``calculate_entropy``: the statistics are collected and all-reduced) and then the update
(``FSDPEngine.forward_backward_batch`` with ``losses.ppo_loss`` and the registered
``hidden_align`` policy loss, ``HIDDEN_ALIGN_COEF`` > 0), on its half of a batch in which every
group has rows on both ranks and in several micro-batches of a rank; with fixed micro-batches
and with dynamic batch sizes (``rearrange_micro_batches``, micro-batch counts agreed over the
ranks). Metrics are gathered over the ranks as ``TrainingWorker`` does
(``allgather_dict_into_dict``, ``Metric.aggregate_dp``).

Checked against one process over the whole batch, unwrapped (a plain float32 model, no FSDP,
no autocast; verl's ``vanilla`` policy loss and ``hidden_align.loss`` without a reference):

* the gathered (``DTensor.full_tensor``) gradient after the update equals the gradient of
  policy loss + coef * alignment loss, to the bfloat16 tolerance ``GRAD_TOL`` (measured
  figures beside it), which is several times smaller than the term's own gradient;
* ``actor/ha_align_loss`` equals the full-batch alignment loss;
* the statistics are identical on both ranks, count the full batch's anchored correct
  rollouts, and their mean cosine is the full batch's.

A last mini-batch with fewer rows than the mini-batch size: verl's ``TrainingWorker`` refuses
it (``tensordict_utils.make_iterator`` asserts that the rows divide), and verl's V1 trainer
pads the batch with no-op rows to a multiple of ``ppo_mini_batch_size * rollout.n`` instead,
so through verl a short last mini-batch only ever holds fewer *real* rows. Driven by hand
(24 rows in global mini-batches of 16 and 8), the term stays exact in sum: the gradients
accumulated over the two mini-batches are ``total rows / global_batch_size`` = 1.5 times
``coef`` times the full-batch gradient, as with even mini-batches. Per step it is biased:
each step's term is its rows' share of the whole loss times that same 1.5, so the short step
carries about half a whole loss where a full step carries about one (0.63 and 0.87 of it
here), and ``actor/ha_align_loss``, verl's mean over the mini-batches, reads 1.5 / 2 of the
full-batch loss.

An error on one rank only (a mini-batch holding groups the statistics lack; a correctness
value that cannot be read, in the old-log-prob pass and in the update) makes both ranks raise
within ``WITHIN_S`` seconds, against a process-group timeout of ``PG_TIMEOUT_S``; a good pass
and update run afterwards.
"""

from __future__ import annotations

import datetime
import functools
import os
import shutil
import tempfile
import time
import types
import warnings

import numpy as np
import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    # Skips this module, with the install command, where verl 0.9.1 is not importable.
    from test_integration_verl import (
        RESPONSE,
        actor_config,
        build_engine,
        cpu_verl,
        direct,
        full_batch_gradients,
        no_padding,
        padded_batch,
    )

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

WORLD = 2
COEF = 0.1  # the default HIDDEN_ALIGN_COEF
SEED, ROWS, GROUPS = 5, 16, 4  # every group has rows on both ranks and in several micro-batches
UNEVEN_SEED, UNEVEN_ROWS, UNEVEN_GROUPS, MINI = 31, 24, 6, 16
MICRO = 4  # fixed micro-batches: two per rank
MAX_TOKENS = 40  # dynamic batch sizes: about two or three micro-batches per rank
PG_TIMEOUT_S = 30  # a rank left waiting in a collective fails after this
WITHIN_S = 10  # when one rank fails, each rank must raise well within the timeout
RUN_S = 150  # the whole two-rank run; then leftover processes are killed
# Largest difference of the gathered gradient from the float32 one-process gradient, relative
# to each parameter's largest entry. bfloat16 parameters and compute round it at about 2% here,
# as the same formula computed in one process in bfloat16 does: measured 0.0244 (max abs
# 0.00174) with fixed micro-batches, 0.0214 (0.00158) with dynamic batch sizes, 0.0172
# (0.00085) for the short last mini-batch, against 0.0244, 0.0244 and 0.0240 in one process.
# Checked: at most GRAD_TOL, and at most twice the one-process bfloat16 difference.
GRAD_TOL = 5e-2
# The logged loss and mean cosine: float32 sums of bfloat16 states (measured: 5.8e-5 relative
# and 5.7e-5 absolute).
LOSS_TOL = 1e-3


# ---- the two ranks -------------------------------------------------------------------------


def _fsdp2_engine(rank: int):
    """The engine of test_integration_verl.py with its module wrapped by verl's FSDP2 path."""
    from verl.workers.config import FSDPEngineConfig

    engine = build_engine()
    engine.rank = rank
    # mixed_precision=None: verl's default, bfloat16 parameters and fp32 gradient reduction.
    engine.engine_config = FSDPEngineConfig(strategy="fsdp2", mixed_precision=None)
    engine.model_config = types.SimpleNamespace(
        tokenizer=None, lora_rank=0, enable_activation_offload=False
    )
    engine._init_device_mesh()
    engine.module = engine._build_fsdp_module(engine.module)
    return engine


def _rank_rows(tensors: dict, non_tensors: dict, rank: int, rows: int) -> tuple:
    """The rank's share of the batch, as verl's dispatch hands out contiguous chunks."""
    part = slice(rank * rows // WORLD, (rank + 1) * rows // WORLD)
    return {k: v[part] for k, v in tensors.items()}, {k: v[part] for k, v in non_tensors.items()}


def _advantages(rows: int) -> torch.Tensor:
    return torch.randn(rows, RESPONSE, generator=torch.Generator().manual_seed(6))


def _collect(engine, tensors, non_tensors, dynamic: bool) -> torch.Tensor:
    """The actor's old-log-prob pass on this rank's rows; its padded float32 log-probs."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    data = no_padding(tensors, non_tensors)
    tu.assign_non_tensor(
        data,
        calculate_entropy=True,
        compute_loss=False,
        use_remove_padding=True,
        use_dynamic_bsz=dynamic,
        max_token_len_per_gpu=MAX_TOKENS,
        micro_batch_size_per_gpu=MICRO,
        use_fused_kernels=False,
    )
    output = engine.infer_batch(data, loss_function=None)
    return no_padding_2_padding(output["model_output"]["log_probs"], data).float()


def _update(engine, tensors, non_tensors, old, adv, dynamic: bool, bounds: list) -> tuple:
    """``forward_backward_batch`` on each of this rank's mini-batches ``bounds`` (row ranges;
    no optimiser step, so gradients accumulate), with ``global_batch_size`` the rows of the
    first mini-batch over all ranks, as the driver sets it. Returns per mini-batch the metrics
    gathered over the ranks, and the uids of each micro-batch."""
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric.utils import Metric
    from verl.utils.torch_functional import allgather_dict_into_dict
    from verl.workers.utils.losses import ppo_loss

    global_rows = WORLD * (bounds[0][1] - bounds[0][0])
    data = no_padding(tensors, non_tensors, old_log_probs=old, advantages=adv)
    tu.assign_non_tensor(
        data,
        calculate_entropy=False,
        global_batch_size=global_rows,
        use_remove_padding=True,
        use_dynamic_bsz=dynamic,
        max_token_len_per_gpu=MAX_TOKENS,
        micro_batch_size_per_gpu=MICRO,
        use_fused_kernels=False,
    )
    inner = functools.partial(ppo_loss, config=actor_config(batch=global_rows))
    micro_uids = []

    def loss(*, model_output, data, dp_group=None):
        micro_uids.append(list(tu.get(data, "uid")))
        return inner(model_output=model_output, data=data, dp_group=dp_group)

    steps = []
    for start, end in bounds:
        mini = tu.index_select_tensor_dict(data, torch.arange(start, end))
        out = engine.forward_backward_batch(mini, loss, forward_only=False)
        # TrainingWorker: metrics all-gathered over the data-parallel group, then one value
        # per mini-batch (Metric.aggregate_dp: mean over ranks of the sum over micro-batches).
        gathered = allgather_dict_into_dict(out["metrics"], group=engine.get_data_parallel_group())
        steps.append(
            {
                k: Metric.aggregate_dp(v) if isinstance(v[0], Metric) else v
                for k, v in gathered.items()
            }
        )
    return steps, micro_uids


def _full_grads(engine) -> dict:
    """Every parameter's unsharded gradient (a collective: every rank calls it)."""
    grads = {}
    for name, p in engine.module.named_parameters():
        if p.grad is not None:
            grads[name] = p.grad.full_tensor().detach().clone()
    engine.module.zero_grad(set_to_none=True)
    return grads


def _stats_of(engine) -> dict:
    from hidden_align.integrations import verl_engine

    ref = verl_engine.state_of(engine).reference
    s = ref.stats
    return {
        "group_ids": s.group_ids.clone(),
        "unit_sum": s.unit_sum.clone(),
        "count": s.count.clone(),
        "total_rows": ref.total_rows,
        "valid_groups": ref.valid_groups,
        "mean_cosine": ref.mean_cosine,
    }


def _wrapping(engine) -> dict:
    """How the module is sharded: the units ``fully_shard`` made, their mixed-precision
    policies, and the rank's share of the parameters."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from verl.utils.fsdp_utils import fsdp_version

    units = {n: m for n, m in engine.module.named_modules() if isinstance(m, FSDPModule)}
    params = list(engine.module.parameters())
    return {
        "fsdp_version": fsdp_version(engine.module),
        "units": sorted(units),
        # What verl asked fully_shard for (FSDP2 keeps it on each unit's state).
        "policies": {
            (
                u._get_fsdp_state()._mp_policy.param_dtype,
                u._get_fsdp_state()._mp_policy.reduce_dtype,
            )
            for u in units.values()
        },
        "dtensors": all(isinstance(p, DTensor) for p in params),
        "local": sum(p.to_local().numel() for p in params),
        "total": sum(p.numel() for p in params),
        "autocast": engine._autocast_dtype,
    }


def _exact_case(engine, rank: int, dynamic: bool) -> dict:
    tensors, non_tensors = _rank_rows(*padded_batch(SEED, ROWS, GROUPS), rank, ROWS)
    old = _collect(engine, tensors, non_tensors, dynamic)
    stats = _stats_of(engine)
    adv = _rank_rows({"adv": _advantages(ROWS)}, {}, rank, ROWS)[0]["adv"]
    seen = set()  # dtypes of the final norm's output: what the term aligns
    hook = engine.module.model.norm.register_forward_hook(lambda m, a, out: seen.add(out.dtype))
    try:
        steps, micro_uids = _update(
            engine, tensors, non_tensors, old, adv, dynamic, [(0, ROWS // WORLD)]
        )
    finally:
        hook.remove()
    grads = _full_grads(engine)
    return {
        "old": old,
        "stats": stats,
        "metrics": steps,
        "micro_uids": micro_uids,
        "grads": grads,
        "grad_dtypes": {g.dtype for g in grads.values()},
        "hidden_dtypes": seen,
        "wrapping": _wrapping(engine),
    }


def _uneven_case(engine, rank: int) -> dict:
    from verl.utils import tensordict_utils as tu

    tensors, non_tensors = _rank_rows(
        *padded_batch(UNEVEN_SEED, UNEVEN_ROWS, UNEVEN_GROUPS), rank, UNEVEN_ROWS
    )
    old = _collect(engine, tensors, non_tensors, False)
    local, per_rank = UNEVEN_ROWS // WORLD, MINI // WORLD
    # TrainingWorker.train_mini_batch splits the rank's rows with make_iterator, which refuses.
    try:
        next(tu.make_iterator(no_padding(tensors, non_tensors), per_rank, epochs=1))
        refused = None
    except AssertionError as exc:
        refused = str(exc)
    steps, _ = _update(
        engine,
        tensors,
        non_tensors,
        old,
        torch.zeros_like(old),  # no policy gradient: only the term remains
        False,
        [(0, per_rank), (per_rank, local)],
    )
    return {"refused": refused, "metrics": steps, "grads": _full_grads(engine)}


def _failure_cases(engine, rank: int, path: str) -> dict:
    """Each scenario: what the rank raised and how long the call took. A rank that is done
    waits for the other (through a file, not a collective) before the next scenario, as a
    Ray worker that returned its error stays idle: a rank left waiting in a collective then
    waits for the process-group timeout instead of meeting the next scenario's collectives."""
    tensors, non_tensors = _rank_rows(*padded_batch(SEED, ROWS, GROUPS), rank, ROWS)
    bad = rank == 1

    def malformed(non_tensors):
        acc = non_tensors["acc"].astype(object)
        acc[0] = "n/a"  # a correctness value that is no number
        return dict(non_tensors, acc=acc)

    def unseen():
        old = _collect(engine, tensors, non_tensors, False)
        t, n = tensors, non_tensors
        if bad:  # another batch's rows: groups the statistics lack
            t, n = _rank_rows(*padded_batch(SEED + 1, ROWS, GROUPS), rank, ROWS)
        _update(engine, t, n, old, torch.zeros_like(old), False, [(0, ROWS // WORLD)])

    def collect_malformed():
        _collect(engine, tensors, malformed(non_tensors) if bad else non_tensors, False)

    def update_malformed():
        old = _collect(engine, tensors, non_tensors, False)
        n = malformed(non_tensors) if bad else non_tensors
        _update(engine, tensors, n, old, torch.zeros_like(old), True, [(0, ROWS // WORLD)])

    def good():
        old = _collect(engine, tensors, non_tensors, True)
        adv = _advantages(ROWS // WORLD)
        _update(engine, tensors, non_tensors, old, adv, True, [(0, ROWS // WORLD)])
        _full_grads(engine)

    outcomes = {}
    for name, call in (
        ("unseen", unseen),
        ("collect-malformed", collect_malformed),
        ("update-malformed", update_malformed),
        ("good", good),
    ):
        start = time.monotonic()
        try:
            call()
            outcomes[name] = {"type": None, "message": ""}
        except Exception as exc:  # noqa: BLE001 - every outcome is recorded and checked
            outcomes[name] = {"type": type(exc).__name__, "message": str(exc)}
        outcomes[name]["seconds"] = time.monotonic() - start
        engine.module.zero_grad(set_to_none=True)
        open(os.path.join(path, f"{name}.done{rank}"), "w").close()
        other = os.path.join(path, f"{name}.done{1 - rank}")
        deadline = time.monotonic() + PG_TIMEOUT_S + 15
        while not os.path.exists(other) and time.monotonic() < deadline:
            time.sleep(0.05)
    return outcomes


def _save(path: str, name: str, rank: int, value) -> None:
    tmp = os.path.join(path, f".{name}.rank{rank}.pt")
    torch.save(value, tmp)
    os.replace(tmp, os.path.join(path, f"{name}.rank{rank}.pt"))


def _rank_main(rank: int, path: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        HIDDEN_ALIGN_MARKERS="[[7, 8], [9]]",
        HIDDEN_ALIGN_COEF=str(COEF),
        HIDDEN_ALIGN_LAYER="norm",
    )
    for name in ("OFFSET", "OCCURRENCE", "LOSS_TYPE", "THRESHOLD", "CORRECT"):
        os.environ.pop(f"HIDDEN_ALIGN_{name}", None)
    import hidden_align.integrations.verl  # noqa: F401 - applies the engine wrap

    cpu_verl()
    dist.init_process_group(
        "gloo",
        init_method=f"file://{path}/rendezvous",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    engine = _fsdp2_engine(rank)
    cases = [
        ("static", lambda: _exact_case(engine, rank, False)),
        ("dynamic", lambda: _exact_case(engine, rank, True)),
        ("uneven", lambda: _uneven_case(engine, rank)),
        ("failures", lambda: _failure_cases(engine, rank, path)),
    ]
    for name, case in cases:
        try:
            result = case()
        except Exception as exc:  # noqa: BLE001 - reported by the test that reads the case
            result = {"error": f"{type(exc).__name__}: {exc}"}
        _save(path, name, rank, result)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    """Runs both ranks once (bounded by ``RUN_S``; leftovers killed by their ids) and returns
    ``{case: [rank 0's result, rank 1's result]}``; the files go with the run."""
    path = tempfile.mkdtemp(prefix="hidden_align_fsdp2_")
    procs = []
    try:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_rank_main, args=(r, path)) for r in range(WORLD)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + RUN_S
        for p in procs:
            p.join(max(deadline - time.monotonic(), 0.1))
        results = {}
        for case in ("static", "dynamic", "uneven", "failures"):
            files = [os.path.join(path, f"{case}.rank{r}.pt") for r in range(WORLD)]
            if all(os.path.exists(f) for f in files):
                results[case] = [torch.load(f, weights_only=False) for f in files]
        results["exitcodes"] = [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
        shutil.rmtree(path, ignore_errors=True)
    return results


def _case(ranks, name: str) -> list:
    assert name in ranks, f"no result for {name!r} (exit codes {ranks['exitcodes']})"
    for rank, result in enumerate(ranks[name]):
        assert "error" not in result, f"rank {rank}: {result['error']}"
    return ranks[name]


# ---- the one-process reference -------------------------------------------------------------


def _reference(seed, rows, groups, old, adv, coef, dtype=torch.float32) -> dict:
    """Policy loss + coef * alignment loss over the whole batch in one unwrapped model:
    float32 (the reference), or bfloat16 parameters and autocast (verl's precision, for the
    size of its rounding)."""
    model = build_engine().module.to(dtype)
    tensors, non_tensors = padded_batch(seed, rows, groups)
    total, align, stats = direct(model, tensors, non_tensors, old, adv, "norm", coef, dtype)
    return full_batch_gradients(model, total, align, stats, coef)


def _differences(got: dict, want: dict) -> dict:
    """Per parameter: the largest difference, relative to the parameter's largest gradient
    entry (absolute where that is 0)."""
    assert got.keys() == want.keys()
    out = {}
    for name, w in want.items():
        diff = float((got[name] - w).abs().max())
        out[name] = diff / (float(w.abs().max()) or 1.0)
    return out


def _check_gradient(case: str, got: dict, ref: dict, own: dict) -> None:
    """``got`` against the float32 ``ref``: within ``GRAD_TOL`` and at most twice the error of
    the same formula computed in one process in bfloat16 (``own``)."""
    max_abs = max(float((got[n] - w).abs().max()) for n, w in ref["grads"].items())
    rel = max(_differences(got, ref["grads"]).values())
    own_rel = max(_differences(own["grads"], ref["grads"]).values())
    print(
        f"{case}: gradient max abs diff {max_abs:.3g}, max rel diff {rel:.3g} "
        f"(one process in bfloat16: {own_rel:.3g})"
    )
    assert rel <= GRAD_TOL and rel <= 2 * own_rel, (rel, own_rel)
    for name, want in ref["grads"].items():
        atol = GRAD_TOL * float(want.abs().max())
        torch.testing.assert_close(got[name], want, rtol=GRAD_TOL, atol=atol, msg=name)


# ---- the tests -----------------------------------------------------------------------------


def test_the_actor_is_sharded_as_verl_shards_it(ranks):
    """verl's FSDP2 path: a unit per decoder layer, the untied embedding and head, and the
    root; bfloat16 parameters and fp32 reduction; each rank holds half the parameters; the
    forward computes in bfloat16 and the sharded gradients are float32."""
    for result in _case(ranks, "static"):
        w = result["wrapping"]
        assert w["fsdp_version"] == 2 and w["dtensors"]
        assert w["units"] == [
            "",
            "lm_head",
            "model.embed_tokens",
            "model.layers.0",
            "model.layers.1",
        ]
        assert w["policies"] == {(torch.bfloat16, torch.float32)}
        assert w["local"] * WORLD == w["total"] and w["autocast"] == torch.bfloat16
        assert result["hidden_dtypes"] == {torch.bfloat16}
        assert result["grad_dtypes"] == {torch.float32}


@pytest.mark.parametrize("case", ["static", "dynamic"])
def test_fsdp2_gradient_matches_one_process(ranks, case):
    results = _case(ranks, case)
    old = torch.cat([r["old"] for r in results])
    adv = _advantages(ROWS)
    ref = _reference(SEED, ROWS, GROUPS, old, adv, COEF)
    own = _reference(SEED, ROWS, GROUPS, old, adv, COEF, torch.bfloat16)

    # The batch splits every group over both ranks and over micro-batches.
    for uid in set(padded_batch(SEED, ROWS, GROUPS)[1]["uid"]):
        holders = [
            (rank, i)
            for rank, r in enumerate(results)
            for i, uids in enumerate(r["micro_uids"])
            if uid in uids
        ]
        assert {rank for rank, _ in holders} == {0, 1} and len(holders) >= 3, (uid, holders)

    _check_gradient(case, results[0]["grads"], ref, own)
    # The tolerance hides neither part: each moves most parameters' gradients by several
    # tolerances (relative to their largest entry, as the differences are measured).
    for part in (lambda n: ref["term"][n], lambda n: ref["grads"][n] - ref["term"][n]):
        shares = [float(part(n).abs().max() / g.abs().max()) for n, g in ref["grads"].items()]
        assert np.median(shares) > 4 * GRAD_TOL, shares

    assert results[0]["metrics"] == results[1]["metrics"]
    (metrics,) = results[0]["metrics"]
    logged = metrics["actor/ha_align_loss"]
    print(f"{case}: ha_align_loss {logged:.6g}, full batch {ref['align']:.6g}")
    assert logged == pytest.approx(ref["align"], rel=LOSS_TOL)
    cosine = float(ref["stats"]["mean_cosine"])
    assert metrics["actor/ha_anchor_cosine"] == pytest.approx(cosine, abs=LOSS_TOL)
    assert metrics["actor/ha_valid_groups"] == int(ref["stats"]["valid_groups"])

    # Identical statistics on both ranks, of the whole batch.
    s0, s1 = (r["stats"] for r in results)
    for key in ("group_ids", "unit_sum", "count"):
        assert torch.equal(s0[key], s1[key]), key
    for key in ("total_rows", "valid_groups", "mean_cosine"):
        assert s0[key] == s1[key], key
    assert s0["total_rows"] == ROWS and s0["valid_groups"] == int(ref["stats"]["valid_groups"])
    assert int(s0["count"].sum()) == int(ref["stats"]["anchored_correct"])
    assert s0["mean_cosine"] == pytest.approx(cosine, abs=LOSS_TOL)


def test_short_last_mini_batch_is_exact_in_sum(ranks):
    """24 rows in mini-batches of 16 and 8 (see the module docstring): verl's worker refuses
    the split; driven by hand, the accumulated term gradient is 24/16 coef times the full one,
    and the logged loss (verl's mean over the two steps) 24/16/2 of the full loss."""
    results = _case(ranks, "uneven")
    for r in results:
        assert r["refused"] == "12 % 8 != 0"
    tensors, _ = padded_batch(UNEVEN_SEED, UNEVEN_ROWS, UNEVEN_GROUPS)
    zeros = torch.zeros(tensors["responses"].shape)  # no policy gradient: the term alone
    scale = UNEVEN_ROWS / MINI
    args = (UNEVEN_SEED, UNEVEN_ROWS, UNEVEN_GROUPS, zeros, zeros, scale * COEF)
    ref, own = _reference(*args), _reference(*args, torch.bfloat16)
    _check_gradient("uneven", results[0]["grads"], ref, own)
    assert results[0]["metrics"] == results[1]["metrics"]
    steps = [float(m["actor/ha_align_loss"]) for m in results[0]["metrics"]]
    print(f"uneven: ha_align_loss per step {steps}, full batch {ref['align']:.6g}")
    assert sum(steps) == pytest.approx(scale * ref["align"], rel=LOSS_TOL)
    assert np.mean(steps) == pytest.approx(scale / 2 * ref["align"], rel=LOSS_TOL)
    # The short step carries its rows' share only, scaled as a full step's.
    assert steps[1] < steps[0]


PEER = "hidden_align: data-parallel rank 1 failed in the "


@pytest.mark.parametrize(
    "name,expected",
    [
        (
            "unseen",
            [
                ("RuntimeError", PEER + "update (its mini-batch holds groups the statistics lack"),
                ("_RankFailure", "the statistics belong to another batch"),
            ],
        ),
        (
            "collect-malformed",
            [
                ("RuntimeError", PEER + "old-log-prob pass (its micro-batches' anchors"),
                ("ValueError", "could not convert string to float: 'n/a'"),
            ],
        ),
        (
            "update-malformed",
            [
                ("RuntimeError", PEER + "update (its mini-batch's anchors, groups or correctness"),
                ("ValueError", "could not convert string to float: 'n/a'"),
            ],
        ),
        ("good", [(None, "")] * 2),
    ],
)
def test_one_failing_rank_stops_both(ranks, name, expected):
    outcomes = [r[name] for r in _case(ranks, "failures")]
    for rank, (got, (kind, text)) in enumerate(zip(outcomes, expected)):
        assert got["seconds"] < WITHIN_S, f"rank {rank} took {got['seconds']:.1f} s: {got}"
        assert got["type"] == kind and text in got["message"], f"rank {rank}: {got}"
