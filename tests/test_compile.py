"""The ops under torch.compile: custom ops (one graph node each, no graph break) that give the
eager values and gradients; the gradient of `hidden` is then a dense tensor."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from dapo_cases import policy_case
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

import hidden_align as ha

from cases import make_case

OPS = torch.ops.hidden_align


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test compiles its own functions: no cached graph or recompile limit carries over.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def head_loss(h):
    """An LM-head stand-in, so that `hidden` also receives a dense gradient of its own."""
    w = torch.linspace(-1, 1, h.shape[-1], dtype=h.dtype)
    return (h * w).sin().sum()


def step(hidden, log_prob, old, mask, anchors, rewards, scores, group_ids, cu_seqlens, cfg):
    """One training step's losses: alignment, group advantages, clipped policy loss."""
    grouping = dict(group_ids=group_ids, group_size=cfg.get("group_size"))
    align, stats = ha.loss(
        hidden,
        anchors,
        rewards,
        loss_type=cfg["loss_type"],
        reduction=cfg.get("reduction", "mean"),
        cu_seqlens=cu_seqlens,
        return_stats=True,
        **grouping,
    )
    if cfg.get("reduction") == "none":
        per_group, stats["valid"] = align
        # Distinct weights per group: the gradient then depends on the group order too.
        weights = torch.arange(1, per_group.shape[0] + 1, dtype=per_group.dtype)
        align = (per_group * weights).sum()
    adv = ha.dapo.group_advantages(scores, **grouping)
    pg, metrics = ha.dapo.policy_loss(
        log_prob, old, adv.to(log_prob.dtype), mask, loss_agg_mode=cfg["agg"], **cfg["policy"]
    )
    total = pg + 0.1 * align
    if cfg.get("head"):
        total = total + 0.01 * head_loss(hidden)
    return total, {**metrics, **stats}


def make_inputs(dtype, cfg):
    torch.manual_seed(0)
    case = make_case(
        batch=8,
        group=4,
        seq=6,
        hidden_size=16,
        dtype=dtype,
        layout=cfg.get("layout", "padded"),
        anchor_form=cfg.get("anchor_form", "index"),
        grouping="size" if "group_size" in cfg else "ids",
    )
    logp, old, _, mask = policy_case(batch=8, seq=9, dtype=dtype)
    scores = torch.randn(8)
    args = (case.hidden, logp, old, mask, case.anchors, case.rewards, scores, case.group_ids)
    return args + (case.cu_seqlens,)


def run(fn, args, cfg):
    """Total, metrics and stats, and the gradients of hidden and log_prob."""
    hidden = args[0].clone().requires_grad_()
    log_prob = args[1].clone().requires_grad_()
    total, info = fn(hidden, log_prob, *args[2:], cfg)
    total.backward()
    return total.detach(), {k: v.detach() for k, v in info.items()}, hidden.grad, log_prob.grad


def assert_same(eager, compiled):
    total, info, grad_hidden, grad_logp = eager
    torch.testing.assert_close(compiled[0], total)
    assert compiled[1].keys() == info.keys()
    for k in info:
        torch.testing.assert_close(compiled[1][k], info[k], equal_nan=True, msg=k)
    assert type(compiled[2]) is torch.Tensor
    torch.testing.assert_close(compiled[2], grad_hidden)
    torch.testing.assert_close(compiled[3], grad_logp)


CONFIGS = {
    "cosine-token-mean": dict(loss_type="cosine", agg="token-mean", policy={}, head=True),
    "centroid-none-packed": dict(
        loss_type="centroid",
        reduction="none",
        agg="seq-mean-token-sum",
        group_size=4,
        layout="packed",
        anchor_form="mask",
        policy={"clip_ratio_c": 3.0, "log_ratio_clamp": None},
    ),
    "mse-global-normalisers": dict(
        loss_type="mse",
        agg="seq-mean-token-mean",
        anchor_form="mask",
        policy={"dp_size": 2, "global_batch_size": torch.tensor(11.0)},
        head=True,
    ),
    "contrastive-sum": dict(
        loss_type="contrastive",
        reduction="sum",
        agg="seq-mean-token-sum-norm",
        group_size=4,
        policy={"loss_scale_factor": 5},
    ),
    "cosine-none-by-labels": dict(
        loss_type="cosine",
        reduction="none",
        agg="token-sum",
        policy={"batch_num_tokens": torch.tensor(37.0), "dp_size": 4},
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_step_matches_eager(name, dtype):
    cfg = CONFIGS[name]
    args = make_inputs(dtype, cfg)
    eager = run(step, args, cfg)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert_same(eager, run(compiled, args, cfg))
    # A second call runs the cached graph (the hidden gradient is a fresh dense tensor again).
    assert_same(eager, run(compiled, args, cfg))


def test_inductor_step_matches_eager():
    """The default backend: Inductor generates the code around our ops (CPU, C++)."""
    cfg = CONFIGS["cosine-token-mean"]
    args = make_inputs(torch.float32, cfg)
    assert_same(run(step, args, cfg), run(torch.compile(step, fullgraph=True), args, cfg))


def test_ops_are_single_nodes_of_one_graph():
    """One Dynamo graph (no graph break anywhere); each op one node in the forward graph and
    the backward ops one node each in the backward graph."""
    graphs = {"dynamo": [], "forward": [], "backward": []}

    def recorder(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    aot = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))

    def backend(gm, example_inputs):
        graphs["dynamo"].append(gm)
        return aot(gm, example_inputs)

    cfg = CONFIGS["cosine-token-mean"]
    args = make_inputs(torch.float32, cfg)
    assert_same(run(step, args, cfg), run(torch.compile(step, backend=backend), args, cfg))
    assert [len(graphs[k]) for k in graphs] == [1, 1, 1]

    def ours(gm):
        names = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        return sorted(n for n in names if n.startswith("hidden_align."))

    forward = ["align_forward", "group_advantages", "policy_loss_forward"]
    assert ours(graphs["dynamo"][0]) == [f"hidden_align.{n}.default" for n in forward]
    assert ours(graphs["forward"][0]) == [f"hidden_align.{n}.default" for n in forward]
    backward = ["align_backward", "policy_loss_backward"]
    assert ours(graphs["backward"][0]) == [f"hidden_align.{n}.default" for n in backward]


def test_dynamic_shapes():
    """One graph for several batch sizes (symbolic B in every fake implementation)."""
    cfg = dict(loss_type="cosine", agg="token-mean", group_size=4, policy={})
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    for batch in (8, 12):
        torch.manual_seed(batch)
        case = make_case(batch=batch, group=4, seq=5, hidden_size=8, grouping="size")
        logp, old, _, mask = policy_case(batch=batch, seq=7, dtype=torch.float64)
        args = (case.hidden, logp, old, mask, case.anchors, case.rewards, torch.randn(batch))
        args += (None, None)
        assert_same(run(step, args, cfg), run(compiled, args, cfg))


def test_other_dapo_ops_and_no_grad():
    metric = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0])
    ids = torch.tensor([5, 5, 9, 9, 1, 1])
    lengths = torch.tensor([10, 18, 20, 3, 19, 17])
    case = make_case(batch=8, group=4, seq=6, hidden_size=16)

    def fn(metric, ids, lengths, hidden):
        keep = ha.dapo.dynamic_sampling_mask(metric, group_ids=ids)
        keep_blocks = ha.dapo.dynamic_sampling_mask(metric, group_size=2)
        penalty = ha.dapo.overlong_penalty(lengths, 20, 4, 0.5)
        align = ha.loss(hidden, case.anchors, case.rewards, group_ids=case.group_ids)
        return keep, keep_blocks, penalty, align

    args = (metric, ids, lengths, case.hidden)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for ours, expected in zip(compiled(*args), fn(*args)):
            torch.testing.assert_close(ours, expected)


def test_argument_errors_still_raise():
    """Checks run while tracing: with fullgraph=True Dynamo reports our error as the cause of
    its own; without it the call falls back to eager and raises ours."""
    case = make_case(batch=8, group=4, seq=6, hidden_size=16)

    def fn(hidden):
        return ha.loss(hidden, case.anchors, case.rewards, group_size=4, loss_type="bogus")

    with pytest.raises(Exception) as info:
        torch.compile(fn, fullgraph=True, backend="aot_eager")(case.hidden)
    # torch 2.15 chains our error itself; torch 2.11 (verl's pin) names its class only.
    cause = str(info.value.__cause__)
    assert "loss_type: expected one of" in cause or "ArgumentError" in cause, cause
    torch._dynamo.reset()
    with pytest.raises(ha.ArgumentError, match="loss_type"):
        torch.compile(fn, backend="aot_eager")(case.hidden)


def _align_args(reduction, grouping):
    torch.manual_seed(0)
    case = make_case(batch=8, group=4, seq=6, hidden_size=16, grouping=grouping)
    hidden = case.hidden.clone().requires_grad_()
    ids, size = case.group_ids, case.group_size
    return (hidden, case.anchors, case.rewards, ids, size, None, "cosine", reduction, 0.5, 1e-8)


def _opcheck_cases():
    torch.manual_seed(0)
    tau = (0.1,)
    yield "align_forward-mean", OPS.align_forward, _align_args("mean", "ids") + tau
    yield "align_forward-none-labels", OPS.align_forward, _align_args("none", "ids") + tau
    yield "align_forward-none-blocks", OPS.align_forward, _align_args("none", "size") + tau
    fwd_args = _align_args("mean", "ids")
    out = OPS.align_forward(*fwd_args, 0.1)
    hidden, rows, groups, correct = fwd_args[0].detach(), out[5], out[6], out[7]
    state = (out[0].detach(), out[3], out[4], out[8], out[9], out[10], out[11])
    grad = torch.tensor(1.5, dtype=torch.float64)
    bwd = (hidden, rows, groups, correct, grad, *state, "cosine", "mean", 1e-8, 0.1)
    yield "align_backward", OPS.align_backward, bwd
    scores = torch.tensor([1.0, -1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.5])
    ids = torch.tensor([3, 3, 1, 1, 1, 1, 2, 2])
    yield "group_advantages", OPS.group_advantages, (scores, ids, None, 1e-6, True)
    yield "dynamic_sampling_mask", OPS.dynamic_sampling_mask, (scores, None, 2)
    lengths = torch.tensor([3, 10, 18, 20])
    yield "overlong_penalty", OPS.overlong_penalty, (lengths, 20.0, 4.0, 1.0)
    logp, old, adv, mask = policy_case(batch=4, seq=6, dtype=torch.float64)
    logp.requires_grad_()
    clip = (0.2, 0.28, 10.0, 20.0)
    weights = torch.rand(4, 6, dtype=torch.float64)
    inputs = (logp, old, adv, mask, weights, *clip)
    # verl's global normalisers: global_batch_size as a tensor, read where it lives.
    agg = ("seq-mean-token-mean", None, 2, None, None, None, torch.tensor(3.0), None)
    yield "policy_loss_forward", OPS.policy_loss_forward, inputs + agg
    row_scale = OPS.policy_loss_forward(*inputs, *agg)[2]
    grad = torch.tensor(0.5, dtype=torch.float64)
    yield (
        "policy_loss_backward",
        OPS.policy_loss_backward,
        (logp.detach(), *inputs[1:], row_scale, grad),
    )


@pytest.mark.parametrize("name", [c[0] for c in _opcheck_cases()])
def test_opcheck(name):
    """Schema, fake implementation, autograd registration and AOT dispatch of each op."""
    op, args = next((op, args) for n, op, args in _opcheck_cases() if n == name)
    result = torch.library.opcheck(op.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.skipif(
    not ha.cuda_status()["emulation_built"], reason="built without the emulated kernel backend"
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_kernel_backend_under_compile(reduction):
    """The kernel path (CUDA's, run by the emulator): the backward op hands the forward's
    buffers to the kernels, and the group count of `none` comes from the labels."""
    case = make_case(batch=8, group=4, seq=6, hidden_size=16, dtype=torch.float32)

    def fn(hidden):
        out = ha.loss(hidden, case.anchors, case.rewards, reduction=reduction, **case.kwargs())
        if reduction == "none":
            out = (out[0] * torch.arange(1.0, out[0].shape[0] + 1)).sum()
        return out

    def grad_of(f):
        hidden = case.hidden.clone().requires_grad_()
        value = f(hidden)
        value.backward()
        return value.detach(), hidden.grad

    with ha.backend("cuda-emulated"):
        eager = grad_of(fn)
        compiled = grad_of(torch.compile(fn, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled, eager)


_AFTER_FAILED_COMPILE = """
import torch
import hidden_align as ha
from cases import make_case
from test_align_autograd import test_delivery_reuses_the_lm_head_gradient_buffer as in_place

in_place(False)  # the delivery calibrates here, before any compile
case = make_case(batch=8, group=4, seq=6, hidden_size=16)
try:
    torch.compile(
        lambda h: ha.loss(h, case.anchors, case.rewards, group_size=4, loss_type="bogus"),
        fullgraph=True,
        backend="aot_eager",
    )(case.hidden)
except Exception:
    pass
in_place(False)
in_place(True)
"""


def test_in_place_delivery_after_a_failed_compile():
    """A compile that raised can leave torch's frame evaluator installed, which changes how
    Python passes arguments between functions (copied rather than moved references). The
    reference counts behind the in-place delivery must not depend on that: the LM head's
    gradient buffer is still reused afterwards. Run in a fresh process, since the state is
    process-wide."""
    tests = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(
        [sys.executable, "-c", _AFTER_FAILED_COMPILE], cwd=tests, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
