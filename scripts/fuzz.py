"""Fuzz harness of the DLPack import path and the argument checks of every hidden_align op.

Each input (a byte string) picks one target, the public ops (``ha.loss`` with its backward,
``ha.find_anchors``, ``ha.unpadded_rows``, ``ha.group_anchor_stats``, every ``ha.dapo`` op) or
a function of ``hidden_align._native`` called directly with its preallocated outputs, and
builds its arguments from the bytes: tensors are ``torch.as_strided`` views (every dtype torch
can export, sizes 0 to a few, strides 0, small and large, storage offsets) of a buffer that
holds the whole view, since DLPack trusts the producer for bounds; any argument may instead be
a numpy array, a Python scalar or list, None, a string, a meta tensor, and every option takes
NaN, inf, negative, huge or unknown values.

Allowed outcomes: a normal return, a ``hidden_align.HiddenAlignError`` other than
``KernelError`` (which the library documents as a bug), a TypeError or ValueError raised by a
``raise`` statement of the Python package, and, for direct calls of ``_native``, the TypeError or
OverflowError of pyo3's argument conversion. Anything else (a torch error escaping the checks,
a ``PanicException``, a ``KernelError``) is a finding, and so is a normal return that wrote into
an input or outside an output's view (each buffer carries slack around its view that must come
back unchanged). A finding raises, so atheris records the input; a crash stops the process.

Usage:
    python scripts/fuzz.py [-atheris_runs=N] [libFuzzer flags] [corpus dirs]
    python scripts/fuzz.py --seeds N [--start S]   # N pseudo-random inputs, without atheris
    python scripts/fuzz.py --backend cuda-emulated --seeds 20   # the emulated kernels (slow)
    python scripts/fuzz.py --strict ...   # defects already reported stop the run too

Both modes print the number of executions and the count of each outcome at the end. Defects
already reported (``KNOWN_DEFECTS``) are counted, not raised, unless ``--strict``.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import hashlib
import linecache
import math
import os
import random
import struct
import sys
import traceback

import numpy as np
import torch

try:
    import atheris
except ImportError:  # no wheel for this Python: the --seeds mode still works
    atheris = None

_UNDER_ATHERIS = __name__ == "__main__" and atheris is not None and "--seeds" not in sys.argv[1:]
if _UNDER_ATHERIS:
    # Coverage feedback from the package's Python branches (the Rust side is not instrumented).
    with atheris.instrument_imports(include=["hidden_align"]):
        import hidden_align as ha
        from hidden_align import _native
else:
    import hidden_align as ha
    from hidden_align import _native

_PACKAGE_DIR = os.path.dirname(os.path.abspath(ha.__file__))

# ---- bytes to values -------------------------------------------------------------------------


class _Provider:
    """The part of ``atheris.FuzzedDataProvider`` used here, in pure Python (for machines where
    atheris cannot be installed): values are read from the front of the bytes, and an exhausted
    input yields the smallest value."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def _take(self, n: int) -> bytes:
        chunk = self._data[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk

    def remaining_bytes(self) -> int:
        return len(self._data) - self._pos

    def ConsumeIntInRange(self, lo: int, hi: int) -> int:  # noqa: N802 (atheris' name)
        span = hi - lo
        if span <= 0:
            return lo
        raw = self._take((span.bit_length() + 7) // 8)
        return lo + int.from_bytes(raw, "little") % (span + 1)

    def ConsumeBool(self) -> bool:  # noqa: N802
        return bool(self.ConsumeIntInRange(0, 1))

    def ConsumeFloat(self) -> float:  # noqa: N802
        raw = self._take(8).ljust(8, b"\0")
        return struct.unpack("<d", raw)[0]

    def ConsumeUnicodeNoSurrogates(self, count: int) -> str:  # noqa: N802
        return self._take(count).decode("latin-1")


def provider(data: bytes):
    return atheris.FuzzedDataProvider(data) if atheris is not None else _Provider(data)


NAN, INF = float("nan"), float("inf")
SPECIAL_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 0.2, 0.28, 10.0, 1e-8, 1e-30, 5e-324, 1e30]
SPECIAL_FLOATS += [1e308, -1e308, NAN, INF, -INF]
SPECIAL_INTS = [0, 1, -1, 2, 3, 7, -2, 2**31 - 1, 2**31, -(2**31), 2**63 - 1, -(2**63)]
SPECIAL_INTS += [2**63, 2**64, 2**70, -(2**70)]
STRANGE_STRINGS = ["", "x", "COSINE", "mean ", "\x00", "é", "token_mean", "last\n"]

DTYPES = [
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.float16,
    torch.int64,
    torch.int32,
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.uint16,
    torch.complex64,
]
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class Draw:
    """Typed draws from a provider."""

    def __init__(self, data: bytes) -> None:
        self.p = provider(data)

    def int(self, lo: int, hi: int) -> int:
        return self.p.ConsumeIntInRange(lo, hi)

    def bool(self) -> bool:
        return self.p.ConsumeBool()

    def chance(self, k: int) -> bool:
        """True with probability about 1/k; False once the input is exhausted (every draw then
        takes the well-formed path, so short inputs reach deep into the ops)."""
        return self.int(0, k - 1) == k - 1

    def pick(self, items):
        return items[self.int(0, len(items) - 1)]

    def float(self) -> float:
        if self.chance(4):
            return self.p.ConsumeFloat()
        return self.pick(SPECIAL_FLOATS)

    def string(self) -> str:
        if self.chance(3):
            return self.p.ConsumeUnicodeNoSurrogates(self.int(0, 6))
        return self.pick(STRANGE_STRINGS)

    def anything(self, scalar: bool = False):
        """A value of a wrong or extreme kind, for any argument (``scalar``: only Python values,
        for the options of the native functions, which pyo3 converts)."""
        kind = self.int(0, 5 if scalar else 9)
        if kind == 0:
            return None
        if kind == 1:
            return self.bool()
        if kind == 2:
            return self.pick(SPECIAL_INTS)
        if kind == 3:
            return self.float()
        if kind == 4:
            return self.string()
        if kind == 5:
            return [self.int(-2, 3) for _ in range(self.int(0, 3))]
        if kind == 6:
            return np.float64(self.float())
        if kind == 7:
            return torch.tensor(self.float())
        if kind == 8:
            return torch.empty(self.int(0, 3), device="meta")
        return object()

    def option(self, good: list, scalar: bool = False):
        """Mostly one of the values the op accepts; else anything."""
        return self.pick(good) if not self.chance(8) else self.anything(scalar)

    def native_option(self, good: list):
        return self.option(good, scalar=True)


# ---- tensors -----------------------------------------------------------------------------------


class Guard:
    """A buffer and the view made of it: ``check`` says whether the buffer was changed, outside
    the view (``outside_only``, for outputs) or anywhere (for inputs)."""

    def __init__(self, name: str, buf: torch.Tensor, view: torch.Tensor, outside_only: bool):
        self.name = name
        self.buf = buf
        self.view = view
        self.outside_only = outside_only
        self.before = _raw(buf).clone()

    def changed(self) -> str | None:
        now = _raw(self.buf)
        diff = now != self.before
        if self.outside_only and self.view.numel() > 0:
            # The element indices the view addresses, each covering itemsize bytes.
            idx = torch.arange(self.buf.numel()).as_strided(
                self.view.shape, self.view.stride(), self.view.storage_offset()
            )
            size = self.buf.element_size()
            inside = torch.zeros(self.buf.numel(), dtype=torch.bool)
            inside[idx.reshape(-1)] = True
            diff &= ~inside.repeat_interleave(size)
        if bool(diff.any()):
            where = "outside its view" if self.outside_only else "an input"
            return f"{self.name}: bytes changed {where}"
        return None


def _raw(buf: torch.Tensor) -> torch.Tensor:
    return buf.detach().reshape(-1).view(torch.uint8)


def _values(d: Draw, dtype: torch.dtype, role: str, count: int) -> list:
    """``count`` values suited to ``role``: indices near the valid range, group labels,
    rewards, log-probs, or anything."""
    out = []
    for _ in range(count):
        if role == "index":
            v = d.int(-1, 2) if not d.chance(8) else d.pick(SPECIAL_INTS + [3, 4, 5, 6, 7])
        elif role == "label":
            v = d.int(0, 3) if not d.chance(8) else d.pick(SPECIAL_INTS)
        elif role == "anchor":
            v = int(d.chance(5)) if not d.chance(8) else d.int(-3, 3)
        elif role == "flag":
            v = d.int(0, 1) if not d.chance(8) else d.int(-3, 3)
        elif role == "length":
            v = d.int(0, 12) if not d.chance(8) else d.pick(SPECIAL_INTS)
        else:
            v = d.pick([0.5, -1.0, 1.0, -0.3, 2.5, 0.0, -7.0]) if not d.chance(6) else d.float()
        out.append(v)
    if dtype == torch.bool:
        return [bool(v) if not (isinstance(v, float) and math.isnan(v)) else True for v in out]
    if dtype.is_floating_point or dtype.is_complex:
        return [float(v) for v in out]
    info = torch.iinfo(dtype)
    clean = []
    for v in out:
        v = 0 if isinstance(v, float) and not math.isfinite(v) else int(v)
        clean.append(min(max(v, info.min), info.max))
    return clean


def _strides(d: Draw, shape: list) -> list:
    strides, running = [], 1
    for size in reversed(shape):
        kind = d.int(0, 7)
        if kind <= 3:
            s = running  # contiguous
        elif kind == 4:
            s = 0
        elif kind == 5:
            s = d.int(1, 8)
        elif kind == 6:
            s = d.int(100, 4096)
        else:
            s = running * d.int(2, 3)  # a slice of a wider tensor
        strides.append(s)
        running *= max(size, 1)
    return strides[::-1]


def make_tensor(
    d: Draw,
    shape,
    dtype: torch.dtype,
    role: str = "value",
    guards: list | None = None,
    name: str = "t",
    output: bool = False,
    grad: bool = False,
) -> torch.Tensor:
    """A ``torch.as_strided`` view of ``shape`` over a buffer that holds it, with fuzzed
    strides and storage offset; the buffer is ``guards``' to check after the call."""
    shape = [int(s) for s in shape]
    strides = _strides(d, shape)
    offset = d.int(0, 5) if d.chance(3) else 0
    extent = sum((s - 1) * st for s, st in zip(shape, strides)) + 1 if all(shape) else 0
    slack = d.int(0, 3)
    size = offset + extent + slack
    pattern = _values(d, dtype, role, d.int(1, 6))
    base = torch.tensor(pattern, dtype=dtype)
    buf = base.repeat(size // len(pattern) + 1)[:size].clone()
    if grad and dtype in FLOATS:
        buf.requires_grad_()
    view = buf.as_strided(shape, strides, offset)
    if guards is not None:
        guards.append(Guard(name, buf, view, outside_only=output))
    return view


def perturb_shape(d: Draw, shape: list) -> list:
    shape = list(shape)
    kind = d.int(0, 3)
    if kind == 0 and shape:
        shape.pop(d.int(0, len(shape) - 1))
    elif kind == 1:
        shape.insert(d.int(0, len(shape)), d.int(0, 3))
    elif kind == 2 and shape:
        i = d.int(0, len(shape) - 1)
        shape[i] = max(0, shape[i] + d.pick([-1, 1, 2]))
    elif shape:
        shape[d.int(0, len(shape) - 1)] = 0
    return shape


def arg(
    d: Draw,
    shape,
    dtypes: list,
    role: str,
    guards: list,
    name: str,
    grad: bool = False,
    rare: int = 10,
):
    """An input argument: usually a tensor of one of ``dtypes`` and ``shape``; about once in
    ``rare`` draws a perturbed shape, another dtype, or not a tensor at all."""
    if d.chance(rare):
        shape = perturb_shape(d, shape)
    dtype = d.pick(dtypes) if not d.chance(rare) else d.pick(DTYPES)
    if d.chance(rare):
        kind = d.int(0, 4)
        t = make_tensor(d, shape, dtype, role, None, name)
        if kind == 0:
            try:
                return t.numpy()  # shares the strided memory
            except (TypeError, RuntimeError):
                return t.float().numpy()
        if kind == 1:
            return t.tolist()
        if kind == 2:
            return torch.empty(shape, dtype=dtype, device="meta")
        if kind == 3:
            return t.detach().clone().requires_grad_() if dtype in FLOATS else t
        return d.anything()
    return make_tensor(d, shape, dtype, role, guards, name, grad=grad)


def out_arg(d: Draw, shape, dtype: torch.dtype, guards: list, name: str, rare: int = 10):
    """An output buffer of a direct native call: the right one, or a perturbed shape, dtype or
    layout, or no tensor; checked after the call for writes outside its view."""
    if d.chance(rare):
        shape = perturb_shape(d, shape)
    if d.chance(rare):
        dtype = d.pick(DTYPES)
    if d.chance(rare * 3):
        return d.anything()
    return make_tensor(d, shape, dtype, "value", guards, name, output=True)


# ---- targets -----------------------------------------------------------------------------------

LOSS_TYPES = ["cosine", "centroid", "mse", "contrastive"]
REDUCTIONS = ["mean", "sum", "none"]
AGG_MODES = [
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
]
REWARD_DTYPES = [torch.float32, torch.bool, torch.int64, torch.uint8, torch.float64]


def _groups(d: Draw, batch: int, guards: list, scalar: bool = False) -> dict:
    """``group_ids`` (tensor, uid strings or numpy objects) and/or ``group_size``."""
    kind = d.int(0, 11)
    out = {}
    if kind in (0, 1, 5, 6, 7, 8):
        out["group_ids"] = arg(d, [batch], [torch.int64], "label", guards, "group_ids")
    elif kind == 2:
        uids = [f"u{d.int(0, 3)}" for _ in range(batch)]
        out["group_ids"] = uids if d.bool() else np.array(uids, dtype=object)
    if kind in (3, 4, 5, 9, 10, 11):
        out["group_size"] = d.option([1, 2, 3, max(batch, 1)], scalar)
    return out


def _anchor_inputs(d: Draw, guards: list, grad: bool, scalar: bool = False) -> tuple:
    batch, seq, width = d.int(0, 6), d.int(0, 5), d.int(0, 6)
    packed = d.chance(3)
    kw = _groups(d, batch, guards, scalar)
    if packed:
        rows = d.int(0, 12)
        hidden = arg(d, [rows, width], list(FLOATS), "value", guards, "hidden", grad=grad)
        lens = [d.int(0, 3) for _ in range(batch)]
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        if d.chance(4):
            cu = [d.int(-2, rows + 2) for _ in cu]
        cu_t = torch.tensor(cu, dtype=torch.int64)
        kw["cu_seqlens"] = cu_t if not d.chance(5) else d.option([None, cu_t.int(), cu_t.float()])
        if d.bool():
            mask = arg(d, [rows], [torch.bool, torch.uint8], "anchor", guards, "mask")
        else:
            mask = arg(d, [batch], [torch.int64], "index", guards, "mask")
    else:
        hidden = arg(d, [batch, seq, width], list(FLOATS), "value", guards, "hidden", grad=grad)
        if d.bool():
            mask = arg(d, [batch, seq], [torch.bool, torch.uint8], "anchor", guards, "mask")
        else:
            mask = arg(d, [batch], [torch.int64], "index", guards, "mask")
    rewards = arg(d, [batch], REWARD_DTYPES, "value", guards, "rewards")
    kw["threshold"] = d.option([0.5, 0.0, -1.0], scalar)
    kw["eps"] = d.option([1e-8, 1e-3, 1.0], scalar)
    return hidden, mask, rewards, kw


def _backward(result) -> None:
    """Backward through whatever the op returned that requires grad (the delivery path)."""
    tensors = result if isinstance(result, tuple) else (result,)
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.sum().backward()
            return


def t_loss(d: Draw, guards: list):
    hidden, mask, rewards, kw = _anchor_inputs(d, guards, grad=d.bool())
    kw["loss_type"] = d.option(LOSS_TYPES)
    kw["reduction"] = d.option(REDUCTIONS)
    kw["tau"] = d.option([0.1, 1.0, 1e-4])
    kw["return_stats"] = d.option([False, True])

    def call():
        result = ha.loss(hidden, mask, rewards, **kw)
        if kw.get("return_stats") is True and isinstance(result, tuple):
            result = result[0]
        _backward(result)

    return call


def t_loss_reference(d: Draw, guards: list):
    hidden, mask, rewards, kw = _anchor_inputs(d, guards, grad=d.bool())
    gid = kw.get("group_ids")
    stats_kw = dict(kw)
    loss_type = d.option(LOSS_TYPES)
    reduction = d.option(REDUCTIONS)
    form = d.int(0, 3)
    refused = d.chance(4)  # keep group_size with the reference: its refusal

    def call():
        with torch.no_grad():
            stats = ha.group_anchor_stats(hidden, mask, rewards, **stats_kw)
        loss_kw, ids = kw, gid
        if stats.local_blocks and not refused:
            # The loss refuses group_size with a reference; the blocks go in as global ids.
            ids = torch.arange(rewards.shape[0]) // kw["group_size"]
            loss_kw = {**kw, "group_ids": ids, "group_size": None}
        if form == 0:
            reference = stats
        elif form == 1:
            reference = stats.rows(ids if isinstance(ids, torch.Tensor) else stats.group_ids)
        elif form == 2:
            reference = stats.rows(stats.group_ids, loss_type=loss_type).to_dict()
        else:
            # Parts numbered by group_size blocks refuse merging with other parts.
            reference = stats.merge(*(() if stats.local_blocks and not refused else (stats,)))
        result = ha.loss(
            hidden,
            mask,
            rewards,
            loss_type=loss_type,
            reduction=reduction,
            reference=reference,
            **loss_kw,
        )
        _backward(result)

    return call


def t_group_anchor_stats(d: Draw, guards: list):
    hidden, mask, rewards, kw = _anchor_inputs(d, guards, grad=False)
    refused = d.chance(4)  # merge parts numbered by group_size blocks: its refusal

    def call():
        stats = ha.group_anchor_stats(hidden, mask, rewards, **kw)
        others = () if stats.local_blocks and not refused else (stats,)
        stats.merge(*others).mean_cosine  # noqa: B018 (evaluated for its checks)

    return call


def t_find_anchors(d: Draw, guards: list):
    batch, seq = d.int(0, 5), d.int(0, 8)
    ids = arg(d, [batch, seq], [torch.int64, torch.int32], "label", guards, "token_ids")
    resp = arg(d, [batch, seq], [torch.bool, torch.int64, torch.float32], "flag", guards, "mask")
    markers = [[d.int(0, 3) for _ in range(d.int(1, 3))] for _ in range(d.int(1, 3))]
    kind = d.int(0, 7)
    if kind == 0:
        markers = d.anything()
    elif kind == 1:
        markers[0] = d.pick([[], "ab", torch.tensor([1, 2]), torch.ones(2, 2), [1.5], [2**64]])
    elif kind == 2:
        markers = [torch.tensor(m) for m in markers]
    occurrence = d.option(["last", "first"])
    offset = d.option([-1, 0, 1, -5, 2**62, -(2**63)])

    def call():
        ha.find_anchors(ids, resp, markers, occurrence=occurrence, offset=offset)

    return call


def _text_markers(d: Draw):
    """Marker texts over a small byte vocabulary (token v spells one or two letters)."""
    from tokenizers import Tokenizer, decoders, models

    letters = "ab:{"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(zip(letters, letters[1:]))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tok.decoder = decoders.ByteLevel()
    strings = ["".join(d.pick(letters) for _ in range(d.int(1, 3))) for _ in range(d.int(1, 2))]
    return ha.text_markers(tok, strings)


def t_find_text_anchors(d: Draw, guards: list):
    batch, seq = d.int(0, 5), d.int(0, 8)
    ids = arg(d, [batch, seq], [torch.int64, torch.int32], "label", guards, "token_ids")
    resp = arg(d, [batch, seq], [torch.bool, torch.int64, torch.float32], "flag", guards, "mask")
    markers = _text_markers(d)
    if d.chance(3):
        markers = [markers, [d.int(0, 3)]] if d.bool() else [markers, markers]
    occurrence = d.option(["last", "first"])
    offset = d.option([-1, 0, 1, -5, 2**62, -(2**63)])

    def call():
        ha.find_anchors(ids, resp, markers, occurrence=occurrence, offset=offset)

    return call


def t_unpadded_rows(d: Draw, guards: list):
    batch, seq = d.int(0, 5), d.int(0, 6)
    shape = [batch] if d.bool() else [batch, d.int(0, 3)]
    positions = arg(d, shape, [torch.int64], "index", guards, "positions")
    mask = arg(d, [batch, seq], [torch.bool, torch.int64, torch.int32], "flag", guards, "mask")

    def call():
        ha.unpadded_rows(positions, mask)

    return call


def t_group_advantages(d: Draw, guards: list):
    batch = d.int(0, 8)
    shape = [batch] if d.bool() else [batch, d.int(0, 3)]
    scores = arg(d, shape, [torch.float32, torch.float64, torch.bfloat16], "value", guards, "s")
    kw = _groups(d, batch, guards)
    kw["eps"] = d.option([1e-6, 0.0, 1.0])
    kw["norm_by_std"] = d.option([True, False])

    def call():
        ha.dapo.group_advantages(scores, **kw)

    return call


def t_dynamic_sampling(d: Draw, guards: list):
    batch = d.int(0, 8)
    metric = arg(d, [batch], REWARD_DTYPES, "value", guards, "metric")
    kw = _groups(d, batch, guards)

    def call():
        ha.dapo.dynamic_sampling_mask(metric, **kw)

    return call


def t_overlong(d: Draw, guards: list):
    lengths = arg(d, [d.int(0, 8)], [torch.int64, torch.float32], "length", guards, "lengths")
    args = (d.option([20, 8, 0]), d.option([4, 1, 0.5]), d.option([1.0, 0.0, -2.0]))

    def call():
        ha.dapo.overlong_penalty(lengths, *args)

    return call


def _policy_inputs(d: Draw, guards: list, grad: bool) -> tuple:
    batch, seq = d.int(0, 5), d.int(0, 7)
    dtypes = [d.pick(list(FLOATS))]
    logp = arg(d, [batch, seq], dtypes, "value", guards, "log_prob", grad=grad)
    old = arg(d, [batch, seq], dtypes, "value", guards, "old_log_prob")
    adv = arg(d, [batch] if d.bool() else [batch, seq], dtypes, "value", guards, "advantages")
    mask = arg(d, [batch, seq], [torch.bool, torch.int64, torch.float32], "flag", guards, "m")
    weights = None
    if d.chance(3):
        weights = arg(d, [batch, seq], dtypes, "value", guards, "rollout_is_weights")
    return batch, seq, (logp, old, adv, mask, weights)


def _normaliser(d: Draw, good: list):
    if d.chance(4):
        return torch.tensor(d.pick(good + [0.0, NAN]), dtype=d.pick([torch.float32, torch.int64]))
    return d.option(good)


def t_policy_loss(d: Draw, guards: list):
    _, _, (logp, old, adv, mask, weights) = _policy_inputs(d, guards, grad=d.bool())
    kw = {
        "clip_ratio_low": d.option([0.2, 0.0, 0.99]),
        "clip_ratio_high": d.option([0.28, 0.0, 5.0]),
        "clip_ratio_c": d.option([10.0, 1.5, 3.0]),
        "log_ratio_clamp": d.option([20.0, None, 1.0]),
        "loss_agg_mode": d.option(AGG_MODES),
        "rollout_is_weights": weights,
        "dp_size": d.option([1, 1, 1, 2, 4]),
    }
    for name, good in (
        ("batch_num_tokens", [None, 7, 3.5]),
        ("global_batch_size", [None, 4, 2]),
        ("loss_scale_factor", [None, 5, 0.5]),
    ):
        if d.bool():
            kw[name] = _normaliser(d, good)

    def call():
        loss, _metrics = ha.dapo.policy_loss(logp, old, adv, mask, **kw)
        _backward(loss)

    return call


def t_uids(d: Draw, guards: list):
    kind = d.int(0, 6)
    items = [d.pick(["a", "b", "é", "", "\x00"]) for _ in range(d.int(0, 5))]
    if kind == 0:
        uids = items
    elif kind == 1:
        uids = np.array(items, dtype=object)
    elif kind == 2:
        uids = np.array(items)
    elif kind == 3:
        uids = [s.encode() for s in items] + [d.int(0, 3), None, 1.5][: d.int(0, 3)]
    elif kind == 4:
        uids = np.array([items, items], dtype=object)
    elif kind == 5:
        uids = iter(items)
    else:
        uids = d.anything()

    def call():
        ha.dapo.group_ids_from_uids(uids)

    return call


# ---- direct calls of the native functions --------------------------------------------------------


def _stream(d: Draw):
    return None if not d.chance(6) else d.pick([0, 1, 7, 2**64 - 1])


def n_align_forward(d: Draw, guards: list):
    hidden, mask, rewards, kw = _anchor_inputs(d, guards, grad=False, scalar=True)
    batch = rewards.shape[0] if isinstance(rewards, torch.Tensor) and rewards.dim() == 1 else 0
    acc = torch.float64 if getattr(hidden, "dtype", None) == torch.float64 else torch.float32
    gid = kw.get("group_ids")
    gid = gid if isinstance(gid, torch.Tensor) or d.chance(4) else None
    size = kw.get("group_size") if gid is None or d.chance(4) else None
    outs = [
        out_arg(d, [batch], torch.int64, guards, "out_rows"),
        out_arg(d, [batch], torch.int64, guards, "out_groups"),
        out_arg(d, [batch], torch.bool, guards, "out_correct"),
        out_arg(d, [batch], acc, guards, "out_group_loss"),
        out_arg(d, [batch], torch.bool, guards, "out_group_valid"),
        out_arg(d, [], acc, guards, "out_loss"),
        out_arg(d, [], acc, guards, "out_mean_cosine"),
        out_arg(d, [2], torch.int64, guards, "out_counts"),
    ]
    work = out_arg(d, [_native.ALIGN_WORK_ROWS, batch], torch.float32, guards, "work")
    links = out_arg(d, [_native.ALIGN_LINK_ROWS * batch + 1], torch.int32, guards, "links")
    opts = (
        d.native_option(LOSS_TYPES),
        d.native_option(REDUCTIONS),
        d.native_option([0.5, 0.0]),
        d.native_option([1e-8, 1.0]),
        d.native_option([0.1, 1.0]),
    )
    cu = kw.get("cu_seqlens")
    stream = _stream(d)

    def call():
        _native.align_forward(
            hidden, mask, rewards, gid, size, cu, *opts, *outs, work, links, stream
        )

    return call


def n_align_backward(d: Draw, guards: list):
    batch, width = d.int(0, 5), d.int(0, 5)
    dtype = d.pick(list(FLOATS))
    hidden = arg(d, [d.int(0, 6), width], [dtype], "value", guards, "hidden")
    rows = arg(d, [batch], [torch.int64], "index", guards, "rows")
    groups = arg(d, [batch], [torch.int64], "label", guards, "groups")
    correct = arg(d, [batch], [torch.bool], "flag", guards, "correct")
    num_groups = d.native_option([d.int(0, 4), batch])
    grad_output = arg(d, d.pick([[], [1], [batch]]), [torch.float32, dtype], "value", guards, "g")
    opts = (
        d.native_option(LOSS_TYPES),
        d.native_option(REDUCTIONS),
        d.native_option([1e-8, 1.0]),
        d.native_option([0.1]),
    )
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = out_arg(d, [batch, width], acc, guards, "out_grad_rows")
    state = None
    if d.chance(6):
        state = tuple(out_arg(d, [batch], acc, guards, f"state{i}") for i in range(7))
    centre = None if not d.chance(6) else out_arg(d, [batch, width], acc, guards, "centre")
    stream = _stream(d)

    def call():
        _native.align_backward(
            hidden,
            rows,
            groups,
            correct,
            num_groups,
            grad_output,
            *opts,
            out,
            state,
            centre,
            stream,
        )

    return call


def n_scatter_add_rows(d: Draw, guards: list):
    rows_n, batch, width = d.int(0, 6), d.int(0, 5), d.int(0, 5)
    dtype = d.pick(list(FLOATS))
    dst = out_arg(d, [rows_n, width], dtype, guards, "dst")
    rows = arg(d, [batch], [torch.int64], "index", guards, "rows")
    vals = arg(d, [batch, width], [torch.float32, torch.float64], "value", guards, "vals")
    links = None if not d.chance(4) else arg(d, [batch + 1], [torch.int32], "index", guards, "l")
    stream = _stream(d)

    def call():
        _native.scatter_add_rows(dst, rows, vals, links, stream)

    return call


def n_group_advantages(d: Draw, guards: list):
    batch = d.int(0, 8)
    scores = arg(d, [batch], [torch.float32, torch.float64], "value", guards, "scores")
    kw = _groups(d, batch, guards, scalar=True)
    gid = kw.get("group_ids") if isinstance(kw.get("group_ids"), torch.Tensor) else None
    out = out_arg(d, [batch], torch.float32, guards, "out")
    totals = None if d.bool() else out_arg(d, [batch], torch.float64, guards, "totals")
    order = None if d.bool() else out_arg(d, [2 * batch], torch.int32, guards, "order")
    eps, norm = d.native_option([1e-6, 0.0]), d.native_option([True, False])
    stream = _stream(d)

    def call():
        _native.group_advantages(
            scores, gid, kw.get("group_size"), eps, norm, out, totals, order, stream
        )

    return call


def n_dynamic_sampling(d: Draw, guards: list):
    batch = d.int(0, 8)
    metric = arg(d, [batch], REWARD_DTYPES, "value", guards, "metric")
    kw = _groups(d, batch, guards, scalar=True)
    gid = kw.get("group_ids") if isinstance(kw.get("group_ids"), torch.Tensor) else None
    out = out_arg(d, [batch], torch.bool, guards, "out")
    order = None if d.bool() else out_arg(d, [2 * batch], torch.int32, guards, "order")
    stream = _stream(d)

    def call():
        _native.dynamic_sampling_mask(metric, gid, kw.get("group_size"), out, order, stream)

    return call


def n_overlong(d: Draw, guards: list):
    batch = d.int(0, 8)
    lengths = arg(d, [batch], [torch.int64, torch.float32], "length", guards, "lengths")
    args = (d.native_option([20.0, 8.0]), d.native_option([4.0, 0.0]), d.native_option([1.0, NAN]))
    out = out_arg(d, [batch], torch.float32, guards, "out")
    stream = _stream(d)

    def call():
        _native.overlong_penalty(lengths, *args, out, stream)

    return call


def _clip(d: Draw):
    clip = (
        d.native_option([0.2]),
        d.native_option([0.28]),
        d.native_option([10.0]),
        d.native_option([20.0, None]),
    )
    return clip if not d.chance(10) else d.anything(scalar=True)


def n_policy_forward(d: Draw, guards: list):
    batch, seq, inputs = _policy_inputs(d, guards, grad=False)
    dtype = getattr(inputs[0], "dtype", torch.float32)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    chunks = max(1, -(-seq // _native.POLICY_CHUNK))
    norms = (None, None, None)
    if d.chance(3):
        norms = tuple(
            None if d.bool() else make_tensor(d, d.pick([[], [1], [2]]), d.pick(DTYPES), "length")
            for _ in range(3)
        )
    args = (
        d.native_option(AGG_MODES),
        d.native_option([None, 7.0]),
        d.native_option([1, 2, 0, -1]),
        d.native_option([None, 3.0]),
        d.native_option([None, 5.0]),
    )
    out_loss = out_arg(d, [], acc, guards, "out_loss")
    out_metrics = out_arg(d, [3], acc, guards, "out_metrics")
    out_row_scale = out_arg(d, [batch], acc, guards, "out_row_scale")
    out_factor = None if d.bool() else out_arg(d, [batch, seq], dtype, guards, "out_factor")
    partials = None if d.bool() else out_arg(d, [batch, chunks, 5], torch.float64, guards, "p")
    clip = _clip(d)
    stream = _stream(d)

    def call():
        _native.policy_loss_forward(
            inputs,
            clip,
            *args,
            out_loss,
            out_metrics,
            out_row_scale,
            out_factor,
            norms,
            partials,
            stream,
        )

    return call


def n_policy_backward(d: Draw, guards: list):
    batch, seq, inputs = _policy_inputs(d, guards, grad=False)
    dtype = getattr(inputs[0], "dtype", torch.float32)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    row_scale = arg(d, [batch], [acc], "value", guards, "row_scale")
    grad_output = arg(d, d.pick([[], [1], [2]]), [acc], "value", guards, "grad_output")
    saved = d.native_option([False, True])
    out = out_arg(d, [batch, seq], dtype, guards, "out_grad")
    clip = _clip(d)
    stream = _stream(d)

    def call():
        _native.policy_loss_backward(inputs, clip, row_scale, grad_output, out, saved, stream)

    return call


def n_find_anchors(d: Draw, guards: list):
    batch, seq = d.int(0, 5), d.int(0, 8)
    ids = arg(d, [batch, seq], [torch.int64, torch.int32], "label", guards, "token_ids")
    resp = arg(d, [batch, seq], [torch.bool, torch.int64, torch.float32], "flag", guards, "mask")
    count = d.int(0, 6)
    tokens = arg(d, [count], [torch.int64], "label", guards, "marker_tokens")
    offsets = [0] + sorted(d.int(0, count) for _ in range(d.int(0, 3)))
    if d.chance(3):
        offsets = [d.int(-3, count + 3) for _ in offsets]
    offsets = torch.tensor(offsets, dtype=torch.int64)
    if d.chance(5):
        offsets = arg(d, [offsets.numel()], [torch.int64], "index", guards, "marker_offsets")
    occurrence = d.native_option(["last", "first"])
    offset = d.native_option([-1, 0, 2**63 - 1, -(2**63)])
    out = out_arg(d, [batch], torch.int64, guards, "out")
    stream = _stream(d)

    def call():
        _native.find_anchors(ids, resp, tokens, offsets, occurrence, offset, out, stream)

    return call


def _bytes_and_offsets(d: Draw, guards: list, pieces: int, name: str) -> tuple:
    """A uint8 buffer and offsets cutting it into ``pieces``: well formed, or not."""
    size = d.int(0, 8)
    data = arg(d, [size], [torch.uint8], "label", guards, f"{name}_bytes")
    offsets = [0] + sorted(d.int(0, size) for _ in range(pieces))
    if d.chance(3):
        offsets = [d.int(-3, size + 3) for _ in offsets]
    offsets = torch.tensor(offsets, dtype=torch.int64)
    if d.chance(5):
        offsets = arg(d, [offsets.numel()], [torch.int64], "index", guards, f"{name}_offsets")
    return data, offsets


def n_find_text_anchors(d: Draw, guards: list):
    batch, seq = d.int(0, 5), d.int(0, 8)
    ids = arg(d, [batch, seq], [torch.int64, torch.int32], "label", guards, "token_ids")
    resp = arg(d, [batch, seq], [torch.bool, torch.int64, torch.float32], "flag", guards, "mask")
    size = d.int(0, 4)
    vocab = _bytes_and_offsets(d, guards, size, "vocab")
    starts = arg(d, [size], [torch.uint8], "flag", guards, "token_starts")
    markers = _bytes_and_offsets(d, guards, d.int(0, 2), "marker")
    occurrence = d.native_option(["last", "first"])
    offset = d.native_option([-1, 0, 2**63 - 1, -(2**63)])
    out = out_arg(d, [batch], torch.int64, guards, "out")
    stream = _stream(d)

    def call():
        _native.find_text_anchors(
            ids, resp, *vocab, starts, *markers, occurrence, offset, out, stream
        )

    return call


def n_text_marker_starts(d: Draw, guards: list):
    size = d.int(0, 4)
    vocab = _bytes_and_offsets(d, guards, size, "vocab")
    markers = _bytes_and_offsets(d, guards, d.int(0, 2), "marker")
    out = out_arg(d, [size], torch.uint8, guards, "out")

    def call():
        _native.text_marker_starts(*vocab, *markers, out)

    return call


def n_uid_group_ids(d: Draw, guards: list):
    items = [d.pick(["a", "b", b"c", 3, None, 1.5]) for _ in range(d.int(0, 5))]
    uids = items if not d.chance(5) else d.anything(scalar=True)
    out = out_arg(d, [len(items)], torch.int64, guards, "out")

    def call():
        _native.uid_group_ids(uids, out)

    return call


def n_data_ptr(d: Draw, guards: list):
    t = arg(d, [d.int(0, 3), d.int(0, 3)], DTYPES, "value", guards, "tensor", rare=3)

    def call():
        _native.data_ptr(t)

    return call


PUBLIC = [
    t_loss,
    t_loss_reference,
    t_group_anchor_stats,
    t_find_anchors,
    t_find_text_anchors,
    t_unpadded_rows,
    t_group_advantages,
    t_dynamic_sampling,
    t_overlong,
    t_policy_loss,
    t_uids,
]
NATIVE = [
    n_align_forward,
    n_align_backward,
    n_scatter_add_rows,
    n_group_advantages,
    n_dynamic_sampling,
    n_overlong,
    n_policy_forward,
    n_policy_backward,
    n_find_anchors,
    n_find_text_anchors,
    n_text_marker_starts,
    n_uid_group_ids,
    n_data_ptr,
]
TARGETS = PUBLIC + NATIVE

# ---- outcomes ------------------------------------------------------------------------------------


class Finding(AssertionError):
    """An outcome the harness does not allow."""


def _raised_by_package(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc`` is a ``raise`` statement of hidden_align's Python
    code (not a torch or numpy call made there)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    filename = tb.tb_frame.f_code.co_filename
    line = linecache.getline(filename, tb.tb_lineno).strip()
    return filename.startswith(_PACKAGE_DIR) and line.startswith("raise ")


def _raised_at_call(exc: BaseException) -> bool:
    """Whether ``exc`` came straight out of a native function (its innermost frame is this
    harness's call): pyo3's argument conversion, before any of our code ran."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    here = os.path.realpath(__file__)
    return tb is not None and os.path.realpath(tb.tb_frame.f_code.co_filename) == here


def classify(exc: BaseException, native: bool) -> str | None:
    """The outcome label of an allowed exception, or None for a finding."""
    if isinstance(exc, ha.KernelError):
        return None
    if isinstance(exc, ha.HiddenAlignError):
        return type(exc).__name__
    if type(exc) in (TypeError, ValueError) and _raised_by_package(exc):
        return f"{type(exc).__name__} (package)"
    if native and type(exc) in (TypeError, OverflowError) and _raised_at_call(exc):
        return f"{type(exc).__name__} (pyo3 argument)"
    return None


# Defects found by this harness and reported, each with a strict-xfail reproduction in
# tests/test_fuzz.py: (what, exception class, text in the message). They are counted as KNOWN
# instead of stopping the run, unless --strict; delete an entry once the library is fixed.
KNOWN_DEFECTS: list = []
strict = False


def known_defect(exc: BaseException) -> str | None:
    for what, name, text in KNOWN_DEFECTS:
        if type(exc).__name__ == name and text in str(exc):
            return what
    return None


counts: collections.Counter = collections.Counter()


def one_input(data: bytes, target=None) -> str:
    """Runs the target the bytes pick (or ``target``) on the arguments they describe; returns the
    outcome label and raises :class:`Finding` on any outcome that is not allowed."""
    d = Draw(data)
    if target is None:
        target = TARGETS[d.int(0, len(TARGETS) - 1)]
    guards: list = []
    try:
        call = target(d, guards)
    except Exception as e:  # the arguments themselves could not be built: not our code
        counts["skipped (arguments not built)"] += 1
        if isinstance(e, (MemoryError, KeyboardInterrupt)):
            raise
        return "skipped"
    native = target in NATIVE
    try:
        call()
    except Exception as e:
        label = classify(e, native)
        known = None if label is not None or strict else known_defect(e)
        if known is not None:
            label = f"KNOWN {known}"
        if label is None:
            counts[f"FINDING {type(e).__name__}"] += 1
            raise Finding(f"{target.__name__}: {type(e).__module__}.{type(e).__name__}: {e}") from e
        counts[label] += 1
        return label
    for g in guards:
        problem = g.changed()
        if problem:
            counts["FINDING memory"] += 1
            raise Finding(f"{target.__name__}: {problem}")
    counts["ok"] += 1
    return "ok"


def seed_input(seed: int, length: int | None = None) -> bytes:
    """The pseudo-random input of ``seed`` (the --seeds mode and the tests)."""
    rng = random.Random(seed)
    n = rng.randint(0, 512) if length is None else length
    return bytes(rng.getrandbits(8) for _ in range(n))


def _report() -> None:
    total = sum(counts.values())
    print(f"\n{total} executions", file=sys.stderr)
    for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {n:8d}  {label}", file=sys.stderr)


def _run_seeds(n: int, start: int, artifact_dir: str) -> int:
    os.makedirs(artifact_dir, exist_ok=True)
    findings = 0
    for seed in range(start, start + n):
        data = seed_input(seed)
        try:
            one_input(data)
        except Finding:
            findings += 1
            digest = hashlib.sha1(data).hexdigest()
            path = os.path.join(artifact_dir, f"crash-{digest}")
            with open(path, "wb") as f:
                f.write(data)
            print(f"seed {seed}: finding, input written to {path}", file=sys.stderr)
            traceback.print_exc()
    return 1 if findings else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, help="run N pseudo-random inputs without atheris")
    parser.add_argument("--start", type=int, default=0, help="first seed of --seeds")
    parser.add_argument("--backend", default=None, help="hidden_align backend to fuzz")
    parser.add_argument("--artifacts", default=".", help="where --seeds writes failing inputs")
    parser.add_argument("--strict", action="store_true", help="known defects are findings too")
    args, rest = parser.parse_known_args()
    global strict
    strict = args.strict
    if args.backend:
        ha.set_backend(args.backend)
    atexit.register(_report)
    if args.seeds is not None:
        sys.exit(_run_seeds(args.seeds, args.start, args.artifacts))
    if atheris is None:
        sys.exit("atheris is not installed for this Python: use --seeds N")
    atheris.Setup([sys.argv[0], *rest], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
