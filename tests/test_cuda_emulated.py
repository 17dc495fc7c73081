"""The CUDA kernels of kernels/*.cu, executed on the CPU by the emulation build
(``backend="cuda-emulated"``) through the same Rust launch code as on a GPU, against the float64
references and the CPU backend. Shapes are small: every CUDA thread is a CPU thread here."""

import itertools

import pytest
import torch
from dapo_cases import (
    MODES,
    NORMALISERS,
    assert_matches,
    clear_of_clip_bounds,
    policy_case,
    run_ours,
    run_reference,
    with_garbage,
)
from precision import assert_within_twice_torch_error

import hidden_align as ha
from hidden_align import dapo

from cases import make_case
from reference import alignment_loss, dynamic_sampling, grpo_advantages, overlong

pytestmark = pytest.mark.skipif(
    not ha.cuda_status()["emulation_built"],
    reason="this build has no emulated CUDA backend: install with "
    'MATURIN_PEP517_ARGS="--features emulation" pip install -e . (as scripts/test.sh does)',
)

# float32 tolerance against the float64 reference (inputs are rounded to the dtype before the
# reference sees them, so only the float32 arithmetic remains). bfloat16 and float16 results are
# held to the rule of tests/precision.py: at most twice PyTorch's own half-precision error.
TOL = 2e-5
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def emulated():
    with ha.backend("cuda-emulated"):
        yield


def on_backend(name, fn, *args, **kwargs):
    with ha.backend(name):
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Alignment loss


def with_odd_offset(hidden: torch.Tensor) -> torch.Tensor:
    """The same values in a view whose storage starts at an odd element offset (for a 2-byte
    dtype, an address 2 past a multiple of 4: misaligned for 4-byte loads) and whose rows are not
    contiguous with each other; the row stride is even, so every row starts misaligned."""
    width = hidden.shape[-1]
    stride = width + 3 + (width + 3) % 2
    flat = torch.zeros(1 + hidden.numel() // width * stride, dtype=hidden.dtype)
    view = flat[1:].view(*hidden.shape[:-1], stride)[..., :width]
    view.copy_(hidden)
    assert view.storage_offset() % 2 == 1 and view.stride(-2) % 2 == 0
    if view.element_size() == 2:
        assert view.data_ptr() % 4 == 2
    return view


def run_align(case, hidden, loss_type, reduction, **extra):
    # A tensor that requires grad is used as it is (a clone would drop an odd offset's layout).
    h = hidden if hidden.requires_grad else hidden.detach().clone().requires_grad_()
    result, stats = ha.loss(
        h,
        case.anchors,
        case.rewards,
        loss_type=loss_type,
        reduction=reduction,
        return_stats=True,
        **case.kwargs(),
        **extra,
    )
    value = result[0] if reduction == "none" else result
    weights = torch.linspace(0.5, 1.5, value.numel()).reshape(value.shape)
    (grad,) = torch.autograd.grad((value * weights).sum(), h)
    return result, stats, grad


def reference_align(case, hidden, loss_type, reduction, dtype=torch.float64):
    """The reference in float64 (exact), or in hidden's half dtype (PyTorch's own low-precision
    result, the yardstick of tests/precision.py)."""
    h = hidden.detach().to(dtype).requires_grad_()
    result, stats = alignment_loss(
        h, case.index, case.rewards, case.labels, loss_type=loss_type, reduction=reduction
    )
    value = result[0] if reduction == "none" else result
    weights = torch.linspace(0.5, 1.5, value.numel()).reshape(value.shape).to(dtype)
    grad = torch.autograd.grad((value * weights).sum(), h, allow_unused=True)[0]
    return result, stats, torch.zeros_like(h) if grad is None else grad


def assert_align_close(ours, ref, tol, low=None):
    """ours against the float64 reference: within tol, or, given PyTorch's half-precision result
    `low`, within twice its error (tests/precision.py)."""
    result, stats, grad = ours
    rresult, rstats, rgrad = ref

    def check(name, x, exact, yardstick, reject_zero=True):
        if low is None:
            torch.testing.assert_close(
                x.double(), exact.detach().double(), atol=tol, rtol=tol, equal_nan=True
            )
        else:
            assert_within_twice_torch_error(x, exact, yardstick, name, reject_zero=reject_zero)

    lresult, lstats, lgrad = low if low is not None else (rresult, rstats, rgrad)
    if isinstance(result, tuple):
        check("per-group loss", result[0], rresult[0], lresult[0])
        assert torch.equal(result[1], rresult[1])
    else:
        check("loss", result, rresult, lresult)
    for k in ("valid_groups", "anchored_correct"):
        assert int(stats[k]) == int(rstats[k]), k
    # the mean cosine of random states may be near zero: no zero-rejection check for it
    check("mean_cosine", stats["mean_cosine"], rstats["mean_cosine"], lstats["mean_cosine"], False)
    check("gradient", grad, rgrad, lgrad)


LAYOUTS = [("padded", "index"), ("padded", "mask"), ("packed", "index"), ("packed", "mask")]


@pytest.mark.parametrize(
    "loss_type,reduction",
    list(itertools.product(["cosine", "centroid", "mse", "contrastive"], ["mean", "sum", "none"])),
)
@pytest.mark.parametrize("layout,anchor_form", LAYOUTS)
def test_alignment_matches_reference(emulated, loss_type, reduction, layout, anchor_form):
    case = make_case(
        batch=10,
        seq=6,
        hidden_size=37,
        group=5,
        layout=layout,
        anchor_form=anchor_form,
        grouping="ids",
        dtype=torch.float32,
    )
    ours = run_align(case, case.hidden, loss_type, reduction)
    ref = reference_align(case, case.hidden, loss_type, reduction)
    assert_align_close(ours, ref, TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", ["cosine", "centroid", "mse", "contrastive"])
def test_alignment_dtypes_and_odd_offsets(emulated, dtype, loss_type):
    # H = 300: more features than threads, not a multiple of the warp or block size.
    case = make_case(
        batch=8, seq=5, hidden_size=300, group=4, grouping="size", dtype=dtype, correct_prob=0.7
    )
    hidden = with_odd_offset(case.hidden).detach().requires_grad_()
    assert hidden.storage_offset() % 2 == 1
    ours = run_align(case, hidden, loss_type, "mean")
    ref = reference_align(case, case.hidden, loss_type, "mean")
    assert ours[2].dtype == dtype
    if dtype == torch.float32:
        assert_align_close(ours, ref, TOL)
    else:
        low = reference_align(case, case.hidden, loss_type, "mean", dtype=dtype)
        assert_align_close(ours, ref, None, low=low)


def test_alignment_matches_cpu_backend_and_is_deterministic(emulated):
    case = make_case(batch=12, seq=4, hidden_size=70, group=4, grouping="ids", dtype=torch.float32)
    first = run_align(case, case.hidden, "contrastive", "none")
    again = run_align(case, case.hidden, "contrastive", "none")
    assert torch.equal(first[0][0], again[0][0]) and torch.equal(first[2], again[2])
    cpu = on_backend("cpu", run_align, case, case.hidden, "contrastive", "none")
    torch.testing.assert_close(first[0][0], cpu[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first[2], cpu[2], atol=1e-5, rtol=1e-5)


def test_alignment_group_edge_cases(emulated):
    # groups with 0, 1, 2 and all correct; one rollout without anchor; a norm under eps.
    correct = [1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1]
    case = make_case(
        batch=16,
        seq=3,
        hidden_size=9,
        group=4,
        grouping="ids",
        dtype=torch.float32,
        correct=correct,
        anchor_prob=1.0,
    )
    hidden = case.hidden.clone()
    hidden[int(case.index[12]) // 3, int(case.index[12]) % 3] = 1e-12
    for loss_type in ("cosine", "centroid", "mse", "contrastive"):
        ours = run_align(case, hidden, loss_type, "none")
        ref = reference_align(case, hidden, loss_type, "none")
        assert_align_close(ours, ref, 1e-4)


def test_invalid_anchor_gives_nan_not_a_memory_error(emulated):
    h = torch.randn(4, 5, 8)
    bad = torch.tensor([1, 7, 2, 3])  # 7 is past T
    loss = ha.loss(h, bad, torch.ones(4), group_size=2)
    assert torch.isnan(loss)
    two = torch.zeros(4, 5, dtype=torch.bool)
    two[:, 1] = True
    two[0, 3] = True  # two anchors in row 0
    assert torch.isnan(ha.loss(h, two, torch.ones(4), group_size=2))


def test_no_anchors_and_no_valid_group(emulated):
    h = torch.randn(4, 5, 8, requires_grad=True)
    loss, stats = ha.loss(h, torch.full((4,), -1), torch.ones(4), group_size=2, return_stats=True)
    assert loss.item() == 0.0 and torch.isnan(stats["mean_cosine"])
    loss.backward()
    assert torch.count_nonzero(h.grad) == 0


def test_empty_batch_writes_its_results(emulated):
    # An empty batch launches one block, so the (recycled, on a GPU) outputs are written.
    for reduction in ("mean", "sum"):
        h = torch.randn(0, 5, 8, requires_grad=True)
        loss, stats = ha.loss(
            h,
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0),
            group_size=1,
            reduction=reduction,
            return_stats=True,
        )
        assert loss.item() == 0.0 and torch.isnan(stats["mean_cosine"])
        assert stats["valid_groups"].item() == 0 and stats["anchored_correct"].item() == 0
        loss.backward()
    loss, metrics = dapo.policy_loss(
        torch.zeros(0, 7), torch.zeros(0, 7), torch.zeros(0), torch.zeros(0, 7)
    )
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in metrics.values())


def test_scatter_add_rows_rejects_overlapping_rows():
    from hidden_align import _native

    dst = torch.zeros(1, 4).expand(3, 4)  # three rows sharing one storage row
    with pytest.raises(ha.ArgumentError, match="overlapping"):
        _native.scatter_add_rows(dst, torch.tensor([0, 1]), torch.ones(2, 4))


def test_scatter_add_rows_duplicates_and_skips(emulated):
    from hidden_align import _native

    dst = torch.randn(3, 4, 33).to(torch.bfloat16)
    rows = torch.tensor([5, -1, 5, 0, 11])
    vals = torch.randn(5, 33)
    expected = dst.float().reshape(12, 33).clone()
    for j, r in enumerate(rows.tolist()):
        if r >= 0:
            expected[r] = (expected[r] + vals[j]).to(torch.bfloat16).float()
    _native.scatter_add_rows(dst, rows, vals, torch.empty(4 * 5, dtype=torch.int32))
    assert torch.equal(dst.float().reshape(12, 33), expected)


def test_scatter_add_rows_many_repeats_in_order(emulated):
    """More rows than threads in the block that sorts them; every row repeated, in scrambled
    order: each row's additions still happen in order of j, rounded after each one."""
    from hidden_align import _native

    k = 300
    dst = torch.randn(7, 5).to(torch.bfloat16)
    rows = (torch.arange(k) * 11) % 7
    rows[::13] = -1
    vals = torch.randn(k, 5)
    expected = dst.float().clone()
    for j, r in enumerate(rows.tolist()):
        if r >= 0:
            expected[r] = (expected[r] + vals[j]).to(torch.bfloat16).float()
    _native.scatter_add_rows(dst, rows, vals, torch.empty(4 * k, dtype=torch.int32))
    assert torch.equal(dst.float(), expected)


# ---------------------------------------------------------------------------------------------
# DAPO


@pytest.mark.parametrize("mode,norm", list(itertools.product(MODES, range(len(NORMALISERS)))))
@pytest.mark.parametrize("per_rollout_adv", [False, True])
def test_policy_loss_matches_reference(emulated, mode, norm, per_rollout_adv):
    logp, old, adv, mask = policy_case(batch=5, seq=40, per_rollout_adv=per_rollout_adv)
    kw = dict(loss_agg_mode=mode, **NORMALISERS[norm])
    assert_matches(
        run_ours(logp, old, adv, mask, **kw),
        run_reference(logp, old, adv, mask, **kw),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_policy_loss_dtypes_weights_garbage_and_chunks(emulated, dtype):
    # 2100 columns: three column chunks per row (the last partial); an interior (non-prefix)
    # mask; weights; NaN at masked positions; inputs at odd storage offsets.
    logp, old, adv, mask = policy_case(batch=3, seq=2100, dtype=dtype, masked_rows=(1,))
    mask = mask & (torch.rand(mask.shape) > 0.2)
    if dtype != torch.float32:
        mask = clear_of_clip_bounds(logp, old, mask)
    weights = torch.rand(logp.shape).to(dtype)
    dirty = [with_odd_offset(with_garbage(t, mask)).detach() for t in (logp, old, adv)]
    assert all(t.storage_offset() % 2 == 1 for t in dirty)
    kw = dict(loss_agg_mode="seq-mean-token-mean", rollout_is_weights=weights)
    odd_kw = {**kw, "rollout_is_weights": with_odd_offset(weights)}
    ours = run_ours(dirty[0].requires_grad_(), *dirty[1:], mask, **odd_kw)
    assert ours[2].dtype == dtype and torch.all(ours[2][~mask] == 0)
    ref = run_reference(logp, old, adv, mask, **kw)
    if dtype == torch.float32:
        assert_matches(ours, ref, atol=2 * TOL, rtol=2 * TOL)
        return
    loss, metrics, grad = ours
    low_loss, low_metrics, low_grad = run_reference(logp, old, adv, mask, dtype=dtype, **kw)
    assert_within_twice_torch_error(loss, ref[0], low_loss, "loss")
    for k in ref[1]:
        # ppo_kl (a mean log-ratio) may be near zero: no zero-rejection check for the metrics
        assert_within_twice_torch_error(metrics[k], ref[1][k], low_metrics[k], k, reject_zero=False)
    assert_within_twice_torch_error(grad, ref[2], low_grad, "gradient")


def test_policy_loss_matches_cpu_backend_with_tensor_normalisers(emulated):
    logp, old, adv, mask = policy_case(batch=6, seq=300, masked_rows=())
    mask = mask & (torch.rand(mask.shape) > 0.3)
    kw = dict(
        loss_agg_mode="token-mean",
        dp_size=2,
        batch_num_tokens=torch.tensor(500.0),
        clip_ratio_c=3.0,
        log_ratio_clamp=None,
    )
    ours = run_ours(logp, old, adv, mask.to(torch.float32), **kw)
    cpu = on_backend("cpu", run_ours, logp, old, adv, mask.to(torch.float32), **kw)
    cpu64 = (cpu[0].double(), {k: v.double() for k, v in cpu[1].items()}, cpu[2].double())
    assert_matches(ours, cpu64, atol=1e-6, rtol=1e-6)
    again = run_ours(logp, old, adv, mask.to(torch.float32), **kw)
    assert torch.equal(ours[0], again[0]) and torch.equal(ours[2], again[2])


def test_policy_backward_without_saved_factor(emulated):
    logp, old, adv, mask = policy_case(batch=4, seq=50)
    x = logp.clone().requires_grad_()
    loss, _ = dapo.policy_loss(x, old, adv, mask)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 3, x)  # second backward recomputes the token math
    torch.testing.assert_close(g2, 3 * g1, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("grouping", ["ids", "size"])
@pytest.mark.parametrize("token_level", [False, True])
def test_group_advantages(emulated, grouping, token_level):
    batch = 40  # partial warps and blocks: threads past B return at once
    scores = torch.randn(batch, 7) if token_level else torch.randn(batch)
    labels = torch.arange(batch) // 5
    if grouping == "ids":
        labels = labels[torch.randperm(batch)] * 13 - 4
        kw = {"group_ids": labels}
    else:
        kw = {"group_size": 5}
    for norm_by_std in (True, False):
        ours = dapo.group_advantages(scores, norm_by_std=norm_by_std, **kw)
        ref = grpo_advantages(scores, labels, norm_by_std=norm_by_std)
        torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)
        cpu = on_backend("cpu", dapo.group_advantages, scores, norm_by_std=norm_by_std, **kw)
        assert torch.equal(ours, cpu)


def test_group_advantages_singletons(emulated):
    scores = torch.tensor([1.0, 2.0, 3.0])
    ours = dapo.group_advantages(scores, group_ids=torch.tensor([4, 5, 4], dtype=torch.int32))
    torch.testing.assert_close(ours.double(), grpo_advantages(scores, torch.tensor([4, 5, 4])))


def test_dynamic_sampling_and_overlong(emulated):
    metric = torch.tensor([1.0, 1.0, 0.0, 1.0, float("nan"), 1.0, 2.0])
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    ours = dapo.dynamic_sampling_mask(metric, group_ids=labels)
    expected = dynamic_sampling(torch.nan_to_num(metric, nan=0.5), labels)
    expected[4:6] = False  # a NaN metric drops its group
    assert torch.equal(ours, expected)
    ints = torch.tensor([3, 3, 1, 0], dtype=torch.int32)
    assert torch.equal(
        dapo.dynamic_sampling_mask(ints, group_size=2), torch.tensor([False, False, True, True])
    )
    lengths = torch.tensor([10, 18, 20, 33, 17])
    torch.testing.assert_close(
        dapo.overlong_penalty(lengths, 20, 4).double(), overlong(lengths, 20, 4)
    )


# ---------------------------------------------------------------------------------------------
# Backend selection


def test_float64_is_cpu_only_on_the_kernel_backend(emulated):
    with pytest.raises(ha.DtypeError, match="float64 runs on the CPU backend only"):
        ha.loss(
            torch.randn(2, 3, 4, dtype=torch.float64),
            torch.tensor([0, 1]),
            torch.ones(2),
            group_size=2,
        )


def test_backend_names_and_device_mismatch():
    with pytest.raises(ha.ArgumentError, match="backend"):
        ha.set_backend("tpu")
    with ha.backend("cuda"):
        assert ha.get_backend() == "cuda"
        with pytest.raises(ha.DeviceError, match="a CUDA device"):
            dapo.overlong_penalty(torch.tensor([1, 2]), 20, 4)
    assert ha.get_backend() == "auto"


def test_cuda_status_says_why():
    status = ha.cuda_status()
    for key in ("driver_found", "nvrtc_found", "available", "reason", "emulation_built"):
        assert key in status
    if not status["available"]:
        assert isinstance(status["reason"], str) and status["reason"]


def test_concurrent_blocks_give_the_bits_of_blocks_in_sequence(emulated):
    """Blocks of a launch running at once (the cross-block ticket and volatile reads under real
    concurrency) give exactly what blocks one after another give."""
    from hidden_align import _native

    case = make_case(batch=24, group=4, seq=5, hidden_size=40, dtype=torch.float32)
    logp, old, adv, mask = policy_case(batch=6, seq=2100, per_rollout_adv=False)
    before = ha.cuda_status()["emulated_blocks"]
    results = []
    try:
        for blocks in (1, 4):
            _native.set_emulated_blocks(blocks)
            assert ha.cuda_status()["emulated_blocks"] == blocks
            align = run_align(case, case.hidden, "contrastive", "mean")
            policy = run_ours(logp, old, adv, mask, loss_agg_mode="token-mean")
            results.append((align[0], align[2], policy))
    finally:
        _native.set_emulated_blocks(before)
    (a1, g1, p1), (a4, g4, p4) = results
    assert torch.equal(a1, a4) and torch.equal(g1, g4)
    for x, y in zip(torch.utils._pytree.tree_leaves(p1), torch.utils._pytree.tree_leaves(p4)):
        assert torch.equal(x, y)
    with pytest.raises(ha.ArgumentError, match="blocks"):
        _native.set_emulated_blocks(0)
