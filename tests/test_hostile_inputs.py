"""Hostile inputs for every public op: each gives a documented exception whose message names the
argument, or a result equal to the float64 references of tests/reference.py; never a panic, an
abort, a segfault or a hang.

``CASES`` is one table: each row is an op, a hostile input, what happens, and the code that
checks it. ``catalogue_markdown()`` renders the same rows as the README's "Hostile inputs" table,
so the two stay one-to-one. Rows whose values reach native code run on the CPU backend and, when
this build has it, on the emulated CUDA kernels. Rows that could take the interpreter down (huge
strides, misaligned storage, meta tensors, sizes past 2**31) run in one child interpreter, which
is restarted after a crash, so that a crash fails its row instead of the whole run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from dapo_cases import run_reference

import hidden_align as ha
from hidden_align import dapo

from reference import (
    alignment_loss,
    dynamic_sampling,
    find_anchors_loop,
    grpo_advantages,
    mask_to_index,
    overlong,
)

# ---------------------------------------------------------------------------------------------
# Checks against the references


def _close(got, want, atol=2e-5, rtol=2e-5) -> None:
    got = torch.as_tensor(got).detach().double()
    want = torch.as_tensor(want).detach().double()
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, equal_nan=True)


def _blake(uid) -> int:
    """The documented uid hash: BLAKE2b-64 of the UTF-8 text, little-endian int64."""
    data = uid if isinstance(uid, bytes) else str(uid).encode()
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _labels(batch: int, group_ids, group_size) -> torch.Tensor:
    if group_ids is None:
        return torch.arange(batch) // group_size
    if isinstance(group_ids, torch.Tensor):
        return group_ids.long()
    return torch.tensor([_blake(u) for u in group_ids], dtype=torch.int64)


def _anchor_index(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype in (torch.bool, torch.uint8):
        return mask_to_index(mask != 0)
    return mask.long()


def _compact(hidden: torch.Tensor, index: torch.Tensor) -> tuple:
    """The anchor rows of padded ``hidden`` as a float64 ``[B, 1, H]`` tensor and their index
    (0 or -1): the reference reads these rows only, so a huge or expanded ``hidden`` is never
    materialised and garbage elsewhere never reaches it."""
    rows = torch.zeros(index.shape[0], 1, hidden.shape[-1], dtype=torch.float64)
    for b, a in enumerate(index.tolist()):
        if a >= 0:
            rows[b, 0] = hidden[b, a].double()
    return rows, torch.where(index >= 0, 0, -1)


def _correct(rewards: torch.Tensor, threshold: float) -> list:
    if rewards.dtype == torch.bool:
        return rewards.tolist()
    return [r > threshold for r in rewards.double().tolist()]


def check_loss(hidden, mask, rewards, *, grad=False, group_ids=None, group_size=None, **opts):
    """ha.loss (value, stats and, with ``grad``, the gradient of ``hidden``) against the
    reference computed from the anchor rows."""
    h = hidden.detach().requires_grad_() if grad else hidden
    kw = dict(group_ids=group_ids, group_size=group_size, **opts)
    result, stats = ha.loss(h, mask, rewards, return_stats=True, **kw)
    labels = _labels(rewards.shape[0], group_ids, group_size)
    rows, index = _compact(hidden, _anchor_index(mask))
    rows.requires_grad_(grad)
    want, want_stats = alignment_loss(rows, index, rewards, labels, **opts)
    if opts.get("reduction") == "none":
        _close(result[0], want[0])
        assert result[1].tolist() == want[1].tolist()
    else:
        assert result.shape == () and result.dtype == torch.float32
        _close(result, want)
    _close(stats["mean_cosine"], want_stats["mean_cosine"])
    assert int(stats["valid_groups"]) == want_stats["valid_groups"]
    assert int(stats["anchored_correct"]) == want_stats["anchored_correct"]
    if grad:
        result.backward()
        if want.requires_grad:
            want.backward()
        got_rows = torch.zeros_like(rows)
        dense = h.grad.double().clone()
        for b, a in enumerate(_anchor_index(mask).tolist()):
            if a >= 0:
                got_rows[b, 0] = dense[b, a]
                dense[b, a] = 0
        want_rows = rows.grad if rows.grad is not None else torch.zeros_like(rows)
        _close(got_rows, want_rows)
        assert not dense.any(), "gradient outside the anchor rows"
    return result


def check_stats(hidden, mask, rewards, *, group_ids=None, group_size=None, eps=1e-8):
    """ha.group_anchor_stats against per-group sums of the reference's anchor rows."""
    stats = ha.group_anchor_stats(
        hidden, mask, rewards, group_ids=group_ids, group_size=group_size, eps=eps
    )
    labels = _labels(rewards.shape[0], group_ids, group_size)
    rows, index = _compact(hidden, _anchor_index(mask))
    correct = _correct(rewards, 0.5)
    ids = sorted(set(labels.tolist()))
    assert stats.group_ids.tolist() == ids
    width = hidden.shape[-1]
    for g, label in enumerate(ids):
        members = [
            b for b in range(len(labels)) if labels[b] == label and index[b] >= 0 and correct[b]
        ]
        assert int(stats.count[g]) == len(members)
        units = torch.zeros(width, dtype=torch.float64)
        raw = torch.zeros(width, dtype=torch.float64)
        for b in members:
            units += rows[b, 0] / rows[b, 0].norm().clamp_min(eps)
            raw += rows[b, 0]
        _close(stats.unit_sum[g], units)
        _close(stats.raw_sum[g], raw)
    _, want = alignment_loss(rows, index, rewards, labels, eps=eps)
    _close(stats.mean_cosine, want["mean_cosine"])
    assert not stats.unit_sum.requires_grad
    return stats


def check_anchors(token_ids, response_mask, markers, **opts):
    got = ha.find_anchors(token_ids, response_mask, markers, **opts)
    assert got.dtype == torch.int64
    assert got.tolist() == find_anchors_loop(token_ids, response_mask, markers, **opts)


def _unpadded_rows_on_meta() -> None:
    positions = torch.zeros(4, 2, dtype=torch.int64, device="meta")
    out = ha.unpadded_rows(positions, torch.ones(4, 9, dtype=torch.int64, device="meta"))
    assert out.device.type == "meta" and out.shape == (4, 2) and out.dtype == torch.int64


def _unpadded_loop(positions: torch.Tensor, attention_mask: torch.Tensor) -> list:
    """Row of each position in ``hidden[attention_mask.bool()]``, counted one by one."""
    kept = (attention_mask != 0).tolist()
    row_of, n = {}, 0
    for b, line in enumerate(kept):
        for t, keep in enumerate(line):
            if keep:
                row_of[(b, t)] = n
                n += 1
    grid = positions if positions.dim() == 2 else positions[:, None]
    out = [[row_of.get((b, p), -1) for p in line] for b, line in enumerate(grid.tolist())]
    return out if positions.dim() == 2 else [line[0] for line in out]


def check_unpadded(positions, attention_mask):
    got = ha.unpadded_rows(positions, attention_mask)
    assert got.dtype == torch.int64 and got.shape == positions.shape
    assert got.tolist() == _unpadded_loop(positions, attention_mask)


def check_advantages(scores, *, group_ids=None, group_size=None, eps=1e-6, norm_by_std=True):
    got = dapo.group_advantages(
        scores, group_ids=group_ids, group_size=group_size, eps=eps, norm_by_std=norm_by_std
    )
    assert got.dtype == torch.float32 and not got.requires_grad
    labels = _labels(scores.shape[0], group_ids, group_size)
    _close(got, grpo_advantages(scores, labels, eps, norm_by_std))


def check_sampling(metric, *, group_ids=None, group_size=None):
    got = dapo.dynamic_sampling_mask(metric, group_ids=group_ids, group_size=group_size)
    labels = _labels(metric.shape[0], group_ids, group_size)
    assert got.dtype == torch.bool
    assert got.tolist() == dynamic_sampling(metric, labels).tolist()


def check_overlong(response_lengths, max_response_length, buffer_length, penalty_factor=1.0):
    args = (response_lengths, max_response_length, buffer_length, penalty_factor)
    got = dapo.overlong_penalty(*args)
    assert got.dtype == torch.float32 and not got.requires_grad
    _close(got, overlong(*args).float(), atol=1e-6, rtol=1e-6)


def check_policy(
    log_prob, old_log_prob, advantages, response_mask, *, tol=1e-5, nan_grad=None, **opts
):
    """Loss, metrics and gradient of ``log_prob`` (only) against the float64 reference.
    ``nan_grad``: where a NaN input makes our gradient NaN. The reference has 0 at some of
    those positions: autograd's backward of clamp/maximum passes nothing through a NaN
    comparison, which a fused derivative does not imitate; elsewhere the two must agree."""
    x = log_prob.detach().requires_grad_()
    loss, metrics = dapo.policy_loss(x, old_log_prob, advantages, response_mask, **opts)
    loss.backward()
    want, want_metrics, want_grad = run_reference(
        log_prob, old_log_prob, advantages, response_mask, **opts
    )
    _close(loss, want, atol=tol, rtol=tol)
    for key, value in want_metrics.items():
        _close(metrics[key], value, atol=tol, rtol=tol)
    grad = x.grad
    if nan_grad is not None:
        assert grad[nan_grad].isnan().all()
        grad, want_grad = grad[~nan_grad], want_grad[~nan_grad]
    _close(grad, want_grad, atol=tol, rtol=tol)
    for other in (old_log_prob, advantages, response_mask, opts.get("rollout_is_weights")):
        if isinstance(other, torch.Tensor) and other.requires_grad:
            assert other.grad is None, "a gradient reached an input other than log_prob"


def check_uids(uids, want_texts):
    got = dapo.group_ids_from_uids(uids)
    assert got.dtype == torch.int64
    assert got.tolist() == [_blake(u) for u in want_texts]


# ---------------------------------------------------------------------------------------------
# Hostile layouts (same values as the input they are built from)


def _strided(x: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view: every other element along the last dimension of a wider buffer."""
    view = torch.zeros(*x.shape, 2, dtype=x.dtype)[..., 0]
    view.copy_(x)
    return view


def _column_major(x: torch.Tensor) -> torch.Tensor:
    """A [B, T] tensor stored column by column (strides (1, B))."""
    return x.t().contiguous().t()


def _odd_offset(x: torch.Tensor) -> torch.Tensor:
    """A view starting one element into its storage."""
    view = torch.zeros(x.numel() + 1, dtype=x.dtype)[1:].view(x.shape)
    view.copy_(x)
    assert view.storage_offset() == 1
    return view


def _contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _misaligned(x: torch.Tensor) -> torch.Tensor:
    """A half-precision view at an odd byte address: a slice of a byte storage taken one byte
    in (a tensor view refuses the offset; the storage slice does not)."""
    raw = torch.zeros(x.numel() * x.element_size() + 1, dtype=torch.uint8)
    view = torch.empty(0, dtype=x.dtype).set_(
        raw.untyped_storage()[1:], 0, x.shape, _contiguous_strides(x.shape)
    )
    view.copy_(x)
    assert view.data_ptr() % 2 == 1
    return view


FAR = 2**31 + 3  # a stride (in elements) past the int32 range


def _far(x: torch.Tensor) -> torch.Tensor:
    """The values of ``x`` with every stride but the last dimension's a multiple of FAR (a 1-D
    tensor: stride FAR), so element offsets exceed 2**31. torch checks a view's bounds against
    its storage, so the storage is a sparse file mapped into memory: tens of GB of address
    space, a few pages of memory and disk."""
    shape = tuple(x.shape)
    strides = (FAR,) if len(shape) == 1 else _far_strides(shape)
    last = sum((n - 1) * s for n, s in zip(shape, strides)) + 1
    nbytes = last * x.element_size()
    fd, path = tempfile.mkstemp(prefix="hostile-")
    try:
        os.ftruncate(fd, nbytes)
        mapped = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    finally:
        os.close(fd)
        os.unlink(path)
    view = torch.empty(0, dtype=x.dtype).set_(mapped.untyped_storage(), 0, shape, strides)
    view.copy_(x)
    return view


def _far_strides(shape) -> tuple:
    """Last dimension contiguous; each other dimension FAR times the elements below it."""
    strides = [1]
    step = FAR
    for n in reversed(shape[1:-1]):
        strides.append(step)
        step *= n
    strides.append(step)
    return tuple(reversed(strides))


def _read_only_numpy_tensor(x: torch.Tensor) -> torch.Tensor:
    array = x.numpy().copy()
    array.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that it is not writable
        return torch.from_numpy(array)


def _inference(*tensors) -> tuple:
    """Copies made inside ``torch.inference_mode()`` (inference tensors)."""
    with torch.inference_mode():
        return tuple(t.clone() for t in tensors)


def _meta(x: torch.Tensor) -> torch.Tensor:
    return x.to("meta")


def _calls_under_inference_mode(fn):
    with torch.inference_mode():
        return fn()


# ---------------------------------------------------------------------------------------------
# The ops, their base inputs, and how a row changes them


def align_inputs() -> dict:
    """hidden [6, 5, 3], anchor positions, DAPO rewards, group ids: group 7 has two correct
    anchored rollouts and an incorrect one, group 2 three correct ones."""
    g = torch.Generator().manual_seed(7)
    return dict(
        hidden=torch.randn(6, 5, 3, generator=g, dtype=torch.float64).float(),
        mask=torch.tensor([1, 3, 0, 4, 2, 2]),
        rewards=torch.tensor([1.0, 1.0, -1.0, 1.0, 1.0, 1.0]),
        group_ids=torch.tensor([7, 7, 7, 2, 2, 2]),
    )


def token_inputs() -> dict:
    """token ids [3, 8], the response from position 2 on, markers [7, 8] and [9]."""
    ids = torch.tensor(
        [[7, 8, 1, 7, 8, 2, 7, 8], [3, 3, 9, 4, 4, 4, 4, 4], [7, 8, 5, 5, 5, 5, 5, 5]]
    )
    mask = torch.zeros(3, 8, dtype=torch.int64)
    mask[:, 2:] = 1
    return dict(token_ids=ids, response_mask=mask, markers=[[7, 8], [9]])


def row_inputs() -> dict:
    """positions [3] and a left- and right-padded attention mask [3, 5]."""
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    return dict(positions=torch.tensor([2, 0, 4]), attention_mask=mask)


def score_inputs(name: str) -> dict:
    """scores (or metric) [6] in two groups of 3, one mixed and one not constant either."""
    scores = torch.tensor([1.0, -1.0, 1.0, 0.5, 0.25, 1.0])
    return {name: scores, "group_ids": torch.tensor([4, 4, 4, 1, 1, 1])}


def length_inputs() -> dict:
    lengths = torch.tensor([10, 18, 20, 25])
    return dict(response_lengths=lengths, max_response_length=20, buffer_length=4)


def policy_inputs() -> dict:
    """B=3, T=6: log-ratios up to +-3 (clip and dual clip active), the third row shorter."""
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(3, 6, generator=g, dtype=torch.float64) * 3
    old = logp + (torch.rand(3, 6, generator=g, dtype=torch.float64) - 0.5) * 6
    mask = torch.ones(3, 6)
    mask[2, 4:] = 0
    return dict(
        log_prob=logp.float(),
        old_log_prob=old.float(),
        advantages=torch.randn(3, 6, generator=g, dtype=torch.float64).float(),
        response_mask=mask,
    )


@dataclass(frozen=True)
class Op:
    name: str
    call: Callable  # the op
    check: Callable  # the op against its reference, same keywords
    base: Callable[[], dict]  # keyword arguments of a plain call


LOSS = Op("ha.loss", ha.loss, check_loss, align_inputs)
STATS = Op("ha.group_anchor_stats", ha.group_anchor_stats, check_stats, align_inputs)
FIND = Op("ha.find_anchors", ha.find_anchors, check_anchors, token_inputs)
ROWS = Op("ha.unpadded_rows", ha.unpadded_rows, check_unpadded, row_inputs)
ADV = Op(
    "dapo.group_advantages", dapo.group_advantages, check_advantages,
    lambda: score_inputs("scores"),
)  # fmt: skip
SAMPLE = Op(
    "dapo.dynamic_sampling_mask", dapo.dynamic_sampling_mask, check_sampling,
    lambda: score_inputs("metric"),
)  # fmt: skip
OVERLONG = Op("dapo.overlong_penalty", dapo.overlong_penalty, check_overlong, length_inputs)
POLICY = Op("dapo.policy_loss", dapo.policy_loss, check_policy, policy_inputs)
UIDS = Op("dapo.group_ids_from_uids", dapo.group_ids_from_uids, check_uids, dict)
# One row, with its own check: the op's reference is float64 log_softmax.
LOGPROBS = Op("ha.token_logprobs", ha.token_logprobs, None, dict)

DROP = object()  # a change that removes the argument
NAN, INF = float("nan"), float("inf")


def inputs(op: Op, changes: dict) -> dict:
    """The base inputs of ``op`` with ``changes``: a value, DROP, or a function of the base
    inputs (a dict) giving the value."""
    base = op.base()
    out = dict(base)
    for key, value in changes.items():
        value = value(base) if callable(value) else value
        if value is DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class Case:
    id: str
    op: str
    hostile: str  # the input, for the catalogue
    outcome: str  # what happens, for the catalogue
    run: Callable[[], object]
    raises: type | None = None  # the exception class, or None: run() checks the result
    match: str = ""  # a substring of the message (it names the argument)
    kernels: bool = False  # the values reach the native ops: run on the emulated kernels too
    isolate: bool = False  # could crash the interpreter: run in a child process
    defect: str | None = None  # a known defect: the row is a strict xfail ...
    defect_on: tuple = ("cpu", "cuda-emulated")  # ... on these backends


def ok(id, op, hostile, outcome, x=None, run=None, now=None, under_inference=False, **kw):
    """A row whose result ``op.check`` compares with the reference (or ``run`` checks), on
    the base inputs with changes ``x``; ``now``: what happens instead (a defect row)."""
    if run is None:

        def run(op=op, x=x or {}):
            return op.check(**inputs(op, x))

    if under_inference:
        run = functools.partial(_calls_under_inference_mode, run)
    return Case(id, op.name, hostile, now or outcome, run, **kw)


def err(id, op, hostile, raises, match, x=None, run=None, now=None, **kw):
    """A row that raises ``raises`` with ``match`` in its message; ``now``: what happens
    instead (a defect row) or a fuller description."""
    if run is None:

        def run(op=op, x=x or {}):
            return op.call(**inputs(op, x))

    outcome = now or f"`{raises.__name__}`: {match}"
    return Case(id, op.name, hostile, outcome, run, raises=raises, match=match, **kw)


def _set(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def bool_mask(anchors: torch.Tensor, seq: int) -> torch.Tensor:
    mask = torch.zeros(anchors.shape[0], seq, dtype=torch.bool)
    for b, a in enumerate(anchors.tolist()):
        if a >= 0:
            mask[b, a] = True
    return mask


def _off_anchors(value):
    """``value`` in every row of hidden but the anchor rows."""

    def change(b):
        out = torch.full_like(b["hidden"], value)
        for row, a in enumerate(b["mask"].tolist()):
            out[row, a] = b["hidden"][row, a]
        return out

    return change


def _reversed_uids(b) -> np.ndarray:
    """verl's uid array for the base groups, as a reversed (negative-stride) numpy view."""
    ids = b["group_ids"].flip(0).tolist()
    uids = np.array([f"prompt-{i}" for i in ids], dtype=object)[::-1]
    assert uids.strides[0] < 0
    return uids


def _huge_ids(b) -> torch.Tensor:
    """The base groups relabelled with the extremes of int64."""
    ids = b["group_ids"]
    return torch.where(ids == ids[0], torch.tensor(-(2**63)), torch.tensor(2**63 - 1))


def _inference_copy(key):
    return lambda b: _inference(b[key])[0]


def _meta_of(key):
    return lambda b: _meta(b[key])


def _huge_expand_tokens() -> None:
    """T = 2**40 by expansion, the one-token marker in every position: the scan from the end
    stops at its first tile, the anchor is T - 2."""
    big = 2**40
    ids, mask = torch.full((2, 1), 9).expand(2, big), torch.ones(2, 1).expand(2, big)
    if ha.get_backend() == "cuda-emulated":
        # The kernels rank matches by an int64 key of start * (T + 1): T is bounded there.
        with pytest.raises(ha.ShapeError, match=r"^token_ids: .*T <= 2147483647"):
            ha.find_anchors(ids, mask, [[9]])
        return
    assert ha.find_anchors(ids, mask, [[9]]).tolist() == [big - 2, big - 2]


def _policy_nan(key, index):
    def change(b):
        return _set(b[key], index, NAN)

    return change


def _one_hot(index, shape=(3, 6)) -> torch.Tensor:
    return _set(torch.zeros(shape, dtype=torch.bool), index, True)


def _masked_garbage(value):
    """``value`` at every masked position of log_prob, old_log_prob, advantages and the
    importance weights."""

    def garbage(key):
        def change(b):
            off = b["response_mask"] == 0
            return torch.where(off, torch.full_like(b[key], value), b[key])

        return change

    def weights(b):
        return torch.where(b["response_mask"] == 0, value, torch.ones(3, 6))

    keys = ("log_prob", "old_log_prob", "advantages")
    return {**{k: garbage(k) for k in keys}, "rollout_is_weights": weights}


def _each(transform, keys):
    return {k: (lambda b, k=k: transform(b[k])) for k in keys}


POLICY_TENSORS = ("log_prob", "old_log_prob", "advantages", "response_mask")
ALIGN_TENSORS = ("hidden", "mask", "rewards", "group_ids")


def _misaligned_half(key):
    return lambda b: _misaligned(b[key].half())


class _Unprintable:
    def __str__(self):
        raise ZeroDivisionError("no text")


def _check_meta_ids() -> None:
    ids = dapo.group_ids_from_uids(["a", "b"], device="meta")
    assert ids.device.type == "meta" and ids.dtype == torch.int64 and ids.shape == (2,)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


UID_TEXTS = ["p-1", "p-2", "p-1", "ünï ✓", ""]


# ---------------------------------------------------------------------------------------------
# The table

K = dict(kernels=True)  # values reach the native ops: run on both backends
ISO = dict(isolate=True)  # could crash the interpreter: run in a child process
KISO = dict(kernels=True, isolate=True)
BY_SIZE = dict(group_ids=DROP, group_size=3)

# fmt: off
ALIGN_SHARED = [
    # (suffix, hostile, changes, outcome of ha.loss, outcome of ha.group_anchor_stats, flags)
    ("nan-off-anchor", "NaN in every row of `hidden` that is not an anchor",
     dict(hidden=_off_anchors(NAN)), "the value without them (never read)",
     "the sums without them", K),
    ("nan-anchor", "NaN in the anchor row of a correct rollout",
     dict(hidden=lambda b: _set(b["hidden"], (0, 1, 1), NAN)),
     "NaN loss and `mean_cosine` (documented)", "NaN sums of its group only", K),
    ("zero-norm", "anchor rows of norm 0", dict(hidden=lambda b: b["hidden"] * 0),
     "unit vectors clamp to 0: each pair adds 1 - 0", "zero unit sums, counts as usual", K),
    ("batch-0", "B = 0", dict(hidden=lambda b: b["hidden"][:0], mask=lambda b: b["mask"][:0],
                             rewards=lambda b: b["rewards"][:0], **BY_SIZE),
     "0 (no valid group)", "no groups, NaN `mean_cosine`", K),
    ("seq-0", "T = 0, every anchor -1",
     dict(hidden=lambda b: b["hidden"][:, :0], mask=torch.full((6,), -1)),
     "0", "every group with count 0", K),
    ("hidden-0", "H = 0", dict(hidden=lambda b: b["hidden"][..., :0]),
     "1 per valid group (zero vectors)", "[G, 0] sums, counts as usual", K),
    ("huge-group-ids", "group ids -2**63 and 2**63 - 1", dict(group_ids=_huge_ids),
     "correct", "sorted ids, exact sums", K),
    ("noncontiguous", "non-contiguous `hidden`, column-major bool mask, strided rewards, ids",
     dict(hidden=lambda b: b["hidden"].transpose(1, 2).contiguous().transpose(1, 2),
          mask=lambda b: _column_major(bool_mask(b["mask"], 5)),
          rewards=lambda b: _strided(b["rewards"]), group_ids=lambda b: _strided(b["group_ids"])),
     "correct", "correct", K),
    ("expanded", "`hidden` (along T), rewards and group ids expanded: stride 0",
     dict(hidden=lambda b: b["hidden"][:, :1].expand(6, 5, 3),
          rewards=lambda b: b["rewards"][:1].expand(6),
          group_ids=lambda b: b["group_ids"][:1].expand(6)),
     "correct", "correct", K),
    ("misaligned", "bfloat16 `hidden` at an odd byte address",
     dict(hidden=lambda b: _misaligned(b["hidden"].bfloat16())),
     "correct", "correct", KISO),
    ("far-strides", "`hidden` with strides past 2**31 elements",
     dict(hidden=lambda b: _far(b["hidden"])), "correct", "correct", KISO),
    ("huge-expand", "`hidden` expanded to T = 2**40, anchors up to 2**40 - 1",
     dict(hidden=lambda b: b["hidden"][:, :1].expand(6, 2**40, 3),
          mask=torch.tensor([2**40 - 1, 2**40 - 2, -1, 2**32, 2**31, 0])),
     "correct (only anchor rows are read)", "correct", KISO),
    ("inference-tensors", "mask, rewards, group ids made under `torch.inference_mode()`",
     {k: _inference_copy(k) for k in ALIGN_TENSORS[1:]}, "correct", "correct", {}),
    ("numpy", "a numpy array as `hidden`", dict(hidden=lambda b: b["hidden"].numpy()),
     ha.ArgumentError, "hidden: expected a torch.Tensor, got ndarray", {}),
    ("meta-rewards", "meta `rewards` among CPU tensors", dict(rewards=_meta_of("rewards")),
     ha.DeviceError, "rewards: expected a tensor on cpu (the device of hidden)", ISO),
    ("meta-all", "every tensor on the meta device",
     {k: _meta_of(k) for k in ALIGN_TENSORS},
     ha.DeviceError, "hidden: expected a tensor on cpu or cuda, got one on meta", ISO),
    ("none-rewards", "`rewards=None`", dict(rewards=None),
     ha.ArgumentError, "rewards: expected a torch.Tensor, got NoneType", {}),
    ("hidden-1d", "1-D `hidden`", dict(hidden=lambda b: b["hidden"].reshape(-1)),
     ha.ShapeError, "hidden: expected shape [B, T, H] (padded) or [N, H] (packed), got [90]", {}),
]


def _loss_inference_reference() -> None:
    """The split loss with a reference computed under inference mode (as the no-grad pass
    that computes old log-probs runs) and ``hidden`` requiring grad: with the whole batch as
    the micro-batch, its share is the full-batch loss of the reference."""
    b = align_inputs()
    with torch.inference_mode():
        stats = ha.group_anchor_stats(
            b["hidden"], b["mask"], b["rewards"], group_ids=b["group_ids"]
        )
        per_row = stats.rows(b["group_ids"])
    rows, index = _compact(b["hidden"], b["mask"])
    rows.requires_grad_()
    want, _ = alignment_loss(rows, index, b["rewards"], b["group_ids"])
    want.backward()
    assert stats.unit_sum.is_inference() and per_row.count.is_inference()
    for reference in (stats, per_row):
        h = b["hidden"].clone().requires_grad_()
        value = ha.loss(h, b["mask"], b["rewards"], group_ids=b["group_ids"], reference=reference)
        value.backward()
        _close(value, want)
        for row, a in enumerate(b["mask"].tolist()):
            _close(h.grad[row, a], rows.grad[row, 0])


def _align_shared(op: Op, prefix: str, column: int) -> list:
    rows = []
    for suffix, hostile, x, a, b, flags in ALIGN_SHARED:
        if op is STATS:
            # Its native part is the loss's anchor resolution, run on both backends there.
            flags = {**flags, "kernels": False}
        if isinstance(a, type):
            rows.append(err(f"{prefix}-{suffix}", op, hostile, a, b, x, **flags))
        else:
            rows.append(ok(f"{prefix}-{suffix}", op, hostile, (a, b)[column], x, **flags))
    return rows


def _loss_rows() -> list:
    L = LOSS
    return _align_shared(L, "loss", 0) + [
        ok("loss-inf-off-anchor", L, "+inf in every row of `hidden` that is not an anchor",
           "the value without them", dict(hidden=_off_anchors(INF))),
        ok("loss-nan-incorrect-anchor", L, "NaN in the anchor row of an incorrect rollout",
           "the value without it (`cosine` reads correct anchors only)",
           dict(hidden=lambda b: _set(b["hidden"], (2, 0), NAN)), **K),
        ok("loss-inf-anchor", L, "inf in the anchor row of a correct rollout", "NaN loss",
           dict(hidden=lambda b: _set(b["hidden"], (3, 4, 0), INF))),
        ok("loss-nan-reward", L, "NaN, +inf and -inf rewards",
           "NaN and -inf are incorrect, +inf correct",
           dict(rewards=torch.tensor([NAN, 1, INF, -INF, 1, 1])), **K),
        ok("loss-all-invalid", L, "no group with two correct anchored rollouts",
           "0 with a zero gradient",
           dict(rewards=torch.tensor([1.0, -1, 1, -1, -1, -1]), grad=True), **K),
        ok("loss-all-invalid-none", L, "the same, `reduction=\"none\"`",
           "zeros and an all-False validity mask",
           dict(rewards=torch.tensor([1.0, -1, 1, -1, -1, -1]), reduction="none")),
        ok("loss-huge-ids-none", L, "group ids -2**63 and 2**63 - 1, `reduction=\"none\"`",
           "per-group values in sorted label order", dict(group_ids=_huge_ids, reduction="none"),
           **K),
        ok("loss-odd-offset", L, "bfloat16 `hidden` and int64 anchors at storage offset 1",
           "correct", dict(hidden=lambda b: _odd_offset(b["hidden"].bfloat16()),
                                 mask=lambda b: _odd_offset(b["mask"])), **K),
        ok("loss-mixed-dtypes", L, "bfloat16 `hidden`, uint8 mask, float64 rewards, int32 ids",
           "correct", dict(hidden=lambda b: b["hidden"].bfloat16(),
                                 mask=lambda b: bool_mask(b["mask"], 5).to(torch.uint8),
                                 rewards=lambda b: b["rewards"].double(),
                                 group_ids=lambda b: b["group_ids"].int()), **K),
        ok("loss-readonly-numpy", L, "`hidden` from a read-only numpy array (`from_numpy`)",
           "correct", dict(hidden=lambda b: _read_only_numpy_tensor(b["hidden"]))),
        ok("loss-numpy-uids", L, "`group_ids` as a reversed (negative-stride) numpy uid array",
           "correct (the uids hashed)", dict(group_ids=_reversed_uids)),
        ok("loss-rewards-require-grad", L, "`rewards` with `requires_grad`",
           "correct value and `hidden` gradient; `rewards` gets none",
           dict(rewards=lambda b: b["rewards"].requires_grad_(), grad=True)),
        ok("loss-inference-grad", L, "inference-mode mask, rewards, ids; `hidden` needs grad",
           "correct value and gradient",
           dict(grad=True, **{k: _inference_copy(k) for k in ALIGN_TENSORS[1:]})),
        ok("loss-under-inference-mode", L, "called inside `torch.inference_mode()`",
           "correct value, no autograd graph", under_inference=True),
        ok("loss-inference-reference", L,
           "`reference=` statistics and per-row form made under `torch.inference_mode()`",
           "correct value and gradient", run=_loss_inference_reference),
        ok("loss-empty-uid-list", L, "B = 0 with `group_ids=[]` (an empty uid list)",
           "0, as with an empty numpy uid array",
           dict(hidden=lambda b: b["hidden"][:0], mask=lambda b: b["mask"][:0],
                rewards=lambda b: b["rewards"][:0], group_ids=[])),
        err("loss-numpy-int-ids", L, "`group_ids` as a numpy int64 array", ha.ArgumentError,
            "group_ids: expected a torch.Tensor, got ndarray",
            dict(group_ids=lambda b: b["group_ids"].numpy())),
        err("loss-meta-ids", L, "meta `group_ids` with CPU data", ha.DeviceError,
            "group_ids: expected a tensor on cpu", dict(group_ids=_meta_of("group_ids")), **ISO),
        err("loss-list-hidden", L, "a nested list as `hidden`", ha.ArgumentError,
            "hidden: expected a torch.Tensor, got list",
            dict(hidden=lambda b: b["hidden"].tolist())),
        err("loss-none-mask", L, "`mask=None`", ha.ArgumentError,
            "mask: expected a torch.Tensor, got NoneType", dict(mask=None)),
        err("loss-str-ids", L, "a string as `group_ids`", ha.ArgumentError,
            "group_ids: expected a torch.Tensor, got str", dict(group_ids="aaabbb")),
        err("loss-str-group-size", L, "`group_size=\"3\"`", ha.ArgumentError,
            "group_size: expected an int, got str", dict(group_ids=DROP, group_size="3")),
        err("loss-numpy-group-size", L, "`group_size=np.int64(3)`", ha.ArgumentError,
            "group_size: expected an int, got int64",
            dict(group_ids=DROP, group_size=np.int64(3))),
        err("loss-huge-group-size", L, "`group_size=2**70`", ha.ArgumentError,
            "group_size: expected an int that fits int64", dict(group_ids=DROP, group_size=2**70)),
        err("loss-numpy-threshold", L, "`threshold=np.float32(0.5)`", ha.ArgumentError,
            "threshold: expected a number, got float32", dict(threshold=np.float32(0.5))),
        err("loss-hidden-4d", L, "4-D `hidden`", ha.ShapeError, "hidden: expected shape",
            dict(hidden=lambda b: b["hidden"][None])),
        err("loss-rewards-2d", L, "`rewards` of shape [B, 1]", ha.ShapeError,
            "rewards: expected shape [B]", dict(rewards=lambda b: b["rewards"][:, None])),
        err("loss-ids-2d", L, "`group_ids` of shape [B, 1]", ha.ShapeError,
            "group_ids: expected shape [B]", dict(group_ids=lambda b: b["group_ids"][:, None])),
        err("loss-mask-3d", L, "a 3-D bool mask", ha.ShapeError, "mask: expected",
            dict(mask=lambda b: bool_mask(b["mask"], 5)[None])),
        err("loss-index-huge", L, "anchor index 2**62", ha.ArgumentError,
            "mask: expected -1 or a position in [0, T)",
            dict(mask=lambda b: _set(b["mask"], 0, 2**62))),
        err("loss-index-min", L, "anchor index -2**63", ha.ArgumentError,
            "mask: expected -1 or a position in [0, T)",
            dict(mask=lambda b: _set(b["mask"], 0, -(2**63)))),
        err("loss-complex", L, "complex64 `hidden`", ha.DtypeError, "hidden: expected dtype",
            dict(hidden=lambda b: b["hidden"].to(torch.complex64))),
    ]


def _stats_rows() -> list:
    S = STATS
    return _align_shared(S, "stats", 1) + [
        ok("stats-all-invalid", S, "no group with two correct anchored rollouts",
           "counts below 2, NaN `mean_cosine`",
           dict(rewards=torch.tensor([1.0, -1, 1, -1, -1, -1]))),
        ok("stats-requires-grad", S, "`hidden` and `rewards` with `requires_grad`",
           "correct; sums without autograd history",
           dict(hidden=lambda b: b["hidden"].requires_grad_(),
                rewards=lambda b: b["rewards"].requires_grad_())),
        err("stats-meta-mask", S, "meta `mask` among CPU tensors", ha.DeviceError,
            "mask: expected a tensor on cpu", dict(mask=_meta_of("mask")), **ISO),
    ]


def _find_rows() -> list:
    F = FIND
    return [
        ok("find-nan-mask", F, "NaN, inf and -inf in a float `response_mask`",
           "nonzero, so inside the response (`mask != 0`)",
           dict(response_mask=lambda b: b["response_mask"]
                * torch.tensor([1.0, 1, NAN, INF, 1, -INF, 1, 1])), **K),
        ok("find-batch-0", F, "B = 0", "an empty result",
           dict(token_ids=lambda b: b["token_ids"][:0],
                response_mask=lambda b: b["response_mask"][:0]), **K),
        ok("find-seq-0", F, "T = 0", "-1 for every row",
           dict(token_ids=lambda b: b["token_ids"][:, :0],
                response_mask=lambda b: b["response_mask"][:, :0]), **K),
        ok("find-extreme-ids", F, "token and marker ids -2**63 and 2**63 - 1", "matched exactly",
           dict(token_ids=lambda b: _set(b["token_ids"], (0, slice(5, 7)),
                                         torch.tensor([-(2**63), 2**63 - 1])),
                markers=[[-(2**63), 2**63 - 1]]), **K),
        ok("find-int32-wide-marker", F, "int32 token ids, a marker id 2**40",
           "no match of that spelling", dict(token_ids=lambda b: b["token_ids"].int(),
                                            markers=[[2**40], [9]]), **K),
        ok("find-huge-offset", F, "`offset=2**62`", "-1 (outside [0, T))",
           dict(offset=2**62), **K),
        ok("find-min-offset", F, "`offset=-2**63`", "-1", dict(offset=-(2**63)), **K),
        ok("find-noncontiguous", F, "column-major token ids, strided mask", "correct",
           dict(token_ids=lambda b: _column_major(b["token_ids"]),
                response_mask=lambda b: _strided(b["response_mask"])), **K),
        ok("find-expanded", F, "token ids and mask expanded from one row", "correct",
           dict(token_ids=lambda b: b["token_ids"][:1].expand(3, 8),
                response_mask=lambda b: b["response_mask"][:1].expand(3, 8)), **K),
        ok("find-odd-offset", F, "int32 token ids and mask at storage offset 1",
           "correct", dict(token_ids=lambda b: _odd_offset(b["token_ids"].int()),
                                 response_mask=lambda b: _odd_offset(b["response_mask"])), **K),
        ok("find-far-strides", F, "token ids and mask with row strides past 2**31",
           "correct", _each(_far, ("token_ids", "response_mask")), **KISO),
        ok("find-huge-expand", F, "[2, 2**40] expanded ids, the marker at the end",
           "anchor 2**40 - 2 (the scan stops at the first match); on the CUDA kernels "
           "`ShapeError`: token_ids: T <= 2**31 - 1", run=_huge_expand_tokens, **KISO),
        ok("find-mixed-dtypes", F, "int32 ids, float64 mask, markers as tensors", "correct",
           dict(token_ids=lambda b: b["token_ids"].int(),
                response_mask=lambda b: b["response_mask"].double(),
                markers=[torch.tensor([7, 8]), torch.tensor([9])]), **K),
        ok("find-readonly-numpy", F, "token ids from a read-only numpy array", "correct",
           dict(token_ids=lambda b: _read_only_numpy_tensor(b["token_ids"]))),
        ok("find-mask-requires-grad", F, "float `response_mask` with `requires_grad`",
           "correct",
           dict(response_mask=lambda b: b["response_mask"].double().requires_grad_())),
        ok("find-inference-tensors", F, "inputs made under `torch.inference_mode()`",
           "correct", _each(lambda t: _inference(t)[0], ("token_ids", "response_mask"))),
        err("find-numpy", F, "a numpy array as `token_ids`", ha.ArgumentError,
            "token_ids: expected a torch.Tensor, got ndarray",
            dict(token_ids=lambda b: b["token_ids"].numpy())),
        err("find-list", F, "a nested list as `response_mask`", ha.ArgumentError,
            "response_mask: expected a torch.Tensor, got list",
            dict(response_mask=lambda b: b["response_mask"].tolist())),
        err("find-markers-none", F, "`markers=None`", ha.ArgumentError,
            "markers: expected a list of token-id sequences", dict(markers=None)),
        err("find-markers-str", F, "a string as `markers`", ha.ArgumentError,
            "markers: expected a list of token-id sequences", dict(markers="Answer:")),
        err("find-markers-flat", F, "one flat list of ids as `markers`", ha.ArgumentError,
            "markers[0]: expected a sequence of token ids", dict(markers=[7, 8])),
        err("find-markers-too-wide", F, "a marker id 2**64", ha.ArgumentError,
            "markers[0]: expected ids that fit int64", dict(markers=[[2**64]])),
        err("find-meta-mask", F, "meta `response_mask` among CPU tensors", ha.DeviceError,
            "response_mask: expected a tensor on cpu",
            dict(response_mask=_meta_of("response_mask")), **ISO),
        err("find-meta-all", F, "token ids and mask on the meta device", ha.DeviceError,
            "token_ids: expected a tensor on cpu or cuda, got one on meta",
            _each(_meta, ("token_ids", "response_mask")), **ISO),
        err("find-meta-marker", F, "a marker spelling as a meta tensor", ha.DeviceError,
            "markers[0]: expected a tensor on cpu or cuda, got one on meta",
            dict(markers=[torch.tensor([7, 8]).to("meta")]), **ISO),
        err("find-float-ids", F, "float32 token ids", ha.DtypeError,
            "token_ids: expected dtype int64 or int32",
            dict(token_ids=lambda b: b["token_ids"].float())),
        err("find-ids-1d", F, "1-D token ids and mask", ha.ShapeError,
            "token_ids: expected shape [B, T]",
            _each(lambda t: t[0], ("token_ids", "response_mask"))),
        err("find-mask-shape", F, "a mask of shape [B, T - 1]", ha.ShapeError,
            "response_mask: expected shape [B, T]",
            dict(response_mask=lambda b: b["response_mask"][:, 1:])),
        err("find-offset-float", F, "`offset=1.0`", ha.ArgumentError,
            "offset: expected an int, got float", dict(offset=1.0)),
    ]


def _rows_rows() -> list:
    R = ROWS
    return [
        ok("rows-batch-0", R, "B = 0", "an empty result",
           _each(lambda t: t[:0], ("positions", "attention_mask"))),
        ok("rows-seq-0", R, "T = 0", "-1 everywhere",
           dict(attention_mask=lambda b: b["attention_mask"][:, :0])),
        ok("rows-k-0", R, "positions [B, 0]", "an empty [B, 0] result",
           dict(positions=lambda b: b["positions"][:, None][:, :0])),
        ok("rows-extreme-positions", R, "positions 2**62, -2**63 and -1", "-1 (out of range)",
           dict(positions=torch.tensor([2**62, -(2**63), -1]))),
        ok("rows-all-pad", R, "every position on padding or -1", "-1 everywhere",
           dict(positions=torch.tensor([0, -1, 1]))),
        ok("rows-noncontiguous", R, "strided positions, column-major mask", "correct",
           dict(positions=lambda b: _strided(b["positions"]),
                attention_mask=lambda b: _column_major(b["attention_mask"]))),
        ok("rows-expanded", R, "positions and mask expanded (stride 0)", "correct",
           dict(positions=lambda b: b["positions"][:1].expand(3),
                attention_mask=lambda b: b["attention_mask"][1:2].expand(3, 5))),
        ok("rows-odd-offset", R, "positions and a bool mask at storage offset 1",
           "correct", dict(positions=lambda b: _odd_offset(b["positions"]),
                                 attention_mask=lambda b: _odd_offset(b["attention_mask"] != 0))),
        ok("rows-far-strides", R, "positions and mask with strides past 2**31", "correct",
           _each(_far, ("positions", "attention_mask")), **ISO),
        ok("rows-readonly-numpy", R, "positions from a read-only numpy array", "correct",
           dict(positions=lambda b: _read_only_numpy_tensor(b["positions"]))),
        ok("rows-inference-tensors", R, "inputs made under `torch.inference_mode()`",
           "correct", _each(lambda t: _inference(t)[0], ("positions", "attention_mask"))),
        err("rows-numpy", R, "a numpy array as `positions`", ha.ArgumentError,
            "positions: expected a torch.Tensor, got ndarray",
            dict(positions=lambda b: b["positions"].numpy())),
        err("rows-none", R, "`attention_mask=None`", ha.ArgumentError,
            "attention_mask: expected a torch.Tensor, got NoneType", dict(attention_mask=None)),
        err("rows-meta-positions", R, "meta positions with a CPU mask", ha.DeviceError,
            "positions: expected a tensor on cpu", dict(positions=_meta_of("positions")), **ISO),
        ok("rows-meta-all", R, "both on the meta device",
           "a meta int64 result of the shape of `positions` (torch ops only, no data read)",
           run=_unpadded_rows_on_meta, **ISO),
        err("rows-float-mask", R, "a float mask (with a NaN)", ha.DtypeError,
            "attention_mask: expected bool or integer",
            dict(attention_mask=lambda b: _set(b["attention_mask"].float(), (0, 0), NAN))),
        err("rows-int32-positions", R, "int32 positions", ha.DtypeError,
            "positions: expected int64", dict(positions=lambda b: b["positions"].int())),
        err("rows-positions-3d", R, "positions [B, 1, 1]", ha.ShapeError,
            "positions: expected [B] or [B, K]",
            dict(positions=lambda b: b["positions"][:, None, None])),
        err("rows-mask-1d", R, "a 1-D mask", ha.ShapeError,
            "attention_mask: expected a [B, T] tensor",
            dict(attention_mask=lambda b: b["attention_mask"][0])),
    ]


def _group_rows(op: Op, prefix: str, arg: str) -> list:
    """Rows shared by group_advantages and dynamic_sampling_mask (``arg``: their tensor)."""
    adv = prefix == "adv"
    v = lambda f: {arg: lambda b: f(b[arg])}  # noqa: E731 - a change of the values only
    both = lambda f: _each(f, (arg, "group_ids"))  # noqa: E731
    return [
        ok(f"{prefix}-nan", op, f"NaN in `{arg}`",
           "NaN advantages for its group only" if adv else "its group dropped (std is NaN)",
           v(lambda s: _set(s, 1, NAN)), **K),
        ok(f"{prefix}-batch-0", op, "B = 0", "an empty result",
           {arg: lambda b: b[arg][:0], **BY_SIZE}, **K),
        ok(f"{prefix}-all-invalid", op, "every group constant (no signal)",
           "zeros" if adv else "nothing kept", v(torch.ones_like), **K),
        ok(f"{prefix}-singletons", op, "every group a single rollout",
           "the score itself (mean 0, std 1)" if adv else "every rollout kept",
           dict(group_ids=torch.arange(6) * 2**61 - 2**62), **K),
        ok(f"{prefix}-huge-ids", op, "group ids -2**63 and 2**63 - 1", "correct",
           dict(group_ids=_huge_ids), **K),
        ok(f"{prefix}-noncontiguous", op, f"strided `{arg}` and ids", "correct",
           both(_strided), **K),
        ok(f"{prefix}-expanded", op, f"`{arg}` and ids expanded (stride 0)", "correct",
           both(lambda t: t[:1].expand(6)), **K),
        ok(f"{prefix}-odd-offset", op, f"`{arg}` and ids at storage offset 1", "correct",
           both(_odd_offset), **K),
        ok(f"{prefix}-mixed-dtypes", op, f"float16 `{arg}`, int32 ids", "correct",
           {arg: lambda b: b[arg].half(), "group_ids": lambda b: b["group_ids"].int()}, **K),
        ok(f"{prefix}-misaligned", op, f"float16 `{arg}` at an odd byte address",
           "correct", {arg: _misaligned_half(arg)}, **KISO),
        ok(f"{prefix}-far-strides", op, f"`{arg}` and ids with strides past 2**31",
           "correct", both(_far), **KISO),
        ok(f"{prefix}-readonly-numpy", op, f"`{arg}` from a read-only numpy array",
           "correct", v(_read_only_numpy_tensor)),
        ok(f"{prefix}-numpy-uids", op, "a reversed numpy uid array as `group_ids`",
           "correct (the uids hashed)", dict(group_ids=_reversed_uids)),
        ok(f"{prefix}-requires-grad", op, f"`{arg}` with `requires_grad`",
           "correct, no autograd history", v(lambda s: s.requires_grad_())),
        ok(f"{prefix}-inference-tensors", op, "inputs made under `torch.inference_mode()`",
           "correct", both(lambda t: _inference(t)[0])),
        ok(f"{prefix}-under-inference-mode", op, "called inside `torch.inference_mode()`",
           "correct", under_inference=True),
        err(f"{prefix}-numpy", op, f"a numpy array as `{arg}`", ha.ArgumentError,
            f"{arg}: expected a torch.Tensor, got ndarray", v(lambda s: s.numpy())),
        err(f"{prefix}-list", op, f"a list as `{arg}`", ha.ArgumentError,
            f"{arg}: expected a torch.Tensor, got list", v(lambda s: s.tolist())),
        err(f"{prefix}-numpy-int-ids", op, "a numpy int64 array as `group_ids`",
            ha.ArgumentError, "group_ids: expected a torch.Tensor, got ndarray",
            dict(group_ids=lambda b: b["group_ids"].numpy())),
        err(f"{prefix}-float-ids", op, "float group ids with `requires_grad`", ha.DtypeError,
            "group_ids: expected dtype int64 or int32",
            dict(group_ids=lambda b: b["group_ids"].float().requires_grad_())),
        err(f"{prefix}-huge-group-size", op, "`group_size=2**63`", ha.ArgumentError,
            "group_size: expected an int that fits int64",
            dict(group_ids=DROP, group_size=2**63)),
        err(f"{prefix}-meta-ids", op, "meta `group_ids` with CPU data", ha.DeviceError,
            f"group_ids: expected a tensor on cpu (the device of {arg})",
            dict(group_ids=_meta_of("group_ids")), **ISO),
        err(f"{prefix}-meta-all", op, "every tensor on the meta device", ha.DeviceError,
            f"{arg}: expected a tensor on cpu or cuda, got one on meta", both(_meta), **ISO),
        err(f"{prefix}-3d", op, f"3-D `{arg}`", ha.ShapeError, f"{arg}: expected shape [B]",
            v(lambda s: s[:, None, None])),
    ]


def _adv_rows() -> list:
    A = ADV
    return _group_rows(A, "adv", "scores") + [
        ok("adv-inf", A, "inf in `scores`", "NaN advantages for its group only",
           dict(scores=lambda b: _set(b["scores"], 4, INF)), **K),
        ok("adv-token-level-0", A, "token-level scores [B, 0]", "zeros (every sum is 0)",
           dict(scores=lambda b: b["scores"][:, None][:, :0]), **K),
        ok("adv-token-level-far", A, "token-level scores with row strides past 2**31",
           "correct", dict(scores=lambda b: _far(b["scores"][:, None].repeat(1, 3))),
           **KISO),
        err("adv-bool", A, "bool scores", ha.DtypeError, "scores: expected dtype",
            dict(scores=lambda b: b["scores"] > 0)),
        err("adv-norm-by-std-str", A, "`norm_by_std=\"false\"`", ha.ArgumentError,
            "norm_by_std: expected a bool, got str", dict(norm_by_std="false")),
        err("adv-norm-by-std-tensor", A, "`norm_by_std` as a one-element tensor",
            ha.ArgumentError, "norm_by_std: expected a bool, got Tensor",
            dict(norm_by_std=torch.tensor(False))),
    ]


def _sample_rows() -> list:
    S = SAMPLE
    return _group_rows(S, "sample", "metric") + [
        ok("sample-inf", S, "inf in `metric`", "its group dropped (verl: std is NaN)",
           dict(metric=lambda b: _set(b["metric"], 4, INF)), **K),
        ok("sample-bool-metric", S, "a bool metric", "correct",
           dict(metric=lambda b: b["metric"] > 0), **K),
        err("sample-2d", S, "a 2-D metric", ha.ShapeError, "metric: expected shape [B]",
            dict(metric=lambda b: b["metric"][:, None])),
    ]


def _overlong_rows() -> list:
    O = OVERLONG  # noqa: E741
    n = "response_lengths"
    v = lambda f: {n: lambda b: f(b[n])}  # noqa: E731
    return [
        ok("overlong-inf", O, "lengths +inf and -inf", "-inf and 0",
           {n: torch.tensor([INF, -INF, 3.0])}, **K),
        ok("overlong-nan", O, "a NaN length", "NaN, as the formula gives",
           {n: torch.tensor([NAN, 19.0])}, **K),
        ok("overlong-batch-0", O, "B = 0", "an empty result", v(lambda t: t[:0]), **K),
        ok("overlong-extreme", O, "int64 lengths 2**62 and -2**63",
           "the formula, rounded to float32", {n: torch.tensor([2**62, -(2**63)])}, **K),
        ok("overlong-noncontiguous", O, "strided lengths", "correct", v(_strided), **K),
        ok("overlong-expanded", O, "lengths expanded (stride 0)", "correct",
           v(lambda t: t[2:3].expand(4)), **K),
        ok("overlong-odd-offset", O, "int32 lengths at storage offset 1", "correct",
           v(lambda t: _odd_offset(t.int())), **K),
        ok("overlong-misaligned", O, "float16 lengths at an odd byte address", "correct",
           {n: _misaligned_half(n)}, **KISO),
        ok("overlong-far-strides", O, "lengths with a stride past 2**31", "correct",
           v(_far), **KISO),
        ok("overlong-readonly-numpy", O, "lengths from a read-only numpy array",
           "correct", v(_read_only_numpy_tensor)),
        ok("overlong-requires-grad", O, "float lengths with `requires_grad`",
           "correct, no autograd history", v(lambda t: t.float().requires_grad_())),
        ok("overlong-inference-tensors", O, "lengths made under `torch.inference_mode()`",
           "correct", v(lambda t: _inference(t)[0])),
        err("overlong-numpy", O, "a numpy array of lengths", ha.ArgumentError,
            "response_lengths: expected a torch.Tensor, got ndarray", v(lambda t: t.numpy())),
        err("overlong-none", O, "`response_lengths=None`", ha.ArgumentError,
            "response_lengths: expected a torch.Tensor, got NoneType", {n: None}),
        err("overlong-meta", O, "lengths on the meta device", ha.DeviceError,
            "response_lengths: expected a tensor on cpu or cuda, got one on meta", v(_meta),
            **ISO),
        err("overlong-2d", O, "lengths [B, 1]", ha.ShapeError,
            "response_lengths: expected shape [B]", v(lambda t: t[:, None])),
        err("overlong-str-max", O, "`max_response_length=\"20\"`", ha.ArgumentError,
            "max_response_length: expected a number, got str", dict(max_response_length="20")),
        err("overlong-buffer-0", O, "`buffer_length=0`", ha.ArgumentError,
            "buffer_length: expected a finite number > 0", dict(buffer_length=0)),
        err("overlong-nan-factor", O, "`penalty_factor=nan`", ha.ArgumentError,
            "penalty_factor: expected a finite number", dict(penalty_factor=NAN)),
        err("overlong-complex", O, "complex lengths", ha.DtypeError,
            "response_lengths: expected dtype", v(lambda t: t.to(torch.complex64))),
    ]


def _policy_under_inference_mode() -> None:
    lp, old, adv, mask = policy_inputs().values()
    loss, metrics = dapo.policy_loss(lp.requires_grad_(), old, adv, mask)
    want, want_metrics, _ = run_reference(lp, old, adv, mask)
    assert loss.grad_fn is None
    _close(loss, want, atol=1e-5, rtol=1e-5)
    for key, value in want_metrics.items():
        _close(metrics[key], value, atol=1e-5, rtol=1e-5)


def _policy_mixed_dtypes(log_prob_dtype, other_dtype) -> None:
    """``log_prob`` in one dtype, old log-probs and advantages in another: the result is the
    op's on every input cast to the promoted dtype, the gradient that one cast back to
    ``log_prob``'s dtype, and within rounding of the float64 reference. The kernels have no
    float64: there, a float64 ``old_log_prob`` is refused by name."""
    b = policy_inputs()
    lp = b["log_prob"].to(log_prob_dtype)
    old, adv = b["old_log_prob"].to(other_dtype), b["advantages"].to(other_dtype)
    wide = torch.promote_types(log_prob_dtype, other_dtype)
    if wide == torch.float64 and ha.get_backend() == "cuda-emulated":
        with pytest.raises(ha.DtypeError, match=r"^old_log_prob: .*CPU backend only"):
            dapo.policy_loss(lp.requires_grad_(), old, adv, b["response_mask"])
        return
    x = lp.clone().requires_grad_()
    loss, metrics = dapo.policy_loss(x, old, adv, b["response_mask"])
    loss.backward()
    y = lp.to(wide).requires_grad_()
    want, want_metrics = dapo.policy_loss(y, old.to(wide), adv.to(wide), b["response_mask"])
    want.backward()
    assert loss.dtype == want.dtype and x.grad.dtype == log_prob_dtype
    assert torch.equal(loss, want) and torch.equal(x.grad, y.grad.to(log_prob_dtype))
    assert all(torch.equal(metrics[k], want_metrics[k]) for k in want_metrics)
    ref, ref_metrics, ref_grad = run_reference(lp, old, adv, b["response_mask"])
    _close(loss, ref, atol=1e-5, rtol=1e-5)
    for key, value in ref_metrics.items():
        _close(metrics[key], value, atol=1e-5, rtol=1e-5)
    tol = 1e-5 if log_prob_dtype == torch.float32 else 4e-3  # one rounding to bfloat16
    _close(x.grad, ref_grad, atol=tol, rtol=tol)


def _policy_rows() -> list:
    P = POLICY
    return [
        ok("policy-nan-masked", P, "NaN at masked positions of every input and the weights",
           "the value, metrics and gradient without it", _masked_garbage(NAN), **K),
        ok("policy-inf-masked", P, "inf at masked positions", "the same",
           _masked_garbage(INF)),
        ok("policy-nan-valid", P, "NaN in `log_prob` at a valid position",
           "NaN loss and metrics (documented), NaN gradient at that position",
           dict(log_prob=_policy_nan("log_prob", (0, 1)), nan_grad=_one_hot((0, 1))), **K),
        ok("policy-nan-mask", P, "NaN in a float `response_mask`",
           "NaN loss, metrics and gradient (a NaN weight is a valid position)",
           dict(response_mask=_policy_nan("response_mask", (1, 2)),
                nan_grad=torch.ones(3, 6, dtype=torch.bool)), **K),
        ok("policy-batch-0", P, "B = 0", "0 with a zero gradient",
           _each(lambda t: t[:0], POLICY_TENSORS), **K),
        ok("policy-seq-0", P, "T = 0 with `log_prob` requiring grad",
           "0 with 0 metrics and a [B, 0] gradient", _each(lambda t: t[:, :0], POLICY_TENSORS),
           **K),
        ok("policy-all-masked", P, "every position masked",
           "0 with a zero gradient and 0 metrics",
           dict(response_mask=lambda b: b["response_mask"] * 0), **K),
        ok("policy-noncontiguous", P, "column-major `log_prob` and mask, strided advantages",
           "correct",
           dict(log_prob=lambda b: _column_major(b["log_prob"]),
                response_mask=lambda b: _column_major(b["response_mask"]),
                advantages=lambda b: _strided(b["advantages"])), **K),
        ok("policy-expanded", P, "per-rollout advantages and a mask expanded to [B, T]",
           "correct", dict(advantages=lambda b: b["advantages"][:, :1].expand(3, 6),
                                 response_mask=lambda b: b["response_mask"][:1].expand(3, 6)),
           **K),
        ok("policy-odd-offset", P, "every input at storage offset 1", "correct",
           _each(_odd_offset, POLICY_TENSORS), **K),
        ok("policy-misaligned", P, "float16 inputs at an odd byte address", "correct",
           dict(tol=2e-3, **{k: _misaligned_half(k) for k in POLICY_TENSORS[:3]}), **KISO),
        ok("policy-far-strides", P, "inputs with row strides past 2**31", "correct",
           _each(_far, POLICY_TENSORS), **KISO),
        ok("policy-readonly-numpy", P, "`old_log_prob` from a read-only numpy array",
           "correct",
           dict(old_log_prob=lambda b: _read_only_numpy_tensor(b["old_log_prob"]))),
        ok("policy-others-require-grad", P,
           "`old_log_prob`, advantages, mask and weights with `requires_grad`",
           "correct; only `log_prob` gets a gradient",
           dict(rollout_is_weights=torch.ones(3, 6).requires_grad_(),
                **_each(lambda t: t.requires_grad_(), POLICY_TENSORS[1:]))),
        ok("policy-inference-tensors", P,
           "`old_log_prob`, advantages, mask made under `torch.inference_mode()`",
           "correct value and gradient (they are copied to be saved for backward)",
           _each(lambda t: _inference(t)[0], POLICY_TENSORS[1:]), **K),
        ok("policy-under-inference-mode", P, "called inside `torch.inference_mode()`",
           "correct value, no autograd graph",
           run=functools.partial(_calls_under_inference_mode, _policy_under_inference_mode)),
        ok("policy-mixed-dtypes", P, "float64 `old_log_prob` with float32 `log_prob`",
           "computed in float64 (the widest dtype, as PyTorch promotes), float32 gradient; "
           "on the CUDA kernels (no float64) `DtypeError` naming `old_log_prob`",
           run=functools.partial(_policy_mixed_dtypes, torch.float32, torch.float64), **K),
        ok("policy-bf16-log-prob", P,
           "bfloat16 `log_prob` with float32 `old_log_prob` and advantages (an autocast forward)",
           "computed in float32; bfloat16 gradient",
           run=functools.partial(_policy_mixed_dtypes, torch.bfloat16, torch.float32), **K),
        err("policy-numpy", P, "a numpy array as `log_prob`", ha.ArgumentError,
            "log_prob: expected a torch.Tensor, got ndarray",
            dict(log_prob=lambda b: b["log_prob"].numpy())),
        err("policy-none", P, "`old_log_prob=None`", ha.ArgumentError,
            "old_log_prob: expected a torch.Tensor, got NoneType", dict(old_log_prob=None)),
        err("policy-list-weights", P, "a list as `rollout_is_weights`", ha.ArgumentError,
            "rollout_is_weights: expected a torch.Tensor, got list",
            dict(rollout_is_weights=[1.0])),
        err("policy-meta-old", P, "meta `old_log_prob` among CPU tensors", ha.DeviceError,
            "old_log_prob: expected a tensor on cpu",
            dict(old_log_prob=_meta_of("old_log_prob")), **ISO),
        err("policy-meta-all", P, "every tensor on the meta device", ha.DeviceError,
            "log_prob: expected a tensor on cpu or cuda, got one on meta",
            _each(_meta, POLICY_TENSORS), **ISO),
        err("policy-meta-normaliser", P, "`batch_num_tokens` as a meta tensor",
            ha.DeviceError, "batch_num_tokens: expected a tensor on cpu or cuda, got one on meta",
            dict(batch_num_tokens=torch.tensor(9.0).to("meta")), **ISO),
        err("policy-int", P, "int64 log-probs", ha.DtypeError, "log_prob: expected dtype",
            _each(lambda t: t.long(), POLICY_TENSORS)),
        err("policy-1d", P, "1-D `log_prob`", ha.ShapeError, "log_prob: expected shape [B, T]",
            dict(log_prob=lambda b: b["log_prob"][0])),
        err("policy-adv-0d", P, "0-d advantages", ha.ShapeError, "advantages: expected shape",
            dict(advantages=torch.tensor(1.0))),
        err("policy-huge-dp", P, "`dp_size=2**63`", ha.ArgumentError,
            "dp_size: expected an int that fits int64", dict(dp_size=2**63)),
        err("policy-str-clip", P, "`clip_ratio_low=\"0.2\"`", ha.ArgumentError,
            "clip_ratio_low: expected a number, got str", dict(clip_ratio_low="0.2")),
        err("policy-normaliser-2", P, "`batch_num_tokens` with two elements", ha.ArgumentError,
            "batch_num_tokens: expected a number or a 1-element tensor",
            dict(batch_num_tokens=torch.tensor([1.0, 2.0]))),
    ]


def _logprobs_inference_tensors() -> None:
    """``weight``, ``bias`` and ``targets`` made under ``torch.inference_mode()`` (a frozen head)
    with ``hidden`` requiring grad: log-probs, entropy and the gradient of ``hidden`` against
    float64 ``log_softmax``."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(7, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 3), generator=g)
    frozen = _inference(weight, bias, targets)
    assert all(t.is_inference() for t in frozen)
    h = hidden.clone().requires_grad_()
    logp, entropy = ha.token_logprobs(h, *frozen[:1], frozen[2], bias=frozen[1],
                                      return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    x = hidden.clone().requires_grad_()
    log_softmax = torch.log_softmax(x @ weight.T + bias, dim=-1)
    want = log_softmax.gather(-1, targets[..., None])[..., 0]
    want_entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    (want.sum() + want_entropy.sum()).backward()
    _close(logp, want)
    _close(entropy, want_entropy)
    _close(h.grad, x.grad)


def _logprobs_rows() -> list:
    T = LOGPROBS
    return [
        ok("logprobs-inference-tensors", T,
           "`weight`, `bias`, `targets` made under `torch.inference_mode()`, `hidden` needing "
           "grad", "correct values and gradient (they are copied to be saved for backward)",
           run=_logprobs_inference_tensors),
    ]


def _uid_rows() -> list:
    U, fn, t = UIDS, dapo.group_ids_from_uids, UID_TEXTS
    return [
        ok("uids-empty", U, "an empty list", "an empty int64 tensor",
           run=lambda: check_uids([], [])),
        ok("uids-reversed-numpy", U, "a reversed (negative-stride) numpy object array",
           "the hashes of its items in order",
           run=lambda: check_uids(np.array(t, dtype=object)[::-1], t[::-1])),
        ok("uids-strided-numpy", U, "a strided column of a 2-D numpy array", "the hashes",
           run=lambda: check_uids(np.array([t, t], dtype=object).T[:, 1], t)),
        ok("uids-readonly-numpy", U, "a read-only numpy array", "the hashes",
           run=lambda: check_uids(_read_only(np.array(t, dtype=object)), t)),
        ok("uids-fixed-width", U, "numpy `U` and `S` arrays", "the hashes of the text",
           run=lambda: (check_uids(np.array(t), t),
                        check_uids(np.array([b"p-1", b"p-2"]), [b"p-1", b"p-2"]))),
        ok("uids-mixed-items", U, "None, ints, bytes, NUL characters among the uids",
           "items through `str()`, bytes as they are",
           run=lambda: check_uids([None, 7, b"p-1", "a\x00b"], [None, 7, b"p-1", "a\x00b"])),
        ok("uids-generator", U, "a generator", "the hashes",
           run=lambda: check_uids((u for u in t), t)),
        ok("uids-long", U, "a 1 MB uid", "its hash",
           run=lambda: check_uids(["x" * 2**20], ["x" * 2**20])),
        ok("uids-meta-device", U, "`device=\"meta\"`",
           "an int64 meta tensor of the right shape (hashed on the CPU, then moved)",
           run=_check_meta_ids),
        err("uids-str", U, "a single string", ha.ArgumentError,
            "uids: expected a sequence of uid strings, got a single str", run=lambda: fn("p-1")),
        err("uids-tensor", U, "a tensor", ha.ArgumentError,
            "uids: expected uid strings, got a tensor", run=lambda: fn(torch.arange(3))),
        err("uids-2d", U, "a 2-D numpy array", ha.ArgumentError,
            "uids: expected a 1-D sequence of uids, got 2 dimensions",
            run=lambda: fn(np.array([t, t], dtype=object))),
        err("uids-unprintable", U, "an item whose `__str__` raises", ZeroDivisionError,
            "no text", run=lambda: fn([_Unprintable()]), now="that item's own exception"),
        err("uids-none", U, "`None`", ha.ArgumentError,
            "uids: expected a sequence of uid strings, got NoneType", run=lambda: fn(None)),
        err("uids-int", U, "an int", ha.ArgumentError,
            "uids: expected a sequence of uid strings, got int", run=lambda: fn(5)),
        err("uids-surrogate", U, "a str with a lone surrogate (no UTF-8 form)",
            ha.ArgumentError, "uids[1]: expected a uid with a UTF-8 encoding",
            run=lambda: fn(["ok", "\ud800"])),
    ]
# fmt: on


# Per op: the rows with a result first, then those that raise (a stable sort keeps the rest).
CASES = [
    case
    for rows in (
        _loss_rows(), _stats_rows(), _find_rows(), _rows_rows(), _adv_rows(), _sample_rows(),
        _overlong_rows(), _policy_rows(), _logprobs_rows(), _uid_rows(),
    )
    for case in sorted(rows, key=lambda case: case.raises is not None)
]  # fmt: skip
BY_ID = {case.id: case for case in CASES}
# A row that kills its process: the isolation's own check (not part of the table).
_PROBES = {"abort": Case("abort", "-", "-", "-", os.abort)}


# ---------------------------------------------------------------------------------------------
# Running a row


EMULATED = ha.cuda_status()["emulation_built"]  # this build runs the CUDA kernels on the CPU


def _backends(case: Case) -> tuple:
    if case.kernels and EMULATED:
        return ("cpu", "cuda-emulated")
    return ("cpu",)


def execute(case: Case, backend: str) -> None:
    """Runs one row; raises unless it behaves as its row says."""
    torch.manual_seed(0)
    with ha.backend(backend):
        if case.raises is None:
            case.run()
            return
        with pytest.raises(case.raises) as caught:
            case.run()
        message = str(caught.value)
        assert case.match in message, f"{message!r} does not contain {case.match!r}"


def outcome(key: str) -> str:
    """``"pass"`` or what went wrong, for the child process."""
    case_id, backend = key.rsplit("@", 1)
    case = BY_ID.get(case_id) or _PROBES[case_id]
    try:
        execute(case, backend)
    except BaseException as e:  # pytest's Failed derives from BaseException
        return f"{type(e).__name__}: {e}"[:2000]
    return "pass"


_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
import test_hostile_inputs as m
for key in {keys!r}:
    print("START " + key, flush=True)
    print("DONE " + json.dumps([key, m.outcome(key)]), flush=True)
"""


def run_isolated(keys: list, timeout: float = 120) -> dict:
    """Runs the rows in a child interpreter, one after another; after a crash or a hang the
    row in flight is reported as such and a fresh child takes the rest."""
    results, todo = {}, list(keys)
    tests = os.path.dirname(os.path.abspath(__file__))
    while todo:
        code = _CHILD.format(tests=tests, keys=todo)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
            )
            out, why = proc.stdout, f"exit status {proc.returncode}: {proc.stderr[-1500:]}"
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            why = f"no answer within {timeout} s"
        started = None
        for line in out.splitlines():
            if line.startswith("START "):
                started = line[6:]
            elif line.startswith("DONE "):
                key, result = json.loads(line[5:])
                results[key] = result
                started = None
        if started is not None:
            results[started] = f"the child process died in this row ({why})"
        elif not any(key in results for key in todo):
            for key in todo:
                results[key] = f"the child process did not start ({why})"
        todo = [key for key in todo if key not in results]
    return results


# ---------------------------------------------------------------------------------------------
# Tests


def _params() -> list:
    params = []
    for case in CASES:
        for backend in _backends(case):
            marks = []
            if case.defect and backend in case.defect_on:
                marks.append(pytest.mark.xfail(strict=True, reason=case.defect))
            params.append(pytest.param(case, backend, id=f"{case.id}@{backend}", marks=marks))
    return params


# The probe kills the child, and the row after it must still run, in a fresh child.
PROBE_KEYS = ["abort@cpu", "uids-empty@cpu"]


@pytest.fixture(scope="module")
def isolated(request) -> dict:
    """Outcomes of the selected rows that run in a child process, all in one child, then the
    probe of the isolation itself."""
    keys = []
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if spec is not None and item.originalname == "test_hostile_input":
            case = spec.params["case"]
            if case.isolate:
                keys.append(f"{case.id}@{spec.params['backend']}")
    return run_isolated(keys + PROBE_KEYS)


@pytest.mark.parametrize("case,backend", _params())
def test_hostile_input(case, backend, request):
    if case.isolate:
        result = request.getfixturevalue("isolated")[f"{case.id}@{backend}"]
        assert result == "pass", result
    else:
        execute(case, backend)


def test_a_crash_in_a_child_fails_only_its_row(isolated):
    assert isolated["abort@cpu"].startswith("the child process died in this row")
    assert isolated["uids-empty@cpu"] == "pass"


def test_rows_are_unique_and_described():
    assert len(BY_ID) == len(CASES)
    for case in CASES:
        assert case.hostile and case.outcome, case.id
        assert case.raises is None or case.match, case.id
        assert not case.defect or "defect" in case.outcome, case.id


def catalogue_lines() -> list:
    """The README's "Hostile inputs" table: one line per row of CASES, in order."""
    lines = ["| input | what happens |", "|---|---|"]
    for case in CASES:
        cell = f"`{case.op}`: {case.hostile}"
        lines.append(f"| {cell.replace('|', '/')} | {case.outcome.replace('|', '/')} |")
    return lines


def catalogue_markdown() -> str:
    return "\n".join(catalogue_lines()) + "\n"


def test_readme_catalogue_matches_the_rows():
    """The table under the README's "Hostile inputs" heading is this file's rows, one to one."""
    readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
    with open(readme, encoding="utf-8") as f:
        text = f.read().splitlines()
    heading = [
        i for i, line in enumerate(text) if line.startswith("#") and "Hostile inputs" in line
    ]
    assert heading, "README.md has no 'Hostile inputs' section (catalogue_markdown() makes it)"
    table = []
    for line in text[heading[0] + 1 :]:
        if line.startswith("|"):
            table.append(line)
        elif table or line.startswith("#"):
            break
    assert table == catalogue_lines()
