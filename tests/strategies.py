"""Hypothesis strategies for tests/test_properties.py: alignment-loss cases over shapes, memory
layouts, dtypes, anchor forms and group structures; DAPO policy-loss cases; and the helpers that
lay values out in memory, split a case into micro-batches and keep half-precision inputs clear of
the policy loss's kinks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from dapo_cases import MODES
from hypothesis import strategies as st

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
HALF_DTYPES = (torch.bfloat16, torch.float16)

# Group labels at the ends of int64 and around the int32 range, where a label that is narrowed,
# negated or used as an offset would go wrong.
LABEL_EXTREMES = [-(2**63), 2**63 - 1, -1, 0, 1, 2**31, -(2**31) - 1, 2**31 - 1]

# Memory layouts of a float tensor. "contiguous"; "transposed": the same logical tensor stored
# with its first dimension innermost (T-major for [B, T, H], column-major for [N, H]); "offset":
# a strided view (feature stride 2, odd storage offset) into a NaN-filled buffer, so that a read
# outside the view shows up as NaN; "broadcast": a view with a zero stride ([B, T, H]: every
# position of a row shares one storage row; [N, H] and [B, T]: rows overlapping in storage).
LAYOUTS = ["contiguous", "transposed", "offset", "broadcast"]
# The layouts whose elements each own their storage (a value can be changed at one position).
INJECTIVE_LAYOUTS = ["contiguous", "transposed", "offset"]


def lay_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` in ``layout``. Injective layouts keep the values; "broadcast" keeps those of
    the storage it shares (see :data:`LAYOUTS`), so read the values back from the result."""
    if layout == "contiguous" or values.numel() == 0:
        return values.contiguous()
    if layout == "transposed":
        if values.dim() == 1:
            return values.contiguous()
        order = list(range(values.dim()))
        order[0], order[1] = order[1], order[0]
        return values.permute(order).contiguous().permute(order)
    if layout == "offset":
        width = values.shape[-1]
        fill = float("nan") if values.dtype.is_floating_point else 0
        buf = torch.full((*values.shape[:-1], 2 * width + 1), fill, dtype=values.dtype)
        view = buf[..., 1::2][..., :width]
        view.copy_(values)
        return view
    if layout == "broadcast":
        if values.dim() == 3:
            return values[:, :1].expand(values.shape)
        # rows overlapping in storage: row i starts at element i * step of a flat buffer
        rows, width = values.shape
        step = max(1, width // 2)
        flat = torch.empty(step * (rows - 1) + width, dtype=values.dtype)
        for i in range(rows):
            flat[i * step : i * step + width] = values[i]
        return flat.as_strided((rows, width), (step, 1))
    raise ValueError(layout)


@dataclass
class Grouping:
    labels: torch.Tensor  # int64 [B]: the group label of each rollout (for the references)
    group_ids: torch.Tensor | None  # what the ops receive (int64 or int32), or None
    group_size: int | None

    @property
    def batch(self) -> int:
        return self.labels.shape[0]

    def kwargs(self) -> dict:
        return dict(group_ids=self.group_ids, group_size=self.group_size)


@st.composite
def groupings(draw, max_batch=16, min_batch=1):
    """Contiguous blocks (``group_size``) or shuffled labels (``group_ids``): any number of
    groups of any sizes, singletons included, labels anywhere in int64, sometimes as int32."""
    if draw(st.sampled_from(["ids", "size"])) == "size":
        size = draw(st.integers(1, max_batch))
        lowest = max(1, -(-min_batch // size))
        count = draw(st.integers(lowest, max(lowest, max_batch // size)))
        labels = torch.arange(size * count) // size
        return Grouping(labels, None, size)
    batch = draw(st.integers(min_batch, max_batch))
    num = draw(st.integers(1, batch))
    label = st.sampled_from(LABEL_EXTREMES) | st.integers(-(2**63), 2**63 - 1)
    values = draw(st.lists(label, min_size=num, max_size=num, unique=True))
    extra = draw(st.lists(st.integers(0, num - 1), min_size=batch - num, max_size=batch - num))
    order = draw(st.permutations(list(range(num)) + extra))
    labels = torch.tensor([values[k] for k in order], dtype=torch.int64)
    ids = labels
    if all(-(2**31) <= v < 2**31 for v in values) and draw(st.integers(0, 3)) == 0:
        ids = labels.to(torch.int32)
    return Grouping(labels, ids, None)


def members(labels: torch.Tensor) -> list:
    """The rollouts of each group, groups in sorted label order."""
    return [(labels == g).nonzero().flatten().tolist() for g in torch.unique(labels, sorted=True)]


@st.composite
def outcomes(draw, labels: torch.Tensor):
    """``(correct, anchored)`` lists: each group has no, one, all or some correct rollouts;
    rollouts without an anchor anywhere."""
    batch = labels.shape[0]
    correct = [False] * batch
    for rows in members(labels):
        pattern = draw(st.sampled_from(["none", "one", "all", "some"]))
        if pattern == "one":
            correct[draw(st.sampled_from(rows))] = True
        elif pattern == "all":
            for b in rows:
                correct[b] = True
        elif pattern == "some":
            for b in rows:
                correct[b] = draw(st.booleans())
    if draw(st.booleans()):
        anchored = [True] * batch
    else:
        anchored = draw(st.lists(st.booleans(), min_size=batch, max_size=batch))
    return correct, anchored


@st.composite
def rewards_for(draw, correct: list) -> torch.Tensor:
    """Rewards whose ``rewards > 0.5`` (or bool value) is ``correct``: DAPO scores, bools, or
    accuracies with 0.5 itself and NaN among the incorrect ones."""
    form = draw(st.sampled_from(["scores", "bool", "accuracy"]))
    if form == "scores":
        return torch.tensor([1.0 if c else -1.0 for c in correct], dtype=torch.float32)
    if form == "bool":
        return torch.tensor(correct, dtype=torch.bool)
    good, bad = st.sampled_from([0.75, 1.0]), st.sampled_from([0.0, 0.5, float("nan")])
    return torch.tensor([draw(good if c else bad) for c in correct], dtype=torch.float64)


@dataclass
class AlignCase:
    hidden: torch.Tensor  # what ha.loss receives: [B, T, H] or [N, H], in `layout`
    anchors: torch.Tensor  # int64 [B] indices, or a bool/uint8 mask
    index: torch.Tensor  # [B] position (padded) or row (packed), -1: none (for the reference)
    rewards: torch.Tensor
    grouping: Grouping
    cu_seqlens: torch.Tensor | None
    layout: str
    packed: bool
    offsets: torch.Tensor  # [B + 1] sequence offsets of packed hidden (passed or not)

    @property
    def labels(self) -> torch.Tensor:
        return self.grouping.labels

    @property
    def batch(self) -> int:
        return self.labels.shape[0]

    def kwargs(self) -> dict:
        return dict(**self.grouping.kwargs(), cu_seqlens=self.cu_seqlens)

    def anchor_cells(self) -> torch.Tensor:
        """bool, shaped like hidden without its last dimension: the anchor positions."""
        cells = torch.zeros(self.hidden.shape[:-1], dtype=torch.bool)
        has = self.index >= 0
        if self.packed:
            cells[self.index[has]] = True
        else:
            cells[has.nonzero().flatten(), self.index[has]] = True
        return cells

    def anchor_rows(self) -> list:
        """Per rollout the index of its anchor row in ``hidden`` (a tuple), or None."""
        out = []
        for b, a in enumerate(self.index.tolist()):
            out.append(None if a < 0 else ((a,) if self.packed else (b, a)))
        return out


@st.composite
def align_cases(
    draw,
    dtypes=tuple(FLOAT_DTYPES),
    layouts=tuple(LAYOUTS),
    max_batch=16,
    min_batch=1,
    max_seq=12,
    max_hidden=33,
    states=("random", "random", "parallel", "identical"),
    packed=None,
    anchor_forms=("index", "mask"),
):
    """An alignment-loss case. ``states``: "random" anchor states, "identical" (the anchors of
    a group are one vector), "parallel" (positive multiples of one vector: every cosine is 1)
    or "opposed" (multiples of alternating sign: cosines of +-1)."""
    grouping = draw(groupings(max_batch, min_batch))
    batch = grouping.batch
    correct, anchored = draw(outcomes(grouping.labels))
    rewards = draw(rewards_for(correct))
    seq = draw(st.integers(1, max_seq))
    width = draw(st.integers(1, max_hidden))
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(layouts))
    is_packed = draw(st.booleans()) if packed is None else packed
    form = draw(st.sampled_from(anchor_forms))
    mask_dtype = draw(st.sampled_from([torch.bool, torch.bool, torch.uint8]))
    state = draw(st.sampled_from(states))
    seed = draw(st.integers(0, 2**31 - 1))
    if is_packed:
        lengths = draw(st.lists(st.integers(1, seq), min_size=batch, max_size=batch))
    else:
        lengths = [seq] * batch
    pos = [draw(st.integers(0, n - 1)) for n in lengths]
    gen = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths_t.cumsum(0)])
    starts = cu[:-1] if is_packed else torch.zeros(batch, dtype=torch.int64)
    has = torch.tensor(anchored, dtype=torch.bool)
    index = torch.where(has, starts + torch.tensor(pos), -1)
    shape = (int(cu[-1]), width) if is_packed else (batch, seq, width)
    values = torch.randn(shape, generator=gen, dtype=torch.float64)
    if state != "random":
        for rows in members(grouping.labels):
            direction = torch.randn(width, generator=gen, dtype=torch.float64)
            for k, b in enumerate(rows):
                scale = 0.5 + 1.5 * torch.rand((), generator=gen, dtype=torch.float64)
                if state == "identical":
                    scale = 1.0
                if state == "opposed" and k % 2:
                    scale = -scale
                a = int(index[b])
                if a >= 0:
                    row = values[a] if is_packed else values[b, a]
                    row.copy_(scale * direction)
    hidden = lay_out(values.to(dtype), layout)
    if form == "index":
        anchors = index
        if not is_packed:
            cu_seqlens = None
        else:
            cu_seqlens = cu if draw(st.booleans()) else None
    else:
        cells = torch.zeros(shape[:-1], dtype=torch.bool)
        if is_packed:
            cells[index[has]] = True
        else:
            cells[has.nonzero().flatten(), index[has]] = True
        anchors = cells.to(mask_dtype)
        cu_seqlens = cu if is_packed else None
    return AlignCase(hidden, anchors, index, rewards, grouping, cu_seqlens, layout, is_packed, cu)


def with_hidden(case: AlignCase, hidden: torch.Tensor) -> AlignCase:
    """The same case with other hidden states."""
    return AlignCase(
        hidden,
        case.anchors,
        case.index,
        case.rewards,
        case.grouping,
        case.cu_seqlens,
        case.layout,
        case.packed,
        case.offsets,
    )


def select(case: AlignCase, hidden: torch.Tensor, idx: torch.Tensor) -> dict:
    """Rollouts ``idx`` of ``case``, in that order, as the arguments of a micro-batch whose
    ``hidden`` is computed from ``hidden`` (so gradients reach it): a dict with ``hidden``,
    ``mask``, ``rewards``, ``group_ids``, ``cu_seqlens`` and ``index`` (for the reference)."""
    idx = idx.long()
    rewards, labels = case.rewards[idx], case.labels[idx]
    gid = labels if case.grouping.group_ids is None else case.grouping.group_ids[idx]
    if not case.packed:
        return dict(
            hidden=hidden[idx],
            mask=case.anchors[idx],
            rewards=rewards,
            group_ids=gid,
            cu_seqlens=None,
            index=case.index[idx],
        )
    cu = case.offsets
    starts, ends = cu[:-1][idx], cu[1:][idx]
    tokens = [torch.arange(s, e) for s, e in zip(starts.tolist(), ends.tolist())]
    tokens = torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.long)
    new_cu = torch.cat([torch.zeros(1, dtype=torch.long), (ends - starts).cumsum(0)])
    index = torch.where(case.index[idx] >= 0, case.index[idx] - starts + new_cu[:-1], -1)
    mask = case.anchors[tokens] if case.anchors.dtype != torch.int64 else index
    return dict(
        hidden=hidden[tokens],
        mask=mask,
        rewards=rewards,
        group_ids=gid,
        cu_seqlens=new_cu,
        index=index,
    )


@st.composite
def splits(draw, batch: int, max_parts=4):
    """A shuffled partition of ``range(batch)`` into 1..max_parts non-empty micro-batches."""
    order = draw(st.permutations(range(batch)))
    cuts = []
    if batch > 1:
        parts = draw(st.integers(1, min(max_parts, batch)))
        cuts = sorted(draw(st.lists(st.integers(1, batch - 1), max_size=parts - 1, unique=True)))
    bounds = [0, *cuts, batch]
    return [torch.tensor(order[a:b], dtype=torch.long) for a, b in zip(bounds, bounds[1:])]


# ---- DAPO ------------------------------------------------------------------------------------

AGG_MODES = MODES  # every verl loss_agg_mode (tests/dapo_cases.py)
MASK_DTYPES = [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.float64]


def clear_of_kinks(logp, old, mask, margin, clip_low, clip_high, clip_c, clamp):
    """``mask`` without the tokens whose log-ratio lies within ``margin`` of a kink of the
    token loss: a clip bound, the dual clip or the log-ratio clamp. Computed in a lower
    precision, such a token may take the other branch (its gradient jumps), so no
    low-precision result can be compared with the float64 one there; the choices at the kinks
    themselves are tested in float64."""
    d = logp.double() - old.double()
    near = torch.zeros_like(mask, dtype=torch.bool)
    for bound in (1 - clip_low, 1 + clip_high, clip_c):
        near |= (d - math.log(bound)).abs() < margin
    if clamp is not None:
        near |= (d.abs() - clamp).abs() < margin
    return mask & ~near


@dataclass
class PolicyCase:
    logp: torch.Tensor
    old: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor  # what the op receives (any dtype)
    on: torch.Tensor  # the same mask as bool
    kwargs: dict  # the op's keyword arguments (policy_loss's names)


@st.composite
def policy_cases(draw, dtypes=tuple(FLOAT_DTYPES), max_batch=16, max_seq=12, layouts=None):
    """log-probs with log-ratios up to +-3 spread (clip, dual clip and clamp active), advantages
    of both signs with exact zeros ([B, T] or per rollout [B]), a prefix, random or full mask
    of any dtype with fully masked rows, every aggregation mode, verl's global normalisers as
    numbers or tensors, clip options, importance weights; the inputs in any memory layout."""
    batch = draw(st.integers(1, max_batch))
    seq = draw(st.integers(1, max_seq))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    # float16 cannot hold exp(d) beyond d = 11 (65504): PyTorch's float16 yardstick of
    # tests/precision.py overflows there, so float16 keeps |d| <= 3
    spreads = [0.1, 1.0] if dtype == torch.float16 else [0.1, 1.0, 1.0, 10.0]
    spread = draw(st.sampled_from(spreads))
    per_rollout = draw(st.booleans())
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(batch, seq, generator=gen, dtype=torch.float64) * 3
    noise = torch.rand(batch, seq, generator=gen, dtype=torch.float64) - 0.5
    old = logp + noise * 6 * spread
    if draw(st.booleans()):  # some tokens with ratio exactly 1
        old = torch.where(torch.rand(batch, seq, generator=gen) < 0.3, logp, old)
    adv_shape = (batch,) if per_rollout else (batch, seq)
    adv = torch.randn(adv_shape, generator=gen, dtype=torch.float64)
    adv = torch.where(torch.rand(adv_shape, generator=gen) < 0.15, 0.0, adv)
    pattern = draw(st.sampled_from(["prefix", "random", "full"]))
    if pattern == "prefix":
        lengths = draw(st.lists(st.integers(0, seq), min_size=batch, max_size=batch))
        on = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    elif pattern == "random":
        on = torch.rand(batch, seq, generator=gen) < draw(st.sampled_from([0.2, 0.6, 0.9]))
    else:
        on = torch.ones(batch, seq, dtype=torch.bool)
    mode = draw(st.sampled_from(AGG_MODES))
    kw = dict(loss_agg_mode=mode)
    if draw(st.booleans()):
        kw.update(
            clip_ratio_low=draw(st.sampled_from([0.1, 0.2, 0.3])),
            clip_ratio_high=draw(st.sampled_from([0.2, 0.28, 0.5])),
            clip_ratio_c=draw(st.sampled_from([1.5, 3.0, 10.0])),
            log_ratio_clamp=draw(st.sampled_from([None, 2.0, 20.0])),
        )
    normaliser = draw(st.sampled_from(["none", "numbers", "tensors"]))
    if normaliser != "none":
        norms = dict(
            batch_num_tokens=draw(st.integers(1, 200)),
            dp_size=draw(st.integers(1, 4)),
            global_batch_size=draw(st.integers(1, 40)),
            loss_scale_factor=draw(st.sampled_from([None, 1, 5, 17])),
        )
        if normaliser == "tensors":
            for k in ("batch_num_tokens", "global_batch_size", "loss_scale_factor"):
                if norms[k] is not None:
                    norms[k] = torch.tensor(float(norms[k]))
        kw.update(norms)
    if draw(st.booleans()):
        kw["rollout_is_weights"] = torch.rand(batch, seq, generator=gen, dtype=torch.float64)
    if dtype != torch.float64:
        margin = 0.05 if dtype in HALF_DTYPES else 1e-3
        on = clear_of_kinks(
            logp.to(dtype),
            old.to(dtype),
            on,
            margin,
            kw.get("clip_ratio_low", 0.2),
            kw.get("clip_ratio_high", 0.28),
            kw.get("clip_ratio_c", 10.0),
            kw.get("log_ratio_clamp", 20.0),
        )
    mask = on.to(draw(st.sampled_from(MASK_DTYPES)))
    layouts = layouts or ["contiguous", "transposed", "offset"]
    logp, old, adv = (
        lay_out(t.to(dtype), draw(st.sampled_from(layouts))) for t in (logp, old, adv)
    )
    if "rollout_is_weights" in kw:
        kw["rollout_is_weights"] = lay_out(
            kw["rollout_is_weights"].to(dtype), draw(st.sampled_from(layouts))
        )
    return PolicyCase(logp, old, adv, mask, on, kw)
