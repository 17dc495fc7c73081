"""The CUDA backend on a real GPU against the CPU backend, on random inputs. Skipped without a
GPU (``hidden_align.cuda_status()`` says why). Every call runs under
``torch.cuda.set_sync_debug_mode("error")``: a host-device synchronisation inside an op fails
(inputs are moved to the GPU before, results read after). Synchronisations that Rust makes
through the driver are invisible to that mode; capturing a step in a CUDA graph catches them.

The ``check_*`` bodies take the device: on a GPU here, and on CPU tensors through the
emulated kernels in ``tests/test_cuda_device_emulated.py`` (tiny shapes)."""

import contextlib
import itertools

import pytest
import torch
from dapo_cases import MODES, clear_of_clip_bounds, policy_case, run_reference
from precision import assert_within_twice_torch_error

import hidden_align as ha
from hidden_align import dapo

from cases import consumer_of, make_case
from reference import alignment_loss

STATUS = ha.cuda_status()
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and STATUS["available"]),
        reason=f"no usable CUDA device: {STATUS.get('reason') or 'torch sees no GPU'}",
    ),
]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@contextlib.contextmanager
def no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def kernels_on(device):
    """Where the CUDA kernels run: a GPU under sync debug mode "error", or the emulator for CPU
    tensors. The reference is always the CPU backend (``ha.backend("cpu")``)."""
    if torch.device(device).type == "cuda":
        with no_sync():
            yield
    else:
        with ha.backend("cuda-emulated"):
            yield


def assert_near(actual, expected, tol):
    """Within ``tol`` relative to each element and to the largest magnitude of ``expected``
    (a plain atol would pass any small gradient)."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    scale = float(expected.abs().nan_to_num().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, atol=tol * (scale or 1.0), rtol=tol, equal_nan=True
    )


def grad_of(fn, x):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    value = out[0] if isinstance(out, tuple) else out
    (g,) = torch.autograd.grad(value.float().sum(), x)
    return value, g


@pytest.mark.parametrize(
    "loss_type,reduction,dtype",
    list(
        itertools.product(
            ["cosine", "centroid", "mse", "contrastive"],
            ["mean", "sum"],
            [torch.float32, torch.bfloat16, torch.float16],
        )
    ),
)
@pytest.mark.parametrize("layout,anchor_form", [("padded", "mask"), ("packed", "index")])
def test_alignment_cuda_matches_cpu(loss_type, reduction, dtype, layout, anchor_form):
    case = make_case(
        batch=64,
        seq=33,
        hidden_size=1000,
        group=8,
        layout=layout,
        anchor_form=anchor_form,
        grouping="ids",
        dtype=dtype,
    )

    def inputs(dev):  # moved before no_sync(): a blocking copy to the GPU is a synchronisation
        kw = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in case.kwargs().items()}
        return case.hidden.to(dev), case.anchors.to(dev), case.rewards.to(dev), kw

    def run(h, args):
        _, anchors, rewards, kw = args
        return ha.loss(h, anchors, rewards, loss_type=loss_type, reduction=reduction, **kw)

    cpu, gpu = inputs("cpu"), inputs("cuda")
    cpu_value, cpu_grad = grad_of(lambda h: run(h, cpu), cpu[0])
    with no_sync():
        gpu_value, gpu_grad = grad_of(lambda h: run(h, gpu), gpu[0])
    if dtype == torch.float32:
        tol = TOL[dtype]
        torch.testing.assert_close(gpu_value.cpu(), cpu_value, atol=tol, rtol=tol)
        torch.testing.assert_close(gpu_grad.cpu(), cpu_grad, atol=tol, rtol=tol)
        return

    # bfloat16/float16: against the float64 reference, within twice PyTorch's own error in the
    # half dtype (tests/precision.py; the CPU backend is held to the same rule there).
    def reference(h):
        return alignment_loss(
            h, case.index, case.rewards, case.labels, loss_type=loss_type, reduction=reduction
        )[0]

    exact, g_exact = grad_of(reference, case.hidden.double())
    low, g_low = grad_of(reference, case.hidden)
    assert_within_twice_torch_error(gpu_value, exact, low, "loss")
    assert_within_twice_torch_error(gpu_grad, g_exact, g_low, "gradient")


def test_alignment_runs_on_the_current_stream_and_is_deterministic():
    """On a user's side stream, ordered as a user orders it: the side stream waits for the
    inputs made on the default stream, then writes ``hidden`` itself behind a delay of a few
    ms (a launch on any other stream would read the zeros ``hidden`` starts as), runs forward
    and backward twice; the default stream waits for it before reading the results, which
    must equal each other bit for bit and the CPU backend's."""
    case = make_case(batch=32, seq=9, hidden_size=512, group=4, dtype=torch.bfloat16)
    ref_value, ref_grad = grad_of(
        lambda h: ha.loss(h, case.anchors, case.rewards, group_ids=case.group_ids), case.hidden
    )
    source, anchors, rewards, ids = (
        t.cuda() for t in (case.hidden, case.anchors, case.rewards, case.group_ids)
    )
    hidden = torch.zeros_like(source)
    side = torch.cuda.Stream()
    with no_sync():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(50_000_000)
            hidden.copy_(source)
            runs = [
                grad_of(lambda h: ha.loss(h, anchors, rewards, group_ids=ids), hidden)
                for _ in range(2)
            ]
        torch.cuda.current_stream().wait_stream(side)
    (value, grad), (again, grad_again) = runs
    assert torch.equal(value, again) and torch.equal(grad, grad_again)
    assert_near(value, ref_value, TOL[torch.bfloat16])
    assert_near(grad, ref_grad, TOL[torch.bfloat16])


def align_inputs(seed, batch, seq, hidden_size, vocab):
    """One step's data for :func:`align_step`: the last layer's input ``x`` and the LM head's
    weight (leaves that require grad), targets, anchor indices, rewards, group ids."""
    torch.manual_seed(seed)
    case = make_case(
        batch=batch,
        seq=seq,
        hidden_size=hidden_size,
        group=4,
        dtype=torch.float32,
        anchor_prob=0.9,
        correct_prob=0.75,
    )
    weight = torch.randn(vocab, hidden_size) / hidden_size**0.5
    targets = torch.randint(vocab, (batch, seq))
    x = case.hidden.requires_grad_()
    return [x, weight.requires_grad_(), targets, case.anchors, case.rewards, case.group_ids]


def align_step(dtype, x, weight, targets, anchors, rewards, group_ids, ptrs=None):
    """A model's last layer (``hidden = tanh(x)`` in ``dtype``) feeding an LM head and
    ``ha.loss``, as in a real step; gradients by ``torch.autograd.grad`` w.r.t. ``x`` and the
    head. With ``ptrs``, records the buffer the head's backward hands ``hidden`` and the one
    ``hidden`` finally receives."""
    hidden = torch.tanh(x).to(dtype)
    logits = hidden.float() @ weight.t()
    lm = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    align, stats = ha.loss(hidden, anchors, rewards, group_ids=group_ids, return_stats=True)
    if ptrs is not None:
        head = consumer_of(logits.grad_fn, hidden.grad_fn)
        head.register_hook(lambda grad_in, _: ptrs.__setitem__("head", grad_in[0].data_ptr()))
        hidden.register_hook(lambda grad: ptrs.__setitem__("delivered", grad.data_ptr()))
    gx, gw = torch.autograd.grad(lm + 0.5 * align, (x, weight))
    return [lm.detach(), align.detach(), stats["mean_cosine"], stats["valid_groups"], gx, gw]


def on_device(tensors, device):
    """Copies of ``tensors`` on ``device``; leaves that require grad stay such leaves."""
    return [t.detach().to(device).requires_grad_(t.requires_grad) for t in tensors]


def check_lm_head_main_path(device, dtype, batch=32, seq=16, hidden_size=256, vocab=128):
    """The main path: ``hidden`` feeds an LM head (a dense gradient) and ``ha.loss``, whose rows
    are added in place into the buffer the head's backward wrote (no copy, no zero-filled
    ``[B, T, H]``). Loss, statistics and gradients against the CPU backend."""
    inputs = align_inputs(0, batch, seq, hidden_size, vocab)
    with ha.backend("cpu"):
        ref = align_step(dtype, *on_device(inputs, "cpu"))
    args, ptrs = on_device(inputs, device), {}
    with kernels_on(device):
        got = align_step(dtype, *args, ptrs=ptrs)
    assert ptrs["delivered"] == ptrs["head"], "the rows were not added in place"
    for name, g, r in zip(["lm", "align", "mean_cosine", "valid", "dx", "dweight"], got, ref):
        assert g.device.type == torch.device(device).type, name
        assert_near(g, r, TOL[dtype])
    assert int(ref[3]) > 0  # some group is valid: the alignment term took part


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lm_head_main_path_matches_cpu(dtype):
    check_lm_head_main_path("cuda", dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_policy_loss_cuda_matches_cpu(mode, dtype):
    logp, old, adv, mask = policy_case(batch=16, seq=5000, dtype=dtype)
    if dtype != torch.float32:  # tokens at a clip bound: see clear_of_clip_bounds
        mask = clear_of_clip_bounds(logp, old, mask)
    kw = dict(loss_agg_mode=mode, dp_size=2, batch_num_tokens=3000.0, global_batch_size=40.0)

    def run(x, args):
        return dapo.policy_loss(x, *args, **kw)

    gpu = [t.cuda() for t in (logp, old, adv, mask)]  # before no_sync(): blocking copies
    cpu_loss, cpu_grad = grad_of(lambda x: run(x, (old, adv, mask)), logp)
    with no_sync():
        gpu_loss, gpu_grad = grad_of(lambda x: run(x, gpu[1:]), gpu[0])
    if dtype == torch.float32:
        tol = TOL[dtype]
        torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, atol=tol, rtol=tol)
        torch.testing.assert_close(gpu_grad.cpu(), cpu_grad, atol=tol, rtol=tol)
        return
    # bfloat16/float16: the rule of tests/precision.py against the float64 reference
    exact_loss, _, exact_grad = run_reference(logp, old, adv, mask, **kw)
    low_loss, _, low_grad = run_reference(logp, old, adv, mask, dtype=dtype, **kw)
    assert_within_twice_torch_error(gpu_loss, exact_loss, low_loss, "loss")
    assert_within_twice_torch_error(gpu_grad, exact_grad, low_grad, "gradient")


def test_policy_loss_tensor_normalisers_stay_on_the_device():
    logp, old, adv, mask = policy_case(batch=8, seq=700)
    x = logp.cuda().requires_grad_()
    gpu = [t.cuda() for t in (old, adv, mask)]
    num_tokens = torch.tensor(2000.0).cuda()
    with no_sync():
        loss, metrics = dapo.policy_loss(x, *gpu, dp_size=4, batch_num_tokens=num_tokens)
        loss.backward()
    ref_x = logp.clone().requires_grad_()
    ref, ref_metrics = dapo.policy_loss(ref_x, old, adv, mask, dp_size=4, batch_num_tokens=2000.0)
    ref.backward()
    torch.testing.assert_close(loss.cpu(), ref, atol=1e-5, rtol=1e-5)
    assert_near(x.grad, ref_x.grad, 1e-5)
    for k in ref_metrics:
        torch.testing.assert_close(metrics[k].cpu(), ref_metrics[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("token_level", [False, True])
def test_small_dapo_ops_cuda_match_cpu(token_level):
    batch = 4096
    scores = torch.randn(batch, 64) if token_level else torch.randn(batch)
    ids = (torch.arange(batch) // 16)[torch.randperm(batch)]
    metric = (scores.sum(-1) if token_level else scores) > 0
    lengths = torch.randint(0, 4200, (batch,))  # past the limit too: the penalty saturates
    on_gpu = [t.cuda() for t in (scores, ids, metric, lengths, lengths.float() + 0.5)]
    with no_sync():
        gpu = dapo.group_advantages(on_gpu[0], group_ids=on_gpu[1])
        keep = dapo.dynamic_sampling_mask(on_gpu[2], group_ids=on_gpu[1])
        pen = dapo.overlong_penalty(on_gpu[3], 4096, 512, 0.5)
        pen_float = dapo.overlong_penalty(on_gpu[4], 4096, 512)
    torch.testing.assert_close(gpu.cpu(), dapo.group_advantages(scores, group_ids=ids))
    assert torch.equal(keep.cpu(), dapo.dynamic_sampling_mask(metric, group_ids=ids))
    assert pen.dtype == torch.float32 and pen.is_cuda
    torch.testing.assert_close(pen.cpu(), dapo.overlong_penalty(lengths, 4096, 512, 0.5))
    torch.testing.assert_close(
        pen_float.cpu(), dapo.overlong_penalty(lengths.float() + 0.5, 4096, 512)
    )


def test_host_group_ids_are_moved_to_the_device():
    """Group ids on the CPU (as ``group_ids_from_uids`` makes them) with CUDA data: copied
    without blocking by every op that takes them, same results as ids on the device."""
    case = make_case(batch=32, seq=9, hidden_size=256, group=4, dtype=torch.float32)
    uids = [f"uid-{int(g)}" for g in case.labels]
    host_ids = dapo.group_ids_from_uids(uids)
    hidden, anchors, rewards = (t.cuda() for t in (case.hidden, case.anchors, case.rewards))
    with no_sync():
        value, grad = grad_of(lambda h: ha.loss(h, anchors, rewards, group_ids=host_ids), hidden)
        adv = dapo.group_advantages(rewards, group_ids=host_ids)
        keep = dapo.dynamic_sampling_mask(rewards, group_ids=host_ids)
        device_ids = dapo.group_ids_from_uids(uids, device="cuda")
    assert device_ids.is_cuda and torch.equal(device_ids.cpu(), host_ids)
    ref_value, ref_grad = grad_of(
        lambda h: ha.loss(h, case.anchors, case.rewards, group_ids=host_ids), case.hidden
    )
    torch.testing.assert_close(value.cpu(), ref_value, atol=1e-5, rtol=1e-5)
    assert_near(grad, ref_grad, 1e-5)
    ref_adv = dapo.group_advantages(case.rewards, group_ids=host_ids)
    torch.testing.assert_close(adv.cpu(), ref_adv)
    assert torch.equal(keep.cpu(), dapo.dynamic_sampling_mask(case.rewards, group_ids=host_ids))


def test_mixed_devices_are_an_error():
    with pytest.raises(ha.DeviceError, match="group_ids"):  # device ids, host data
        dapo.group_advantages(torch.randn(4), group_ids=torch.arange(4).cuda())
    hidden, anchors, ids = torch.randn(4, 3, 8), torch.zeros(4).long(), torch.arange(4)
    with pytest.raises(ha.DeviceError, match="group_ids"):
        ha.loss(hidden, anchors, torch.ones(4), group_ids=ids.cuda())
    with pytest.raises(ha.DeviceError, match="rewards"):  # only group ids are moved
        ha.loss(hidden.cuda(), anchors.cuda(), torch.ones(4), group_ids=ids)
    with pytest.raises(ha.DeviceError, match="response_mask"):
        x = torch.randn(2, 5).cuda()
        dapo.policy_loss(x, x, x, torch.ones(2, 5))


# ---------------------------------------------------------------------------------------------
# CUDA graphs: a capture fails on any host synchronisation or module load, including those the
# Rust side makes through the driver (which set_sync_debug_mode cannot see).


def policy_inputs(seed, dtype, batch, seq):
    """One step's data for :func:`policy_step`: log-probs (a leaf that requires grad), old
    log-probs, advantages, mask and the global token count as a tensor."""
    torch.manual_seed(seed)
    logp, old, adv, mask = policy_case(batch=batch, seq=seq, dtype=dtype)
    if dtype != torch.float32:  # a rounded ratio at a clip bound may go either way
        mask = clear_of_clip_bounds(logp, old, mask, clip_c=3.0)
    num_tokens = (mask.sum() * 2 + seed).float()  # as from another rank: read on the device
    return [logp.requires_grad_(), old, adv, mask, num_tokens]


def policy_step(log_prob, old, adv, mask, num_tokens):
    """``policy_loss`` forward and its gradient by ``torch.autograd.grad``."""
    loss, metrics = dapo.policy_loss(
        log_prob, old, adv, mask, dp_size=2, batch_num_tokens=num_tokens, clip_ratio_c=3.0
    )
    (grad,) = torch.autograd.grad(loss, log_prob)
    return [loss.detach(), *metrics.values(), grad]


def check_replay(device, make_inputs, step, tol):
    """``step(*static)`` on static inputs, captured in a CUDA graph on a GPU (warm-up on a side
    stream first, as PyTorch documents), then fed two new batches by copying them into the
    static inputs and replaying: each result against the CPU backend on that batch. On the
    emulator (CPU tensors) the step is called where a GPU replays it."""
    static = on_device(make_inputs(0), device)
    if torch.device(device).type == "cuda":
        ha.prepare_cuda(device)
        side = torch.cuda.Stream()
        with no_sync():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step(*static)
            torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = step(*static)

        def run():
            graph.replay()
            return outputs

    else:

        def run():
            with ha.backend("cuda-emulated"):
                return step(*static)

    for seed in (1, 2):
        batch = make_inputs(seed)
        with torch.no_grad():
            for s, new in zip(static, batch):
                s.copy_(new)
        got = [t.cpu() for t in run()]
        with ha.backend("cpu"):
            ref = step(*on_device(batch, "cpu"))
        assert len(got) == len(ref)
        for i, (g, r) in enumerate(zip(got, ref)):
            assert g.shape == r.shape and g.dtype == r.dtype, i
            try:
                assert_near(g, r, tol)
            except AssertionError as e:
                raise AssertionError(f"output {i} of batch {seed}: {e}") from None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_alignment_step_in_a_cuda_graph(dtype):
    check_replay(
        "cuda",
        lambda seed: align_inputs(seed, batch=32, seq=16, hidden_size=256, vocab=128),
        lambda *a: align_step(dtype, *a),
        TOL[dtype],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_policy_loss_in_a_cuda_graph(dtype):
    check_replay(
        "cuda",
        lambda seed: policy_inputs(seed, dtype, batch=8, seq=3000),
        policy_step,
        TOL[dtype],
    )
