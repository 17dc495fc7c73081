"""Property-based tests (hypothesis) of every public op, over random shapes, memory layouts
(contiguous, transposed, strided views at storage offsets, zero-stride and overlapping views),
dtypes and group structures (contiguous blocks, shuffled int64/int32 labels anywhere in int64,
singleton groups, groups with no, one, some or all correct rollouts, rollouts without anchor).

Properties:

* ``ha.loss``: value, statistics and gradient w.r.t. ``hidden`` equal the float64 reference of
  tests/reference.py (every loss type and reduction, anchors as indices or masks, padded and
  packed); bfloat16/float16 within twice PyTorch's own half-precision error (tests/precision.py).
  The ``cosine`` loss lies in [0, 2]. Permuting rollouts together with their group ids, anchors
  and rewards leaves every loss type's value unchanged and permutes the gradient rows. Positive
  scales of the anchor rows leave the losses of unit vectors (cosine, centroid, contrastive)
  unchanged (bitwise for powers of two). Anything outside the anchors (NaN, +-inf, huge) changes
  no result bit.
* ``ha.dapo``: ``group_advantages``, ``dynamic_sampling_mask``, ``overlong_penalty`` and
  ``policy_loss`` (value, metrics, gradient; every aggregation mode, clip options, normalisers
  as numbers or tensors, weights) equal the references; garbage outside ``response_mask``
  changes no result bit.
* ``ha.find_anchors`` equals ``reference.find_anchors_loop``; ``ha.unpadded_rows`` equals an
  explicit loop; merged ``ha.group_anchor_stats`` of any split equal the whole batch's; the
  shares ``ha.loss(..., reference=...)`` of any split sum to the full-batch value and gradient.
* A subset on ``ha.backend("cuda-emulated")`` (the CUDA kernels run on the CPU) with small
  shapes.

Examples are derandomized (the same on every run). To run more of them, scale every test's
``max_examples``: ``HIDDEN_ALIGN_HYPOTHESIS_EXAMPLES=20 python -m pytest tests/test_properties.py``
(a factor; the default 1 keeps the file to about a minute on two cores).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from dapo_cases import run_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from precision import assert_within_twice_torch_error
from strategies import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    INJECTIVE_LAYOUTS,
    Grouping,
    align_cases,
    groupings,
    lay_out,
    policy_cases,
    select,
    splits,
    with_hidden,
)

import hidden_align as ha
from hidden_align import dapo

from reference import (
    alignment_loss,
    dynamic_sampling,
    find_anchors_loop,
    grpo_advantages,
    overlong,
)

SCALE = float(os.environ.get("HIDDEN_ALIGN_HYPOTHESIS_EXAMPLES", "1"))
LOSS_TYPES = ["cosine", "centroid", "mse", "contrastive"]
SPLIT_TYPES = ["cosine", "centroid", "mse"]
UNIT_TYPES = ["cosine", "centroid", "contrastive"]  # losses of the unit anchor vectors only
REDUCTIONS = ["mean", "sum", "none"]
EMULATED = ha.cuda_status()["emulation_built"]
needs_emulation = pytest.mark.skipif(
    not EMULATED, reason="this build has no emulated CUDA backend (see README, CUDA section)"
)

# Against the float64 reference (tests/test_align.py, tests/test_align_precision.py): float64
# to rounding; float32 values and gradients to float32 accumulation.
VALUE_TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-5, 1e-5)}
GRAD_TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-5, 1e-4)}


def examples(n: int):
    return settings(
        max_examples=max(1, math.ceil(n * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=False,
    )


def same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal dtype, shape and every value (NaN where the other has NaN)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def close_runs(a: torch.Tensor, b: torch.Tensor, like: torch.dtype) -> None:
    """Two of our results for inputs of dtype ``like`` that differ only in summation order:
    float32/float64 accumulation rounding; a bfloat16/float16 gradient also one rounding to
    its dtype."""
    if like == torch.float64:
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, equal_nan=True)
    elif a.dtype in HALF_DTYPES:
        ulp = torch.finfo(a.dtype).eps
        scale = b.detach().float().abs().nan_to_num(0).max().item() if b.numel() else 0.0
        torch.testing.assert_close(
            a.float(), b.float(), atol=2 * ulp * scale + 1e-6, rtol=2 * ulp, equal_nan=True
        )
    else:
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# The alignment loss against the float64 reference


def weights_for(value: torch.Tensor) -> torch.Tensor:
    """Distinct weights of the per-group values (a loss scalar gets weight 1)."""
    return torch.linspace(0.5, 1.5, value.numel(), dtype=value.dtype).reshape(value.shape)


def run_loss(case, hidden, loss_type, reduction, **extra):
    """Ours: ``(result, stats, grad)``, the gradient of the (weighted) loss w.r.t. ``hidden``
    itself (``detach`` keeps its strides and storage offset)."""
    h = hidden.detach().requires_grad_()
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
    (grad,) = torch.autograd.grad((value * weights_for(value)).sum(), h)
    assert type(grad) is torch.Tensor and grad.shape == h.shape and grad.dtype == h.dtype
    return result, stats, grad


def run_reference_loss(case, loss_type, reduction, dtype=torch.float64, **extra):
    """The reference computed in ``dtype``: float64 (exact), or hidden's half dtype (PyTorch's
    own low-precision result, the yardstick of tests/precision.py)."""
    h = case.hidden.detach().to(dtype).requires_grad_()
    result, stats = alignment_loss(
        h,
        case.index,
        case.rewards,
        case.labels,
        loss_type=loss_type,
        reduction=reduction,
        **extra,
    )
    value = result[0] if reduction == "none" else result
    scalar = (value * weights_for(value)).sum()
    grad = None
    if scalar.requires_grad:
        grad = torch.autograd.grad(scalar, h, allow_unused=True)[0]
    return result, stats, torch.zeros_like(h) if grad is None else grad


def check_loss_against_reference(case, loss_type, reduction, **extra):
    dtype = case.hidden.dtype
    result, stats, grad = run_loss(case, case.hidden, loss_type, reduction, **extra)
    rresult, rstats, rgrad = run_reference_loss(case, loss_type, reduction, **extra)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if reduction == "none":
        value, rvalue = result[0], rresult[0]
        assert torch.equal(result[1], rresult[1])
    else:
        value, rvalue = result, rresult
        assert value.shape == ()
    assert value.dtype == acc
    assert int(stats["valid_groups"]) == rstats["valid_groups"]
    assert int(stats["anchored_correct"]) == rstats["anchored_correct"]
    pairs = [
        ("loss", value, rvalue.detach(), VALUE_TOL),
        ("mean_cosine", stats["mean_cosine"], rstats["mean_cosine"].double(), VALUE_TOL),
        ("gradient", grad, rgrad, GRAD_TOL),
    ]
    if dtype not in HALF_DTYPES:
        for _, ours, exact, tol in pairs:
            atol, rtol = tol[dtype]
            torch.testing.assert_close(
                ours.double(), exact.double(), atol=atol, rtol=rtol, equal_nan=True
            )
        return
    low_result, low_stats, low_grad = run_reference_loss(
        case, loss_type, reduction, dtype=dtype, **extra
    )
    low = {
        "loss": low_result[0] if reduction == "none" else low_result,
        "mean_cosine": low_stats["mean_cosine"],
        "gradient": low_grad,
    }
    for name, ours, exact, _ in pairs:
        # Small random cases have results near zero (a loss of nearly parallel states, a mean
        # cosine of random ones) that no half-precision yardstick resolves: the bound is not
        # also required to lie below the result's size.
        assert_within_twice_torch_error(ours, exact, low[name], name, reject_zero=False)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@examples(30)
@given(data=st.data(), loss_type=st.sampled_from(LOSS_TYPES), reduction=st.sampled_from(REDUCTIONS))
def test_loss_matches_reference(dtype, data, loss_type, reduction):
    case = data.draw(align_cases(dtypes=(dtype,)), label="case")
    check_loss_against_reference(case, loss_type, reduction)


@examples(25)
@given(
    case=align_cases(dtypes=(torch.float64,), max_hidden=9),
    loss_type=st.sampled_from(LOSS_TYPES),
    reduction=st.sampled_from(REDUCTIONS),
    threshold=st.sampled_from([0.5, 0.0, 0.9]),
    eps=st.sampled_from([1e-8, 1e-3, 0.5]),
    tau=st.sampled_from([0.1, 0.5, 2.0]),
)
def test_loss_options_match_reference(case, loss_type, reduction, threshold, eps, tau):
    """threshold, eps (including norms clamped by a large eps) and tau reach the formulas."""
    check_loss_against_reference(case, loss_type, reduction, threshold=threshold, eps=eps, tau=tau)


# ---------------------------------------------------------------------------------------------
# Invariants of the alignment loss


@examples(50)
@given(case=align_cases(states=("random", "parallel", "identical", "opposed")))
def test_cosine_loss_lies_in_0_2(case):
    """1 - cos lies in [0, 2] for every pair, so every group's mean and the mean over groups
    do, also when all cosines are +-1 (identical, parallel and opposed states), up to a few
    units of rounding of the accumulator: the loss is 1 - (||S||^2 - sum ||u||^2) / (n (n - 1))
    (test_cosine_loss_of_identical_states_is_not_negative shows the exact bound)."""
    acc = torch.float64 if case.hidden.dtype == torch.float64 else torch.float32
    slack = 16 * torch.finfo(acc).eps
    value, stats = ha.loss(
        case.hidden, case.anchors, case.rewards, return_stats=True, **case.kwargs()
    )
    per_group, valid = ha.loss(
        case.hidden, case.anchors, case.rewards, reduction="none", **case.kwargs()
    )
    for v in (value.reshape(1), per_group):
        assert torch.all((v >= -slack) & (v <= 2 + slack)), v
    assert torch.all(per_group[~valid] == 0)
    if valid.any():
        assert -1 - slack <= stats["mean_cosine"].item() <= 1 + slack


@pytest.mark.parametrize("backend", ["cpu", "cuda-emulated"])
def test_cosine_loss_of_identical_states_is_not_negative(backend):
    """Rounding can push the group's pairwise cosine a few ulps past 1 for identical anchor
    states; it is held to [-1, 1], so the loss stays in [0, 2] and mean_cosine in [-1, 1]."""
    if backend == "cuda-emulated" and not ha.cuda_status()["emulation_built"]:
        pytest.skip("this build has no emulated CUDA backend")
    gen = torch.Generator().manual_seed(0)
    values, cosines = [], []
    with ha.backend(backend):
        for width in (3, 7, 16, 33):
            for n in (2, 3, 4, 8):
                state = torch.randn(width, generator=gen)
                hidden = state.expand(n, 1, width)  # n rollouts, one position, the same state
                value, stats = ha.loss(
                    hidden,
                    torch.zeros(n, dtype=torch.long),
                    torch.ones(n),
                    group_size=n,
                    return_stats=True,
                )
                values.append(value)
                cosines.append(stats["mean_cosine"])
    values, cosines = torch.stack(values), torch.stack(cosines)
    assert torch.all(values >= 0), values.min()
    assert torch.all(cosines <= 1), cosines.max()


def permuted(case, leaf, perm):
    """The case's rollouts in order ``perm``, ``hidden`` computed from ``leaf``."""
    part = select(case, leaf, perm)
    return part, dict(group_ids=part["group_ids"], cu_seqlens=part["cu_seqlens"])


@examples(40)
@given(
    data=st.data(),
    case=align_cases(),
    loss_type=st.sampled_from(LOSS_TYPES),
    reduction=st.sampled_from(REDUCTIONS),
)
def test_permuting_rollouts_changes_nothing(data, case, loss_type, reduction):
    """Rows reordered with their group ids, anchors and rewards: the same value (per-group
    values stay in sorted label order) and the gradient rows move with the rows."""
    perm = torch.tensor(data.draw(st.permutations(range(case.batch))), dtype=torch.long)
    leaf = case.hidden.detach().requires_grad_()
    results, grads = [], []
    for order in (None, perm):
        if order is None:
            args = (leaf, case.anchors, case.rewards)
            kw = case.kwargs()
        else:
            part, kw = permuted(case, leaf, order)
            args = (part["hidden"], part["mask"], part["rewards"])
        result = ha.loss(*args, loss_type=loss_type, reduction=reduction, **kw)
        value = result[0] if reduction == "none" else result
        (grad,) = torch.autograd.grad((value * weights_for(value)).sum(), leaf)
        results.append(result)
        grads.append(grad)
    if reduction == "none":
        assert torch.equal(results[0][1], results[1][1])
        close_runs(results[1][0], results[0][0], case.hidden.dtype)
    else:
        close_runs(results[1], results[0], case.hidden.dtype)
    close_runs(grads[1], grads[0], case.hidden.dtype)


def scaled_anchor_rows(case, factors):
    """hidden (in the case's layout) with rollout b's anchor row multiplied by factors[b]."""
    values = case.hidden.detach().clone()
    for b, row in enumerate(case.anchor_rows()):
        if row is not None:
            values[row] *= factors[b]
    return lay_out(values, case.layout)


@examples(30)
@given(
    data=st.data(),
    case=align_cases(dtypes=(torch.float32, torch.float64), layouts=INJECTIVE_LAYOUTS),
    loss_type=st.sampled_from(UNIT_TYPES),
    reduction=st.sampled_from(REDUCTIONS),
)
def test_positive_scales_of_anchor_rows_change_nothing(data, case, loss_type, reduction):
    factors = data.draw(st.lists(st.floats(1e-2, 1e2), min_size=case.batch, max_size=case.batch))
    first = ha.loss(
        case.hidden,
        case.anchors,
        case.rewards,
        loss_type=loss_type,
        reduction=reduction,
        **case.kwargs(),
    )
    second = ha.loss(
        scaled_anchor_rows(case, factors),
        case.anchors,
        case.rewards,
        loss_type=loss_type,
        reduction=reduction,
        **case.kwargs(),
    )
    if reduction == "none":
        assert torch.equal(first[1], second[1])
        first, second = first[0], second[0]
    close_runs(second, first, case.hidden.dtype)


@examples(30)
@given(
    data=st.data(),
    case=align_cases(layouts=INJECTIVE_LAYOUTS),
    loss_type=st.sampled_from(UNIT_TYPES),
    reduction=st.sampled_from(REDUCTIONS),
)
def test_power_of_two_scales_of_anchor_rows_change_no_bit(data, case, loss_type, reduction):
    """A power of two scales a state and its norm exactly: the unit vectors, and so the value,
    are the same bits in every dtype; the gradient of those rows is divided by the scale."""
    # float16 has no exponents to spare below its smallest normal: only scales >= 1 there
    low = 0 if case.hidden.dtype == torch.float16 else -6
    powers = data.draw(st.lists(st.integers(low, 6), min_size=case.batch, max_size=case.batch))
    factors = [2.0**k for k in powers]
    hidden = scaled_anchor_rows(case, factors)
    back = scaled_anchor_rows(with_hidden(case, hidden), [1 / f for f in factors])
    assert torch.equal(back, case.hidden)  # the scaling itself was exact
    first = run_loss(case, case.hidden, loss_type, reduction)
    second = run_loss(case, hidden, loss_type, reduction)
    for a, b in zip(
        torch.utils._pytree.tree_leaves(first[:2]), torch.utils._pytree.tree_leaves(second[:2])
    ):
        same_bits(b, a)
    unscaled = second[2].clone()
    for b, row in enumerate(case.anchor_rows()):
        if row is not None:
            unscaled[row] *= factors[b]
    if case.hidden.dtype == torch.float16:
        # a gradient row divided by the scale may fall below float16's smallest normal, where
        # its spacing (2^-24) multiplied back by the scale is the error
        spacing = 2.0**-24 * max(factors)
        torch.testing.assert_close(unscaled.float(), first[2].float(), atol=spacing, rtol=2e-3)
    else:
        close_runs(unscaled, first[2], case.hidden.dtype)


GARBAGE = [float("nan"), float("inf"), -float("inf"), "max", "-max"]


def garbage_value(kind, dtype):
    if kind == "max":
        return torch.finfo(dtype).max
    if kind == "-max":
        return -torch.finfo(dtype).max
    return kind


@examples(40)
@given(
    case=align_cases(layouts=INJECTIVE_LAYOUTS),
    loss_type=st.sampled_from(LOSS_TYPES),
    reduction=st.sampled_from(REDUCTIONS),
    kind=st.sampled_from(GARBAGE),
)
def test_values_outside_the_anchors_change_no_bit(case, loss_type, reduction, kind):
    values = case.hidden.detach().clone()
    values[~case.anchor_cells()] = garbage_value(kind, values.dtype)
    dirty = lay_out(values, case.layout)
    clean = run_loss(case, case.hidden, loss_type, reduction)
    ours = run_loss(case, dirty, loss_type, reduction)
    for a, b in zip(torch.utils._pytree.tree_leaves(clean), torch.utils._pytree.tree_leaves(ours)):
        same_bits(b, a)
    assert torch.all(ours[2][~case.anchor_cells()] == 0)


@examples(25)
@given(
    case=align_cases(layouts=INJECTIVE_LAYOUTS),
    loss_type=st.sampled_from(SPLIT_TYPES),
    reduction=st.sampled_from(REDUCTIONS),
    kind=st.sampled_from(GARBAGE),
)
def test_anchors_of_incorrect_rollouts_are_not_read(case, loss_type, reduction, kind):
    """cosine, centroid and mse use the correct rollouts' anchors only (contrastive also
    reads the incorrect ones, its negatives)."""
    values = case.hidden.detach().clone()
    correct = case.rewards > 0.5 if case.rewards.dtype != torch.bool else case.rewards
    for b, row in enumerate(case.anchor_rows()):
        if row is not None and not bool(correct[b]):
            values[row] = garbage_value(kind, values.dtype)
    clean = run_loss(case, case.hidden, loss_type, reduction)
    ours = run_loss(case, lay_out(values, case.layout), loss_type, reduction)
    for a, b in zip(torch.utils._pytree.tree_leaves(clean), torch.utils._pytree.tree_leaves(ours)):
        same_bits(b, a)


# ---------------------------------------------------------------------------------------------
# Group statistics and shares of a split batch


def split_tolerance(dtype):
    return dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)


@examples(25)
@given(data=st.data(), case=align_cases(dtypes=(torch.float32, torch.float64, torch.bfloat16)))
def test_merged_stats_of_any_split_equal_the_whole_batch(data, case):
    whole = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, **case.kwargs())
    correct = case.rewards > 0.5 if case.rewards.dtype != torch.bool else case.rewards
    part = (case.index >= 0) & correct
    assert whole.group_ids.tolist() == sorted(set(case.labels.tolist()))
    assert whole.count.tolist() == [int(part[case.labels == g].sum()) for g in whole.group_ids]
    parts = data.draw(splits(case.batch))
    stats = []
    for idx in parts:
        p = select(case, case.hidden, idx)
        stats.append(
            ha.group_anchor_stats(
                p["hidden"],
                p["mask"],
                p["rewards"],
                group_ids=p["group_ids"],
                cu_seqlens=p["cu_seqlens"],
            )
        )
    folded = stats[0]
    for s in stats[1:]:
        folded = folded.merge(s)
    tol = split_tolerance(whole.dtype)
    for merged in (stats[0].merge(*stats[1:]), stats[-1].merge(*stats[-2::-1]), folded):
        assert torch.equal(merged.group_ids, whole.group_ids)
        assert torch.equal(merged.count, whole.count)
        for name in ("unit_sum", "raw_sum", "sq_norm_sum"):
            torch.testing.assert_close(getattr(merged, name), getattr(whole, name), **tol)
        torch.testing.assert_close(merged.mean_cosine, whole.mean_cosine, equal_nan=True, **tol)


@examples(30)
@given(
    data=st.data(),
    case=align_cases(dtypes=(torch.float32, torch.float64)),
    loss_type=st.sampled_from(SPLIT_TYPES),
    reduction=st.sampled_from(REDUCTIONS),
    form=st.sampled_from(["stats", "rows", "dict"]),
)
def test_shares_of_any_split_sum_to_the_full_batch(data, case, loss_type, reduction, form):
    if reduction == "none":
        form = "stats"  # per-group shares come in the statistics' group order
    leaf = case.hidden.detach().requires_grad_()
    full = ha.loss(
        leaf, case.anchors, case.rewards, loss_type=loss_type, reduction=reduction, **case.kwargs()
    )
    full_value = full[0] if reduction == "none" else full
    weights = weights_for(full_value)
    (full_grad,) = torch.autograd.grad((full_value * weights).sum(), leaf)
    # statistics merged over one split, shares over another
    pieces = []
    for idx in data.draw(splits(case.batch)):
        p = select(case, case.hidden, idx)
        pieces.append(
            ha.group_anchor_stats(
                p["hidden"],
                p["mask"],
                p["rewards"],
                group_ids=p["group_ids"],
                cu_seqlens=p["cu_seqlens"],
            )
        )
    stats = pieces[0].merge(*pieces[1:])
    rows = stats.rows(case.labels, loss_type=loss_type)
    total = 0
    for idx in data.draw(splits(case.batch)):
        p = select(case, leaf, idx)
        gid = p["group_ids"]
        if form == "stats":
            reference = stats
        elif form == "rows":
            reference = rows[idx]
        else:
            reference = {k: v[idx] for k, v in rows.to_dict().items()}
            gid = None
        share = ha.loss(
            p["hidden"],
            p["mask"],
            p["rewards"],
            group_ids=gid,
            cu_seqlens=p["cu_seqlens"],
            loss_type=loss_type,
            reduction=reduction,
            reference=reference,
        )
        if reduction == "none":
            assert torch.equal(share[1], full[1])
            share = share[0]
        total = total + share
    (grad,) = torch.autograd.grad((total * weights).sum(), leaf)
    tol = split_tolerance(case.hidden.dtype)
    torch.testing.assert_close(total, full_value, **tol)
    torch.testing.assert_close(grad, full_grad, **tol)


# ---------------------------------------------------------------------------------------------
# Anchors from tokens, packed rows


@st.composite
def anchor_searches(draw, max_batch=16, max_seq=12):
    batch = draw(st.integers(1, max_batch))
    seq = draw(st.integers(1, max_seq))
    vocab = draw(st.integers(1, 4))
    ids = draw(
        st.lists(
            st.lists(st.integers(0, vocab - 1), min_size=seq, max_size=seq),
            min_size=batch,
            max_size=batch,
        )
    )
    # Ids outside the vocabulary never match, also where they agree with a token in their low
    # 32 bits (int32 token ids) or are negative.
    token = st.integers(0, vocab - 1) | st.sampled_from([-1, 2**32, 2**32 + 1, 2**63 - 1])
    markers = draw(st.lists(st.lists(token, min_size=1, max_size=3), min_size=1, max_size=3))
    pattern = draw(st.sampled_from(["all", "suffix", "random"]))
    if pattern == "all":
        live = [[1] * seq for _ in range(batch)]
    elif pattern == "suffix":
        starts = draw(st.lists(st.integers(0, seq), min_size=batch, max_size=batch))
        live = [[int(t >= s) for t in range(seq)] for s in starts]
    else:
        live = draw(
            st.lists(
                st.lists(st.integers(0, 1), min_size=seq, max_size=seq),
                min_size=batch,
                max_size=batch,
            )
        )
    mask_dtype = draw(
        st.sampled_from(
            [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float32]
        )
    )
    token_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "offset"]))
    token_ids = lay_out(torch.tensor(ids, dtype=token_dtype), layout)
    response_mask = lay_out(
        torch.tensor(live).to(mask_dtype), draw(st.sampled_from(INJECTIVE_LAYOUTS))
    )
    occurrence = draw(st.sampled_from(["last", "first"]))
    offset = draw(st.integers(-4, 4) | st.sampled_from([-(2**63), 2**63 - 1, -(2**40), 2**40]))
    return token_ids, response_mask, markers, occurrence, offset


def check_find_anchors(search):
    token_ids, response_mask, markers, occurrence, offset = search
    ours = ha.find_anchors(token_ids, response_mask, markers, occurrence=occurrence, offset=offset)
    assert ours.dtype == torch.int64
    expected = find_anchors_loop(token_ids, response_mask, markers, occurrence, offset)
    assert ours.tolist() == expected


@examples(60)
@given(search=anchor_searches())
def test_find_anchors_matches_loop(search):
    check_find_anchors(search)


@examples(50)
@given(data=st.data())
def test_unpadded_rows_matches_loop(data):
    batch = data.draw(st.integers(1, 16))
    seq = data.draw(st.integers(0, 12))
    pattern = data.draw(st.sampled_from(["left", "right", "random"]))
    if pattern == "random":
        cells = [
            data.draw(st.lists(st.booleans(), min_size=seq, max_size=seq)) for _ in range(batch)
        ]
    else:
        lengths = data.draw(st.lists(st.integers(0, seq), min_size=batch, max_size=batch))
        cells = [
            [(t >= seq - n) if pattern == "left" else (t < n) for t in range(seq)] for n in lengths
        ]
    mask = torch.tensor(cells, dtype=torch.bool).reshape(batch, seq)
    mask = mask.to(data.draw(st.sampled_from([torch.bool, torch.uint8, torch.int32, torch.int64])))
    k = data.draw(st.sampled_from([None, 1, 3]))
    position = st.integers(-3, seq + 3) | st.sampled_from([-(2**63), 2**63 - 1])
    flat = data.draw(st.lists(position, min_size=batch * (k or 1), max_size=batch * (k or 1)))
    positions = torch.tensor(flat, dtype=torch.int64)
    positions = positions.reshape(batch) if k is None else positions.reshape(batch, k)
    ours = ha.unpadded_rows(positions, mask)
    assert ours.dtype == torch.int64 and ours.shape == positions.shape
    row_of, n = {}, 0
    for b in range(batch):
        for t in range(seq):
            if cells[b][t]:
                row_of[(b, t)] = n
                n += 1
    grid = positions.reshape(batch, -1).tolist()
    expected = [[row_of.get((b, p), -1) for p in grid[b]] for b in range(batch)]
    assert ours.reshape(batch, -1).tolist() == expected
    # the rows are those of hidden[attention_mask.bool()]
    hidden = torch.arange(batch * seq, dtype=torch.float64).reshape(batch, seq)
    packed = hidden[mask.bool()]
    for b in range(batch):
        for j, p in enumerate(grid[b]):
            r = expected[b][j]
            if r >= 0:
                assert packed[r] == hidden[b, p]


# ---------------------------------------------------------------------------------------------
# DAPO


@st.composite
def scores_cases(draw, max_batch=16):
    grouping = draw(groupings(max_batch))
    batch = grouping.batch
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    kind = draw(st.sampled_from(["binary", "levels", "random"]))
    token_level = draw(st.booleans())
    shape = (batch, draw(st.integers(1, 12))) if token_level else (batch,)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "binary":
        scores = torch.where(torch.rand(shape, generator=gen) < 0.5, 1.0, -1.0)
    elif kind == "levels":
        scores = torch.randint(0, 3, shape, generator=gen) * 0.5
    else:
        scores = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    layout = draw(st.sampled_from(["contiguous", "transposed", "offset"]))
    return grouping, lay_out(scores.to(dtype), layout)


@examples(50)
@given(
    case=scores_cases(),
    eps=st.sampled_from([1e-6, 1e-4, 1e-9]),
    norm_by_std=st.booleans(),
)
def test_group_advantages_match_reference(case, eps, norm_by_std):
    grouping, scores = case
    ours = dapo.group_advantages(scores, eps=eps, norm_by_std=norm_by_std, **grouping.kwargs())
    assert ours.dtype == torch.float32 and ours.shape == (grouping.batch,)
    ref = grpo_advantages(scores, grouping.labels, eps=eps, norm_by_std=norm_by_std)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)


@st.composite
def metric_cases(draw, max_batch=16):
    grouping = draw(groupings(max_batch))
    dtype = draw(
        st.sampled_from(FLOAT_DTYPES + [torch.int32, torch.int64, torch.uint8, torch.bool])
    )
    top = 1 if dtype == torch.bool else 2
    values = draw(st.lists(st.integers(0, top), min_size=grouping.batch, max_size=grouping.batch))
    metric = torch.tensor(values).to(dtype)
    if dtype.is_floating_point and draw(st.booleans()):
        nans = draw(st.lists(st.booleans(), min_size=grouping.batch, max_size=grouping.batch))
        metric[torch.tensor(nans)] = float("nan")
    return grouping, metric


@examples(50)
@given(case=metric_cases())
def test_dynamic_sampling_mask_matches_reference(case):
    """Keep a group whose metric is not constant or that has one member; a NaN drops a group
    of two or more (its std is NaN)."""
    grouping, metric = case
    ours = dapo.dynamic_sampling_mask(metric, **grouping.kwargs())
    assert ours.dtype == torch.bool
    assert ours.tolist() == dynamic_sampling(metric, grouping.labels).tolist()


@examples(40)
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.int64, torch.int32, torch.float32, torch.float64]),
    max_len=st.integers(1, 5000),
    factor=st.sampled_from([1.0, 0.5, 2.0]),
)
def test_overlong_penalty_matches_reference(data, dtype, max_len, factor):
    buffer = data.draw(st.integers(1, max_len))
    lengths = data.draw(st.lists(st.integers(0, 2 * max_len), min_size=1, max_size=16))
    lengths = torch.tensor(lengths).to(dtype)
    ours = dapo.overlong_penalty(lengths, max_len, buffer, factor)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(
        ours.double(), overlong(lengths, max_len, buffer, factor), atol=1e-6, rtol=1e-6
    )
    assert torch.all(ours <= 0)


def run_policy(case, logp=None, old=None, adv=None, **extra):
    x = (case.logp if logp is None else logp).detach().requires_grad_()
    kw = {**case.kwargs, **extra}
    loss, metrics = dapo.policy_loss(
        x,
        case.old if old is None else old,
        case.adv if adv is None else adv,
        case.mask,
        **kw,
    )
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == x.dtype and grad.shape == x.shape
    return loss, metrics, grad


def host_numbers(kw):
    """kw with one-element tensor normalisers as Python numbers."""
    return {
        k: (v.item() if isinstance(v, torch.Tensor) and v.dim() == 0 else v) for k, v in kw.items()
    }


def check_policy_against_reference(case):
    dtype = case.logp.dtype
    loss, metrics, grad = run_policy(case)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref_loss, ref_metrics, ref_grad = run_reference(
        case.logp, case.old, case.adv, case.on, **case.kwargs
    )
    assert torch.all(grad[~case.on] == 0)
    if dtype not in HALF_DTYPES:
        tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss.double(), ref_loss.detach(), **tol)
        for k in ref_metrics:
            torch.testing.assert_close(metrics[k].double(), ref_metrics[k].detach(), **tol)
        torch.testing.assert_close(grad.double(), ref_grad, **tol)
        return
    if not case.on.any():
        # nothing to compare with the yardstick, whose 1e-8 guard is 0 in a half dtype (0 / 0):
        # an empty mask gives 0 (where verl divides by zero)
        assert loss.item() == 0 and all(v.item() == 0 for v in metrics.values())
        assert torch.all(grad == 0)
        return
    low_loss, low_metrics, low_grad = run_reference(
        case.logp, case.old, case.adv, case.on, dtype=dtype, **host_numbers(case.kwargs)
    )
    # Small random cases have losses, gradients and metrics near zero that no half-precision
    # yardstick resolves: the bound is not also required to lie below the result's size.
    assert_within_twice_torch_error(loss, ref_loss, low_loss, "loss", reject_zero=False)
    for k in ref_metrics:
        assert_within_twice_torch_error(
            metrics[k], ref_metrics[k], low_metrics[k], k, reject_zero=False
        )
    try:
        assert_within_twice_torch_error(grad, ref_grad, low_grad, "gradient", reject_zero=False)
    except AssertionError:
        # The documented bound of the half-precision policy gradient (dapo._PolicyLoss): the
        # per-token derivative is rounded to the dtype in the forward, then scaled and rounded
        # again, so it is within one unit in the last place of the rounded-once value. Over a
        # few tokens PyTorch's own error can be far below half a unit by chance, and twice it
        # below what the second rounding adds.
        assert_within_one_ulp_of_rounded_once(grad, ref_grad)


def assert_within_one_ulp_of_rounded_once(ours: torch.Tensor, exact: torch.Tensor) -> None:
    """|ours - exact| <= 1.5 units in the last place of the dtype at |exact|: half a unit for
    the first rounding, one for the second."""
    once = exact.to(ours.dtype).abs()
    ulp = torch.nextafter(once, torch.full_like(once, float("inf"))).double() - once.double()
    err = (ours.double() - exact.double()).abs()
    assert torch.all(err <= 1.5 * ulp + 1e-7), (err - 1.5 * ulp).max()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@examples(30)
@given(data=st.data())
def test_policy_loss_matches_reference(dtype, data):
    check_policy_against_reference(data.draw(policy_cases(dtypes=(dtype,)), label="case"))


def with_garbage(t, on, value, layout):
    if t.dim() != on.dim():
        return t
    garbage = torch.full_like(t, garbage_value(value, t.dtype))
    return lay_out(torch.where(on, t, garbage), layout)


@examples(40)
@given(
    case=policy_cases(),
    kind=st.sampled_from(GARBAGE),
    layout=st.sampled_from(["contiguous", "transposed", "offset"]),
)
def test_policy_loss_ignores_everything_outside_the_mask(case, kind, layout):
    clean = run_policy(case)
    dirty = [with_garbage(t, case.on, kind, layout) for t in (case.logp, case.old, case.adv)]
    extra = {}
    if "rollout_is_weights" in case.kwargs:
        extra["rollout_is_weights"] = with_garbage(
            case.kwargs["rollout_is_weights"], case.on, kind, layout
        )
    ours = run_policy(case, *dirty, **extra)
    for a, b in zip(torch.utils._pytree.tree_leaves(clean), torch.utils._pytree.tree_leaves(ours)):
        same_bits(b, a)


# ---------------------------------------------------------------------------------------------
# The CUDA kernels on the CPU (backend "cuda-emulated"): a subset, small shapes


@needs_emulation
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@examples(3)
@given(
    data=st.data(),
    loss_type=st.sampled_from(LOSS_TYPES),
    reduction=st.sampled_from(REDUCTIONS),
)
def test_emulated_loss_matches_reference(dtype, data, loss_type, reduction):
    case = data.draw(align_cases(dtypes=(dtype,), max_batch=8, max_seq=5), label="case")
    with ha.backend("cuda-emulated"):
        check_loss_against_reference(case, loss_type, reduction)


@needs_emulation
@examples(4)
@given(
    case=align_cases(
        dtypes=(torch.float32, torch.bfloat16), layouts=INJECTIVE_LAYOUTS, max_batch=8, max_seq=5
    ),
    loss_type=st.sampled_from(LOSS_TYPES),
    kind=st.sampled_from(GARBAGE),
)
def test_emulated_values_outside_the_anchors_change_no_bit(case, loss_type, kind):
    values = case.hidden.detach().clone()
    values[~case.anchor_cells()] = garbage_value(kind, values.dtype)
    with ha.backend("cuda-emulated"):
        clean = run_loss(case, case.hidden, loss_type, "mean")
        ours = run_loss(case, lay_out(values, case.layout), loss_type, "mean")
    for a, b in zip(torch.utils._pytree.tree_leaves(clean), torch.utils._pytree.tree_leaves(ours)):
        same_bits(b, a)


@needs_emulation
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@examples(2)
@given(data=st.data())
def test_emulated_policy_loss_matches_reference(dtype, data):
    case = data.draw(policy_cases(dtypes=(dtype,), max_batch=6), label="case")
    with ha.backend("cuda-emulated"):
        check_policy_against_reference(case)


@needs_emulation
@examples(6)
@given(
    scores=scores_cases(max_batch=8),
    metric=metric_cases(max_batch=8),
    norm_by_std=st.booleans(),
)
def test_emulated_group_ops_match_reference(scores, metric, norm_by_std):
    grouping, values = scores
    if values.dtype == torch.float64:
        values = values.float()  # float64 runs on the CPU backend only
    with ha.backend("cuda-emulated"):
        ours = dapo.group_advantages(values, norm_by_std=norm_by_std, **grouping.kwargs())
        mgroup, m = metric
        if m.dtype == torch.float64:
            m = m.float()
        keep = dapo.dynamic_sampling_mask(m, **mgroup.kwargs())
    ref = grpo_advantages(values, grouping.labels, norm_by_std=norm_by_std)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)
    assert keep.tolist() == dynamic_sampling(m, mgroup.labels).tolist()


@needs_emulation
@examples(5)
@given(search=anchor_searches(max_batch=6, max_seq=8))
def test_emulated_find_anchors_matches_loop(search):
    with ha.backend("cuda-emulated"):
        check_find_anchors(search)


def test_grouping_strategy_reaches_its_edge_cases():
    """The group strategies produce what the properties claim to cover (a guard against a
    strategy that silently stopped producing them)."""
    seen = set()

    @examples(80)
    @given(grouping=groupings())
    def probe(grouping: Grouping):
        sizes = torch.unique(grouping.labels, return_counts=True)[1]
        if grouping.group_size is not None:
            seen.add("size")
        else:
            seen.add("ids")
            labels = grouping.labels
            if (labels < 0).any():
                seen.add("negative")
            if (labels.abs() > 2**40).any():
                seen.add("huge")
            if grouping.group_ids.dtype == torch.int32:
                seen.add("int32")
        if (sizes == 1).any():
            seen.add("singleton")

    probe()
    assert seen >= {"size", "ids", "negative", "huge", "int32", "singleton"}, seen
