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
        return len(value) > 0 and all(isinstance(u, str) for u in value)
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
            A single str is refused.
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
    elif not hasattr(uids, "__len__"):
        uids = list(uids)
    out = torch.empty(len(uids), dtype=torch.int64)
    _native.uid_group_ids(uids, out)
    return out if device is None else out.to(device, non_blocking=True)
