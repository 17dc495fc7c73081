"""The alignment loss split over micro-batches with full-group reference statistics
(``ha.group_anchor_stats`` + ``ha.loss(..., reference=...)``): the shares of any split of the
batch sum to the full-batch value and gradient (float64, relative 1e-10)."""

from __future__ import annotations

import itertools

import pytest
import torch

import hidden_align as ha

from cases import make_case

SPLIT_TYPES = ["cosine", "centroid", "mse"]
RTOL, ATOL = 1e-10, 1e-13
# Odd micro-batch sizes, one of a single row; they cover the 24 rows of the cases below.
CHUNKS = [3, 5, 1, 7, 8]


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, equal_nan=True)


def weighted(value):
    """A scalar to differentiate: the loss itself, or a weighted sum of per-group values."""
    if value.dim() == 0:
        return value
    return (value * torch.linspace(0.5, 1.5, value.numel(), dtype=value.dtype)).sum()


def controlled_case(layout, anchor_form, hidden_size=6):
    """24 rollouts in 6 groups of 4 with 0, 1, 2, 3, 4 and 3 correct; ids not contiguous."""
    correct = [0, 0, 0, 0] + [1, 0, 0, 0] + [1, 1, 0, 0] + [1, 1, 1, 0] + [1] * 4 + [0, 1, 1, 1]
    case = make_case(
        batch=24,
        seq=6,
        hidden_size=hidden_size,
        group=4,
        layout=layout,
        anchor_form=anchor_form,
        grouping="size",
        anchor_prob=0.9,
        correct=correct,
    )
    case.labels = case.labels * 11 + 5
    case.group_ids, case.group_size = case.labels, None
    return case


def random_case(layout, anchor_form):
    return make_case(
        batch=24, seq=7, hidden_size=5, group=4, layout=layout, anchor_form=anchor_form
    )


def split(case, first_incorrect=True, generator=None):
    """A shuffled partition of the rows into CHUNKS; with ``first_incorrect`` the first
    micro-batch holds only rollouts that are not correct."""
    batch = case.rewards.shape[0]
    perm = torch.randperm(batch, generator=generator)
    if first_incorrect:
        wrong = perm[case.rewards[perm] <= 0.5]
        assert wrong.numel() >= CHUNKS[0]
        head = wrong[: CHUNKS[0]]
        rest = perm[~torch.isin(perm, head)]
        perm = torch.cat([head, rest])
    return list(torch.split(perm, CHUNKS))


def select(case, leaf, idx):
    """Rows ``idx`` of ``case`` as a micro-batch whose ``hidden`` is computed from ``leaf`` (so
    gradients reach it): ``(hidden, anchors, rewards, group_ids, cu_seqlens)``."""
    rewards, gid = case.rewards[idx], case.labels[idx]
    if case.cu_seqlens is None:
        return leaf[idx], case.anchors[idx], rewards, gid, None
    cu = case.cu_seqlens
    starts, ends = cu[:-1][idx], cu[1:][idx]
    tokens = [torch.arange(s, e) for s, e in zip(starts.tolist(), ends.tolist())]
    tokens = torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.long)
    new_cu = torch.cat([torch.zeros(1, dtype=torch.long), (ends - starts).cumsum(0)])
    if case.anchors.dtype == torch.bool:
        anchors = case.anchors[tokens]
    else:
        a = case.anchors[idx]
        anchors = torch.where(a >= 0, a - starts + new_cu[:-1], torch.full_like(a, -1))
    return leaf[tokens], anchors, rewards, gid, new_cu


def micro_stats(case, parts):
    """Stats of every micro-batch, merged."""
    stats = []
    for idx in parts:
        hidden, anchors, rewards, gid, cu = select(case, case.hidden, idx)
        stats.append(ha.group_anchor_stats(hidden, anchors, rewards, group_ids=gid, cu_seqlens=cu))
    return stats[0].merge(*stats[1:])


def full_batch(case, loss_type, reduction, **extra):
    leaf = case.hidden.detach().clone().requires_grad_()
    result, stats = ha.loss(
        leaf,
        case.anchors,
        case.rewards,
        loss_type=loss_type,
        reduction=reduction,
        return_stats=True,
        **case.kwargs(),
        **extra,
    )
    value = result[0] if reduction == "none" else result
    (grad,) = torch.autograd.grad(weighted(value), leaf)
    return result, stats, grad


def reference_for(form, stats, case, idx):
    """What a micro-batch passes as ``reference=`` and ``group_ids=`` in each form."""
    gid = case.labels[idx]
    if form == "stats":
        return stats, gid
    rows = stats.rows(case.labels)  # the whole batch's per-row form, split with the rows
    if form == "rows":
        return rows[idx], gid
    batch = {k: v[idx] for k, v in rows.to_dict().items()}
    batch["responses"] = torch.zeros(len(idx), 3)  # other keys of a framework batch
    return batch, None


def split_loss(case, parts, reference_form, stats, loss_type, reduction, **extra):
    """Sum of the shares of ``parts`` and its gradient w.r.t. the full hidden."""
    leaf = case.hidden.detach().clone().requires_grad_()
    total, reports = None, []
    for idx in parts:
        hidden, anchors, rewards, _, cu = select(case, leaf, idx)
        ref, gid = reference_for(reference_form, stats, case, idx)
        result, report = ha.loss(
            hidden,
            anchors,
            rewards,
            group_ids=gid,
            cu_seqlens=cu,
            loss_type=loss_type,
            reduction=reduction,
            return_stats=True,
            reference=ref,
            **extra,
        )
        reports.append(report)
        value = result[0] if reduction == "none" else result
        assert value.dtype == (torch.float32 if leaf.dtype == torch.float32 else torch.float64)
        total = value if total is None else total + value
    (grad,) = torch.autograd.grad(weighted(total), leaf)
    return total, grad, reports


def check_split(case, loss_type, reduction, reference_form, **extra):
    full, full_stats, full_grad = full_batch(case, loss_type, reduction, **extra)
    stats = micro_stats(case, split(case, first_incorrect=False))
    parts = split(case)
    total, grad, reports = split_loss(
        case, parts, reference_form, stats, loss_type, reduction, **extra
    )
    close(total, full[0] if reduction == "none" else full)
    assert type(grad) is torch.Tensor
    close(grad, full_grad)
    for report in reports:
        close(report["mean_cosine"], full_stats["mean_cosine"])
        assert int(report["valid_groups"]) == int(full_stats["valid_groups"])
        assert int(report["anchored_correct"]) == int(full_stats["anchored_correct"])
    return parts, stats


@pytest.mark.parametrize(
    "loss_type,reduction,layout,anchor_form,reference_form",
    list(
        itertools.product(
            SPLIT_TYPES,
            ["mean", "sum"],
            ["padded", "packed"],
            ["index", "mask"],
            ["stats", "rows", "dict"],
        )
    ),
)
def test_shares_sum_to_the_full_batch(loss_type, reduction, layout, anchor_form, reference_form):
    case = controlled_case(layout, anchor_form)
    parts, _ = check_split(case, loss_type, reduction, reference_form)
    # The first micro-batch has no correct rollout: its share is exactly zero.
    hidden, anchors, rewards, gid, cu = select(case, case.hidden, parts[0])
    stats = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, **case.kwargs())
    value = ha.loss(
        hidden, anchors, rewards, group_ids=gid, cu_seqlens=cu, loss_type=loss_type,
        reduction=reduction, reference=stats,
    )  # fmt: skip
    assert value.item() == 0.0


@pytest.mark.parametrize("loss_type", SPLIT_TYPES)
@pytest.mark.parametrize("layout,anchor_form", [("padded", "mask"), ("packed", "index")])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_cases(loss_type, layout, anchor_form, seed):
    torch.manual_seed(seed)
    case = random_case(layout, anchor_form)
    check_split(case, loss_type, "mean", "stats")
    check_split(case, loss_type, "sum", "rows")


@pytest.mark.parametrize("loss_type", SPLIT_TYPES)
def test_reduction_none_gives_per_group_shares_in_stats_order(loss_type):
    case = controlled_case("padded", "index")
    full, _, _ = full_batch(case, loss_type, "none")
    parts, stats = check_split(case, loss_type, "none", "stats")
    assert torch.equal(stats.group_ids, torch.unique(case.labels))
    for idx in parts:
        hidden, anchors, rewards, gid, _ = select(case, case.hidden, idx)
        values, valid = ha.loss(
            hidden, anchors, rewards, group_ids=gid, loss_type=loss_type, reduction="none",
            reference=stats,
        )  # fmt: skip
        assert values.shape == (stats.num_groups,)
        assert torch.equal(valid, full[1])


@pytest.mark.parametrize("layout,anchor_form", [("padded", "index"), ("packed", "mask")])
def test_merged_stats_equal_full_batch_stats(layout, anchor_form):
    case = controlled_case(layout, anchor_form)
    whole = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, **case.kwargs())
    merged = micro_stats(case, split(case))
    pairwise = micro_stats(case, split(case, first_incorrect=False))
    for stats in (merged, pairwise):
        assert torch.equal(stats.group_ids, whole.group_ids)
        assert torch.equal(stats.count, whole.count)
        close(stats.unit_sum, whole.unit_sum)
        close(stats.raw_sum, whole.raw_sum)
        close(stats.sq_norm_sum, whole.sq_norm_sum)
    part = (case.index >= 0) & (case.rewards > 0)
    expected = [int(part[case.labels == g].sum()) for g in whole.group_ids.tolist()]
    assert whole.count.tolist() == expected
    assert int(whole.valid_groups) == sum(n >= 2 for n in expected)
    assert int(whole.anchored_correct) == sum(expected)
    # Merging one at a time gives the same as merging all at once.
    folded = None
    for idx in split(case):
        hidden, anchors, rewards, gid, cu = select(case, case.hidden, idx)
        one = ha.group_anchor_stats(hidden, anchors, rewards, group_ids=gid, cu_seqlens=cu)
        folded = one if folded is None else folded.merge(one)
    assert torch.equal(folded.count, whole.count)
    close(folded.unit_sum, whole.unit_sum)
    close(folded.raw_sum, whole.raw_sum)


@pytest.mark.parametrize("layout,anchor_form", [("padded", "mask"), ("packed", "index")])
def test_diagnostic_equals_the_full_batch_statistic(layout, anchor_form):
    for case in (controlled_case(layout, anchor_form), random_case(layout, anchor_form)):
        _, expected = ha.loss(
            case.hidden, case.anchors, case.rewards, return_stats=True, **case.kwargs()
        )
        stats = micro_stats(case, split(case, first_incorrect=False))
        close(stats.mean_cosine, expected["mean_cosine"])
        assert int(stats.valid_groups) == int(expected["valid_groups"])
        assert int(stats.anchored_correct) == int(expected["anchored_correct"])


def test_no_valid_group_gives_nan_diagnostic_and_zero_loss():
    case = make_case(batch=8, group=4, correct=[1, 0, 0, 0, 0, 0, 0, 1], anchor_prob=1.0)
    stats = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, **case.kwargs())
    assert torch.isnan(stats.mean_cosine) and int(stats.valid_groups) == 0
    leaf = case.hidden.clone().requires_grad_()
    value, report = ha.loss(
        leaf, case.anchors, case.rewards, reference=stats, return_stats=True, **case.kwargs()
    )
    value.backward()
    assert value.item() == 0.0 and torch.all(leaf.grad == 0)
    assert torch.isnan(report["mean_cosine"])


def test_clamped_norms_stay_exact():
    """Tiny states (norm below eps: u = h / eps, ||u|| < 1) exercise the sum of ||u||^2."""
    case = controlled_case("padded", "index")
    case.hidden = case.hidden * 1e-9
    stats = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, **case.kwargs())
    seen = stats.count > 0
    assert torch.all(stats.sq_norm_sum[seen] < stats.count[seen].double())
    for loss_type in SPLIT_TYPES:
        check_split(case, loss_type, "mean", "stats")


def block_case(batch, seed=0):
    """Contiguous groups of 4 with a correct anchored pair in each (every group valid)."""
    torch.manual_seed(seed)
    correct = [1, 1, 0, 1] * (batch // 4)
    return make_case(batch=batch, group=4, grouping="size", anchor_prob=1.0, correct=correct)


def test_group_size_with_stats_reference_is_refused():
    """Issue 19, item 2: ``group_size`` numbers each micro-batch's blocks from 0, so micro-batch
    [4:8] of B = 8, G = 4 was compared with group 0 of the full batch: the summed shares missed
    the full-batch loss without an error. It is refused, with the remedy in the message."""
    case = block_case(8)
    stats = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, group_size=4)
    remedy = r"group_ids=torch\.arange\(start, start \+ B\) // group_size"
    for part in (slice(0, 4), slice(4, 8), slice(0, 8)):
        args = (case.hidden[part], case.anchors[part], case.rewards[part])
        for ref in (stats, stats.rows(torch.arange(8)[part] // 4)):
            with pytest.raises(ha.ArgumentError, match="^group_size: .*starts at row 0.*" + remedy):
                ha.loss(*args, group_size=4, reference=ref)


@pytest.mark.parametrize("loss_type", SPLIT_TYPES)
@pytest.mark.parametrize("chunks", [[4, 4], [3, 5, 1, 7], [16]])
def test_group_size_stats_split_exactly_with_global_group_ids(loss_type, chunks):
    """Full-batch statistics made with ``group_size`` and micro-batches of contiguous rows that
    pass ``group_ids=arange(start, start + B) // group_size``: the shares sum to the full-batch
    loss and gradient."""
    batch = sum(chunks)
    case = block_case(batch)
    stats = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, group_size=4)
    assert stats.group_ids.tolist() == list(range(batch // 4))
    full, _, full_grad = full_batch(case, loss_type, "mean")
    leaf = case.hidden.detach().clone().requires_grad_()
    total, start = 0, 0
    for size in chunks:
        part = slice(start, start + size)
        gid = torch.arange(start, start + size) // 4
        total = total + ha.loss(
            leaf[part], case.anchors[part], case.rewards[part], group_ids=gid,
            loss_type=loss_type, reference=stats,
        )  # fmt: skip
        start += size
    (grad,) = torch.autograd.grad(total, leaf)
    close(total, full)
    close(grad, full_grad)
    assert stats.local_blocks


def test_merging_group_size_parts_is_refused():
    """Per-micro-batch statistics made with ``group_size`` number their blocks from 0 each:
    merged, they would add unrelated groups together. One part alone (a full batch) keeps
    working and keeps its mark through ``to`` and the constructor."""
    case = block_case(8)
    parts = [
        ha.group_anchor_stats(case.hidden[p], case.anchors[p], case.rewards[p], group_size=4)
        for p in (slice(0, 4), slice(4, 8))
    ]
    by_ids = ha.group_anchor_stats(
        case.hidden[4:], case.anchors[4:], case.rewards[4:], group_ids=torch.tensor([1] * 4)
    )
    for a, b in [(parts[0], parts[1]), (parts[0], by_ids), (by_ids, parts[1])]:
        with pytest.raises(ha.ArgumentError, match=r"^group_size: merge\(\).*arange\(start"):
            a.merge(b)
    assert all(p.local_blocks for p in parts) and not by_ids.local_blocks
    whole = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, group_size=4)
    for kept in (whole.merge(), whole.to("cpu")):
        assert kept.local_blocks and torch.equal(kept.unit_sum, whole.unit_sum)
    assert "local_blocks=True" in repr(whole)
    tensors = (whole.group_ids, whole.unit_sum, whole.raw_sum, whole.sq_norm_sum, whole.count)
    with pytest.raises(ha.ArgumentError, match="^group_size"):
        ha.GroupAnchorStats(*tensors, local_blocks=True).merge(by_ids)
    with pytest.raises(ha.ArgumentError, match="local_blocks: expected a bool"):
        ha.GroupAnchorStats(*tensors, local_blocks=1)
    # The same rows with global block numbers merge to the full-batch statistics.
    glob = [
        ha.group_anchor_stats(
            case.hidden[p], case.anchors[p], case.rewards[p], group_ids=torch.arange(8)[p] // 4
        )
        for p in (slice(0, 4), slice(4, 8))
    ]
    merged = glob[0].merge(glob[1])
    assert torch.equal(merged.group_ids, whole.group_ids) and not merged.local_blocks
    close(merged.unit_sum, whole.unit_sum)


def test_row_reference_splits_like_a_batch():
    case = controlled_case("padded", "index")
    stats = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, **case.kwargs())
    rows = stats.rows(case.labels)
    assert len(rows) == 24 and rows.hidden_size == 6
    idx = torch.tensor([5, 0, 17, 3])
    picked = rows.index_select(idx)
    for other in (rows[idx], rows[idx.tolist()], ha.RowReference.from_dict(picked.to_dict())):
        for name, t in picked.to_dict(prefix="").items():
            assert torch.equal(getattr(other, name), t)
    assert len(rows[3]) == 1 and len(rows[-1]) == 1 and len(rows[2:9]) == 7
    assert torch.equal(rows[-1].group_id, case.labels[-1:])
    d = rows.to_dict(prefix="x_")
    assert sorted(d) == sorted("x_" + n for n in ha.RowReference._NAMES)
    assert all(t.shape[0] == 24 for t in d.values())
    slim = stats.rows(case.labels, loss_type="mse")
    assert slim.unit_sum is None and slim.raw_sum is not None
    assert "ha_ref_unit_sum" not in slim.to_dict()
    with pytest.raises(ha.ArgumentError, match="unit_sum"):
        ha.loss(case.hidden, case.anchors, case.rewards, reference=slim, loss_type="cosine")
    # Unknown ids get count 0 and zero sums.
    odd = stats.rows(torch.tensor([5, 999, -3]))
    assert odd.count.tolist() == [0, 0, 0] and torch.all(odd.unit_sum == 0)


def test_contrastive_is_refused():
    case = controlled_case("padded", "index")
    stats = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, **case.kwargs())
    for ref in (stats, stats.rows(case.labels)):
        with pytest.raises(ha.ArgumentError, match="reference.*contrastive"):
            ha.loss(
                case.hidden, case.anchors, case.rewards, loss_type="contrastive", reference=ref,
                group_ids=case.labels,
            )  # fmt: skip


def test_missing_group_raises_on_cpu():
    case = controlled_case("padded", "index")
    keep = case.labels != case.labels[case.rewards > 0][0]  # drop a group with a correct row
    stats = ha.group_anchor_stats(
        case.hidden[keep], case.anchors[keep], case.rewards[keep], group_ids=case.labels[keep]
    )
    kwargs = dict(group_ids=case.labels)
    with pytest.raises(ha.ArgumentError, match=r"reference: rollout \d+ \(group id \d+\)"):
        ha.loss(case.hidden, case.anchors, case.rewards, reference=stats, **kwargs)
    with pytest.raises(ha.ArgumentError, match="reference: rollout"):
        ha.loss(case.hidden, case.anchors, case.rewards, reference=stats.rows(case.labels))
    # The rows of the dropped group that are not correct anchored rollouts are fine.
    idle = ~keep & ~(case.rewards > 0)
    ha.loss(
        case.hidden[idle], case.anchors[idle], case.rewards[idle], group_ids=case.labels[idle],
        reference=stats,
    )  # fmt: skip


def test_per_row_reference_checks_group_ids():
    case = controlled_case("padded", "index")
    stats = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, **case.kwargs())
    rows = stats.rows(case.labels)
    shuffled = case.labels.flip(0)
    with pytest.raises(ha.ArgumentError, match="another group id"):
        ha.loss(case.hidden, case.anchors, case.rewards, group_ids=shuffled, reference=rows)
    with pytest.raises(ha.ArgumentError, match="group_size"):
        ha.loss(case.hidden, case.anchors, case.rewards, group_size=4, reference=rows)
    with pytest.raises(ha.ArgumentError, match="none"):
        ha.loss(case.hidden, case.anchors, case.rewards, reduction="none", reference=rows)
    with pytest.raises(ha.ShapeError, match="rows"):
        ha.loss(case.hidden, case.anchors, case.rewards, reference=rows[:5])


def test_options_and_arguments_are_checked():
    case = controlled_case("padded", "index")
    stats = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, **case.kwargs())
    args = (case.hidden, case.anchors, case.rewards)
    with pytest.raises(ha.ArgumentError, match="eps"):
        ha.loss(*args, reference=stats, eps=1e-6, **case.kwargs())
    with pytest.raises(ha.ArgumentError, match="threshold"):
        ha.loss(*args, reference=stats, threshold=0.0, **case.kwargs())
    with pytest.raises(ha.ArgumentError, match="reference: expected"):
        ha.loss(*args, reference=42, **case.kwargs())
    with pytest.raises(ha.ArgumentError, match="missing entries"):
        ha.loss(*args, reference={"ha_ref_count": stats.count})
    with pytest.raises(ha.ShapeError, match="hidden size"):
        ha.loss(case.hidden[..., :4], case.anchors, case.rewards, reference=stats, **case.kwargs())
    # The stats resolve anchors like the loss: the same validation and errors.
    with pytest.raises(ha.ArgumentError, match="group_ids|group_size"):
        ha.group_anchor_stats(*args)
    with pytest.raises(ha.ArgumentError, match="eps"):
        ha.group_anchor_stats(*args, eps=0.0, **case.kwargs())
    bad = case.anchors.clone()
    bad[0] = 99
    with pytest.raises(ha.ArgumentError):
        ha.group_anchor_stats(case.hidden, bad, case.rewards, **case.kwargs())
    other = ha.group_anchor_stats(case.hidden[..., :4], *args[1:], **case.kwargs())
    with pytest.raises(ha.ShapeError):
        stats.merge(other)
    f32 = ha.group_anchor_stats(case.hidden.float(), *args[1:], **case.kwargs())
    with pytest.raises(ha.DtypeError):
        stats.merge(f32)
    with pytest.raises(ha.ArgumentError, match="eps"):
        stats.merge(ha.group_anchor_stats(*args, eps=1e-3, **case.kwargs()))
    with pytest.raises(ha.ArgumentError, match="not initialised"):
        stats.all_reduce()


def test_accumulator_dtypes():
    for dtype, acc in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]:
        case = make_case(dtype=dtype)
        stats = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, **case.kwargs())
        assert stats.unit_sum.dtype == acc and stats.count.dtype == torch.int64
        value = ha.loss(case.hidden, case.anchors, case.rewards, reference=stats, **case.kwargs())
        full = ha.loss(case.hidden, case.anchors, case.rewards, **case.kwargs())
        assert value.dtype == acc
        torch.testing.assert_close(value, full, rtol=1e-5, atol=1e-6)


def test_gradient_adds_into_another_consumer_and_refuses_double_backward():
    case = controlled_case("padded", "index")
    stats = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, **case.kwargs())
    x = case.hidden.clone().requires_grad_()
    h = x * 1.0
    head = (h.sin() * 0.1).sum()
    (head + ha.loss(h, case.anchors, case.rewards, reference=stats, **case.kwargs())).backward()
    x2 = case.hidden.clone().requires_grad_()
    h2 = x2 * 1.0
    ((h2.sin() * 0.1).sum() + ha.loss(h2, case.anchors, case.rewards, **case.kwargs())).backward()
    close(x.grad, x2.grad)
    leaf = case.hidden.clone().requires_grad_()
    value = ha.loss(leaf, case.anchors, case.rewards, reference=stats, **case.kwargs())
    (grad,) = torch.autograd.grad(value, leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order"):
        grad.sum().backward()


def _backends():
    return ["cuda-emulated"] if ha.cuda_status()["emulation_built"] else []


@pytest.mark.parametrize("backend", _backends())
def test_kernel_backend_resolution_gives_the_same_shares(backend):
    """Only anchor resolution runs on the kernel backend; the rest is the same torch code, so
    statistics, shares and gradients are bitwise those of the CPU backend."""
    case = controlled_case("packed", "mask")
    case.hidden = case.hidden.float()
    parts = list(torch.split(torch.randperm(24), [11, 13]))
    results = {}
    for name in ("cpu", backend):
        with ha.backend(name):
            stats = micro_stats(case, parts)
            shares = [split_loss(case, parts, "stats", stats, t, "mean") for t in SPLIT_TYPES]
        results[name] = (stats, shares)
    (s0, shares0), (s1, shares1) = results["cpu"], results[backend]
    assert torch.equal(s0.count, s1.count) and torch.equal(s0.unit_sum, s1.unit_sum)
    assert torch.equal(s0.raw_sum, s1.raw_sum)
    for loss_type, (v0, g0, _), (v1, g1, _) in zip(SPLIT_TYPES, shares0, shares1):
        assert torch.equal(v0, v1) and torch.equal(g0, g1)
        full = ha.loss(
            case.hidden, case.anchors, case.rewards, loss_type=loss_type, **case.kwargs()
        )
        torch.testing.assert_close(v0, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", _backends())
def test_kernel_backend_malformed_anchor_gives_nan(backend):
    """The kernel backend cannot raise for a bad anchor index: stats and share become NaN, as
    the loss does."""
    case = make_case(batch=8, group=4, dtype=torch.float32, anchor_prob=1.0, correct_prob=1.0)
    bad = case.anchors.clone()
    bad[2] = 99
    with ha.backend(backend):
        stats = ha.group_anchor_stats(case.hidden, bad, case.rewards, **case.kwargs())
        assert torch.isnan(stats.unit_sum).all() and torch.isnan(stats.mean_cosine)
        good = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, **case.kwargs())
        leaf = case.hidden.clone().requires_grad_()
        value = ha.loss(leaf, bad, case.rewards, reference=good, **case.kwargs())
        value.backward()
    assert torch.isnan(value) and torch.isfinite(leaf.grad).all()


def test_torch_compile_runs_the_share_eagerly():
    """Under torch.compile the reference path is a graph break; values and gradients (through
    AOT autograd on both sides of it) are those of eager mode."""
    case = controlled_case("padded", "index")
    stats = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, **case.kwargs())

    def step(x):
        h = torch.tanh(x) * 2
        align = ha.loss(h, case.anchors, case.rewards, reference=stats, **case.kwargs())
        return align + 0.01 * h.sin().sum()

    grads = []
    for fn in (step, torch.compile(step, backend="aot_eager")):
        x = (case.hidden * 0.5).requires_grad_()
        value = fn(x)
        value.backward()
        grads.append((value.detach(), x.grad))
    close(grads[1][0], grads[0][0])
    close(grads[1][1], grads[0][1])
