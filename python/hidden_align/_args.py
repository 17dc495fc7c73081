"""Argument checks shared by the public functions (before anything crosses into Rust)."""

from __future__ import annotations

import torch

from ._groups import hash_uids, is_uid_sequence
from .errors import ArgumentError, DeviceError


def require_tensor(name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        raise ArgumentError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")


def same_device(first: tuple, *others: tuple, allow_meta: bool = False) -> None:
    """Each ``(name, tensor)`` in ``others`` (None allowed) is on the device of ``first``, which
    is not the meta device unless ``allow_meta`` (an op of torch ops alone, which reads no
    data)."""
    name0, t0 = first
    for name, t in others:
        if t is not None and t.device != t0.device:
            raise DeviceError(
                f"{name}: expected a tensor on {t0.device} (the device of {name0}), "
                f"got one on {t.device}"
            )
    if not allow_meta:
        check_data_device(name0, t0)


def moves_to(source: torch.device, target: torch.device) -> bool:
    """Whether group ids on ``source`` are copied to data on ``target``: host ids for CUDA data
    only (every other mismatch stays a :class:`DeviceError`)."""
    return source.type == "cpu" and target.type == "cuda"


def group_ids_on(group_ids, data: torch.Tensor):
    """``group_ids`` as a tensor on the device of ``data``. uid strings (a list of str, verl's
    numpy object array) become ids through ``dapo.group_ids_from_uids``; ids on the host for
    CUDA data are copied over with ``non_blocking=True`` (the source is staged at once, so
    nothing waits for the device); any other tensor is returned as it is, for
    :func:`same_device` to judge."""
    if is_uid_sequence(group_ids):
        group_ids = hash_uids(group_ids, "group_ids")
    require_tensor("group_ids", group_ids, optional=True)
    if isinstance(group_ids, torch.Tensor) and moves_to(group_ids.device, data.device):
        return group_ids.to(data.device, non_blocking=True)
    return group_ids


def check_int(name: str, value, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(f"{name}: expected an int, got {type(value).__name__}")
    if not -(2**63) <= value < 2**63:
        # The native side takes int64: a larger int would be an OverflowError there.
        raise ArgumentError(f"{name}: expected an int that fits int64, got {value}")


def as_float(name: str, value) -> float:
    """A real number as float; anything else (a string, a tensor, a bool) is an error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentError(f"{name}: expected a number, got {type(value).__name__}")
    return float(value)


def check_bool(name: str, value) -> bool:
    """A real bool (``bool(x)`` would take the string ``"false"`` or any non-empty list for
    True, and raise torch's own error for a tensor of several elements)."""
    if not isinstance(value, bool):
        raise ArgumentError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def check_choice(name: str, value, choices: tuple, optional: bool = False) -> None:
    """``value`` is one of the strings ``choices`` (or None when ``optional``). Only a str is
    compared: ``in`` on a dict or set raises TypeError for an unhashable value, and comparing a
    numpy array or a tensor gives an array whose truth value raises."""
    if optional and value is None:
        return
    if not (isinstance(value, str) and value in choices):
        expected = f"None or one of {choices}" if optional else f"one of {choices}"
        raise ArgumentError(f"{name}: expected {expected}, got {value!r}")


def check_data_device(name: str, t: torch.Tensor) -> None:
    """``t`` has data to read: a meta tensor would fail its DLPack export with torch's
    message and C++ backtrace."""
    if t.device.type == "meta":
        raise DeviceError(f"{name}: expected a tensor on cpu or cuda, got one on meta")


def saveable(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as autograd can save it for backward: an inference tensor (made under
    ``torch.inference_mode()``, e.g. old log-probs) has no version counter and is refused by
    ``save_for_backward``, so it is copied; any other tensor is returned as it is."""
    if t is not None and t.is_inference():
        return t.clone()
    return t


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype results are computed in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def detached(t: torch.Tensor | None) -> torch.Tensor | None:
    """A view without autograd history (DLPack refuses tensors that require grad)."""
    return None if t is None else t.detach()


def check_anchor_inputs(hidden, mask, rewards, group_ids, group_size, cu_seqlens):
    """The checks of the alignment loss's inputs that need no element read, shared by
    ``hidden_align.loss`` and ``hidden_align.group_anchor_stats``; returns ``group_ids`` as
    :func:`group_ids_on` makes them."""
    require_tensor("hidden", hidden)
    require_tensor("mask", mask)
    require_tensor("rewards", rewards)
    require_tensor("cu_seqlens", cu_seqlens, optional=True)
    check_int("group_size", group_size)
    group_ids = group_ids_on(group_ids, hidden)
    same_device(
        ("hidden", hidden),
        ("mask", mask),
        ("rewards", rewards),
        ("group_ids", group_ids),
        ("cu_seqlens", cu_seqlens),
    )
    return group_ids
