"""Exception hierarchy. Every error the library raises is a :class:`HiddenAlignError`.

The native module maps each variant of its Rust error enum to one class here; each class also
derives from the builtin exception a caller would expect (``ValueError``, ``TypeError`` or
``RuntimeError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "CudaUnavailableError",
    "DeviceError",
    "DtypeError",
    "HiddenAlignError",
    "KernelError",
    "ShapeError",
]


class HiddenAlignError(Exception):
    """Root of every error raised by hidden_align."""


class ShapeError(HiddenAlignError, ValueError):
    """A tensor has the wrong rank or sizes."""


class DtypeError(HiddenAlignError, TypeError):
    """A tensor has an unsupported dtype."""


class DeviceError(HiddenAlignError, ValueError):
    """A tensor is on the wrong device, or tensors disagree on their device."""


class ArgumentError(HiddenAlignError, ValueError):
    """An argument has a value that cannot be accepted (an option, a count, an index)."""


class CudaUnavailableError(HiddenAlignError, RuntimeError):
    """The CUDA backend cannot run here."""


class KernelError(HiddenAlignError, RuntimeError):
    """A kernel failed in a way its arguments do not explain (a bug: please report it)."""
