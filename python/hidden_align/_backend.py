"""Backend selection, PyTorch's CUDA stream for the kernels, and finding NVRTC.

The CUDA kernels are compiled at run time by NVRTC, which PyTorch's CUDA wheels ship
(``nvidia/cu13/lib`` for CUDA 13, ``nvidia/cuda_nvrtc/lib`` for CUDA 12). Before the first CUDA
launch the library is loaded from there (``RTLD_GLOBAL``), so the native module finds it by
its soname without ``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import sys
from collections.abc import Iterator

import torch

from . import _native

_BACKENDS = ("auto", "cpu", "cuda", "cuda-emulated")
_nvrtc: dict = {"tried": False, "path": None, "error": None}


def _nvrtc_candidates() -> list[str]:
    """Where pip-installed CUDA wheels put ``libnvrtc.so.<major>``: the CUDA major version
    PyTorch was built with first (its NVRTC knows PyTorch's GPUs and suits the driver PyTorch
    needs), then any other."""
    roots = [
        os.path.join(entry, "nvidia")
        for entry in sys.path
        if entry and os.path.isdir(os.path.join(entry, "nvidia"))
    ]
    found = []
    for root in roots:
        found += glob.glob(os.path.join(root, "cu1[0-9]", "lib", "libnvrtc.so.1[0-9]"))
        found += glob.glob(os.path.join(root, "cuda_nvrtc", "lib", "libnvrtc.so.1[0-9]"))
    major = (torch.version.cuda or "").split(".")[0]
    found = sorted(set(found), key=lambda p: (not p.endswith(f".so.{major}"), p))
    return found


def _load_nvrtc() -> None:
    """Loads the NVRTC that came with PyTorch, once (no-op when none is found)."""
    if _nvrtc["tried"]:
        return
    _nvrtc["tried"] = True
    for path in _nvrtc_candidates():
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            _nvrtc["error"] = f"{path}: {e}"
            continue
        _nvrtc["path"] = path
        return


def stream_of(t: torch.Tensor) -> int | None:
    """The raw handle of PyTorch's current stream on ``t``'s device, or None for CPU tensors."""
    if not t.is_cuda:
        return None
    _load_nvrtc()
    return torch.cuda.current_stream(t.device).cuda_stream


def set_backend(name: str) -> None:
    """Selects the backend of every op in this process.

    ``"auto"`` (default): CUDA tensors run the CUDA kernels, CPU tensors the CPU backend.
    ``"cpu"`` / ``"cuda"``: only that backend (tensors on the other device are an error).
    ``"cuda-emulated"``: the CUDA kernels executed on the CPU (CPU tensors; builds with the
    ``emulation`` cargo feature, as the test build), for testing and debugging kernels.
    The environment variable ``HIDDEN_ALIGN_BACKEND`` sets the initial value.
    """
    if name not in _BACKENDS:
        from .errors import ArgumentError

        raise ArgumentError(f"backend: expected one of {_BACKENDS}, got {name!r}")
    _native.set_backend(name)


def get_backend() -> str:
    """The name of the selected backend."""
    return _native.get_backend()


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous backend on exit."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def prepare_cuda(device=None) -> None:
    """Compiles (or takes from the on-disk cache) and loads the CUDA kernels on ``device``
    (default: the current CUDA device) now instead of at the first call. Call it before
    capturing a CUDA graph: loading a module is not allowed during capture."""
    device = torch.device("cuda") if device is None else torch.device(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    _load_nvrtc()
    _native.prepare_cuda(index)


def cuda_status() -> dict:
    """What the CUDA backend found: driver and NVRTC (whether found, versions, the NVRTC file
    loaded), device count, whether kernels can run (``available``) and if not, why
    (``reason``), and whether this build has the emulated backend."""
    _load_nvrtc()
    status = dict(_native.cuda_status())
    status["nvrtc_path"] = _nvrtc["path"]
    if _nvrtc["path"] is None:
        status["nvrtc_search"] = _nvrtc_candidates() or "no libnvrtc under the nvidia wheels"
        if _nvrtc["error"]:
            status["nvrtc_error"] = _nvrtc["error"]
    status["torch_cuda_available"] = torch.cuda.is_available()
    return status


def simd_levels() -> dict:
    """The instruction set of the CPU kernels: ``level`` (in use), ``best`` (the best this CPU
    has) and ``available`` (every level it has, lowest first). Levels are ``"avx512"``
    (x86-64-v4), ``"avx2"`` (AVX2 + FMA, x86-64-v3) and ``"baseline"`` on x86-64, ``"neon"``
    on aarch64. Every level gives the same results bit for bit (docs/design.md, "SIMD")."""
    level, best, available = _native.simd_levels()
    return {"level": level, "best": best, "available": list(available)}


def set_simd_level(level: str | None = None) -> str:
    """Runs the CPU kernels at ``level`` (one this CPU has, e.g. ``"avx2"`` on an AVX-512
    machine), or at the best one for ``None``; returns the level now in use. The environment
    variable ``HIDDEN_ALIGN_SIMD`` sets it at import."""
    if level is not None and not isinstance(level, str):
        from .errors import ArgumentError

        raise ArgumentError(f"level: expected a level name or None, got {type(level).__name__}")
    return _native.set_simd_level(level)


if os.environ.get("HIDDEN_ALIGN_BACKEND"):
    set_backend(os.environ["HIDDEN_ALIGN_BACKEND"])
if os.environ.get("HIDDEN_ALIGN_SIMD"):
    set_simd_level(os.environ["HIDDEN_ALIGN_SIMD"])
