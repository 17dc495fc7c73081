"""Group ids from verl's uid strings, hashed in Rust with a hash that is equal on every rank."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from . import _native
from .errors import ArgumentError

__all__ = ["group_ids_from_uids", "hash_uids", "is_uid_sequence"]


def is_uid_sequence(value) -> bool:
    """Whether ``value`` is a sequence of uids rather than a tensor of ids: a list or tuple of
    str, or a 1-D numpy array of objects or strings (verl's ``non_tensor_batch["uid"]``)."""
    if isinstance(value, (list, tuple)):
        # An empty list is the uids of an empty batch, as an empty numpy uid array is.
        return all(isinstance(u, str) for u in value)
    dtype = getattr(value, "dtype", None)
    kind = getattr(dtype, "kind", None)
    return not isinstance(value, torch.Tensor) and kind in ("O", "U", "S")


def group_ids_from_uids(uids: Iterable, *, device=None) -> torch.Tensor:
    """int64 group ids from verl's per-rollout uid strings (``batch.non_tensor_batch["uid"]``).

    Uses a stable hash (the 8-byte BLAKE2b digest of the UTF-8 string, read as a little-endian
    int64: ``hashlib.blake2b(uid.encode(), digest_size=8)``), so every data-parallel rank
    derives the same id for the same uid in every run; Python's ``hash`` is salted per process
    and would not. Hashed in Rust. Every op that takes ``group_ids`` also takes the uids
    themselves and calls this.

    Args:
        uids: the uids, any iterable (a 1-D numpy object or string array, a list of str);
            bytes are hashed as they are, other items that are not str go through ``str()``.
            A single str, an object that is not iterable, and a uid without a UTF-8 form (a
            str with a lone surrogate) are an ``ArgumentError``.
        device: where to create the ids; default None, the CPU. Every op taking ``group_ids``
            also accepts CPU ids with CUDA data and copies them over without blocking.

    Returns:
        int64 ``[len(uids)]``.

    Example:
        >>> ids = group_ids_from_uids(["a", "b", "a"])
        >>> bool(ids[0] == ids[2]), bool(ids[0] == ids[1])
        (True, False)
    """
    return hash_uids(uids, "uids", device)


def hash_uids(uids, name: str, device=None) -> torch.Tensor:
    """:func:`group_ids_from_uids` with errors naming the argument ``name``."""
    if isinstance(uids, (str, bytes)):
        raise ArgumentError(
            f"{name}: expected a sequence of uid strings, got a single "
            f"{type(uids).__name__}; wrap it in a list"
        )
    if isinstance(uids, torch.Tensor):
        raise ArgumentError(f"{name}: expected uid strings, got a tensor (already group ids?)")
    ndim = getattr(uids, "ndim", 1)
    if ndim != 1:
        raise ArgumentError(f"{name}: expected a 1-D sequence of uids, got {ndim} dimensions")
    if hasattr(uids, "tolist") and ndim == 1:
        # A numpy array: its list is built in C, and a list is the fastest thing to iterate.
        uids = uids.tolist()
    else:
        try:
            items = iter(uids)
        except TypeError:
            raise ArgumentError(
                f"{name}: expected a sequence of uid strings, got {type(uids).__name__}"
            ) from None
        if not hasattr(uids, "__len__"):
            uids = list(items)
    out = torch.empty(len(uids), dtype=torch.int64)
    try:
        _native.uid_group_ids(uids, out)
    except UnicodeEncodeError:
        # A str with a lone surrogate has no UTF-8 form, so no hash. Found again only here,
        # on the error path, so that valid uids are never looped over in Python.
        error = _unencodable(uids, name)
        if error is None:
            raise
        raise error from None
    return out if device is None else out.to(device, non_blocking=True)


def _unencodable(uids, name: str) -> ArgumentError | None:
    """The error naming the first uid that has no UTF-8 encoding (None if no item has one:
    then the UnicodeEncodeError came from an item's own ``__str__``)."""
    for i, item in enumerate(uids):
        if isinstance(item, bytes):
            continue
        # As the native side reads them: an exact str as it is, anything else through str().
        text = item if type(item) is str else str(item)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return ArgumentError(
                f"{name}[{i}]: expected a uid with a UTF-8 encoding, got one with "
                f"{text[e.start : e.end]!r} at position {e.start} ({e.reason})"
            )
    return None
