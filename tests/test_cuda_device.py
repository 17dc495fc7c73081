"""The CUDA backend on a real GPU against the CPU backend, on random inputs. Skipped without a
GPU (``hidden_align.cuda_status()`` says why). Every call runs under
``torch.cuda.set_sync_debug_mode("error")``: a host-device synchronisation inside an op fails."""

import contextlib
import itertools

import pytest
import torch
from dapo_cases import MODES, policy_case

import hidden_align as ha
from hidden_align import dapo

from cases import make_case

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

    def run(h, dev):
        kw = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in case.kwargs().items()}
        return ha.loss(
            h,
            case.anchors.to(dev),
            case.rewards.to(dev),
            loss_type=loss_type,
            reduction=reduction,
            **kw,
        )

    cpu_value, cpu_grad = grad_of(lambda h: run(h, "cpu"), case.hidden)
    with no_sync():
        gpu_value, gpu_grad = grad_of(lambda h: run(h, "cuda"), case.hidden.cuda())
    tol = TOL[dtype]
    torch.testing.assert_close(gpu_value.cpu(), cpu_value, atol=tol, rtol=tol)
    torch.testing.assert_close(gpu_grad.cpu().float(), cpu_grad.float(), atol=tol, rtol=tol)


def test_alignment_runs_on_the_current_stream_and_is_deterministic():
    case = make_case(batch=32, seq=9, hidden_size=512, group=4, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    h = case.hidden.cuda()
    with torch.cuda.stream(stream):
        a = ha.loss(h, case.anchors.cuda(), case.rewards.cuda(), group_ids=case.group_ids.cuda())
        b = ha.loss(h, case.anchors.cuda(), case.rewards.cuda(), group_ids=case.group_ids.cuda())
    stream.synchronize()
    assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_policy_loss_cuda_matches_cpu(mode, dtype):
    logp, old, adv, mask = policy_case(batch=16, seq=5000, dtype=dtype)
    kw = dict(loss_agg_mode=mode, dp_size=2, batch_num_tokens=3000.0, global_batch_size=40.0)

    def run(x, dev):
        return dapo.policy_loss(x, old.to(dev), adv.to(dev), mask.to(dev), **kw)

    cpu_loss, cpu_grad = grad_of(lambda x: run(x, "cpu"), logp)
    with no_sync():
        gpu_loss, gpu_grad = grad_of(lambda x: run(x, "cuda"), logp.cuda())
    tol = TOL[dtype]
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, atol=tol, rtol=tol)
    torch.testing.assert_close(gpu_grad.cpu().float(), cpu_grad.float(), atol=tol, rtol=tol)


def test_policy_loss_tensor_normalisers_stay_on_the_device():
    logp, old, adv, mask = policy_case(batch=8, seq=700)
    x = logp.cuda().requires_grad_()
    with no_sync():
        loss, metrics = dapo.policy_loss(
            x,
            old.cuda(),
            adv.cuda(),
            mask.cuda(),
            dp_size=4,
            batch_num_tokens=torch.tensor(2000.0, device="cuda"),
        )
        loss.backward()
    ref, _ = dapo.policy_loss(logp, old, adv, mask, dp_size=4, batch_num_tokens=2000.0)
    torch.testing.assert_close(loss.cpu(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("token_level", [False, True])
def test_small_dapo_ops_cuda_match_cpu(token_level):
    batch = 4096
    scores = torch.randn(batch, 64) if token_level else torch.randn(batch)
    ids = (torch.arange(batch) // 16)[torch.randperm(batch)]
    with no_sync():
        gpu = dapo.group_advantages(scores.cuda(), group_ids=ids.cuda())
        keep = dapo.dynamic_sampling_mask(
            (scores.sum(-1) if token_level else scores).cuda() > 0, group_ids=ids.cuda()
        )
        pen = dapo.overlong_penalty(torch.randint(0, 4096, (batch,)).cuda(), 4096, 512)
    torch.testing.assert_close(gpu.cpu(), dapo.group_advantages(scores, group_ids=ids))
    cpu_keep = dapo.dynamic_sampling_mask(
        (scores.sum(-1) if token_level else scores) > 0, group_ids=ids
    )
    assert torch.equal(keep.cpu(), cpu_keep)
    assert pen.dtype == torch.float32 and pen.is_cuda


def test_mixed_devices_are_an_error():
    with pytest.raises(ha.DeviceError):
        dapo.group_advantages(torch.randn(4).cuda(), group_ids=torch.arange(4))
