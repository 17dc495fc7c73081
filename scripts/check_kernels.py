"""Compile check of the CUDA kernels without a GPU.

Every kernel family is compiled by NVRTC (the exact program the runtime compiles, from
``hidden_align._native.kernel_programs()``) to PTX for each architecture, then assembled by
``ptxas -v``; the script prints registers, shared memory, stack and spills per kernel, and
fails when NVRTC or ptxas fails or any kernel spills.

NVRTC comes with PyTorch's CUDA wheel (or ``pip install nvidia-cuda-nvrtc``), ptxas with
``pip install nvidia-cuda-nvcc``.

Usage: python scripts/check_kernels.py [--arch 80 90] [--keep DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from hidden_align import _backend, _native


def find_ptxas() -> str:
    for entry in sys.path:
        for path in glob.glob(os.path.join(entry or ".", "nvidia", "cu1*", "bin", "ptxas")):
            return path
        for path in glob.glob(os.path.join(entry or ".", "nvidia", "cuda_nvcc", "bin", "ptxas")):
            return path
    found = shutil.which("ptxas")
    if found:
        return found
    sys.exit("ptxas not found: pip install nvidia-cuda-nvcc")


def load_nvrtc() -> ctypes.CDLL:
    for path in _backend._nvrtc_candidates():
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    sys.exit("NVRTC not found: pip install nvidia-cuda-nvrtc")


def compile_ptx(nvrtc: ctypes.CDLL, name: str, source: str, arch: int) -> bytes:
    prog = ctypes.c_void_p()
    rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None)
    if rc != 0:
        sys.exit(f"nvrtcCreateProgram({name}) failed: {rc}")
    opts = [f"--gpu-architecture=compute_{arch}".encode()]
    opts += [o.encode() for o in _native.NVRTC_OPTIONS]
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        sys.exit(f"NVRTC failed on kernels/{name} for compute_{arch}:\n{log.value.decode()}")
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetPTX(prog, ptx)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value


def assemble(ptxas: str, ptx_path: str, arch: int) -> list[dict]:
    out = subprocess.run(
        [ptxas, f"-arch=sm_{arch}", "-v", ptx_path, "-o", os.devnull],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        sys.exit(f"ptxas failed on {ptx_path} for sm_{arch}:\n{out.stderr}")
    kernels, current = [], None
    for line in out.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = {"kernel": m.group(1), "arch": arch}
            kernels.append(current)
            continue
        if current is None:
            continue
        m = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        )
        if m:
            current.update(
                stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3))
            )
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(sm.group(1)) if sm else 0
    return kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--keep", help="directory to keep the PTX in")
    args = parser.parse_args()
    nvrtc, ptxas = load_nvrtc(), find_ptxas()
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    print(f"NVRTC {major.value}.{minor.value}; ptxas {ptxas}")
    workdir = args.keep or tempfile.mkdtemp(prefix="hidden_align_ptx_")
    os.makedirs(workdir, exist_ok=True)
    rows, spilled = [], []
    for name, program in _native.kernel_programs():
        for arch in args.arch:
            path = os.path.join(workdir, f"{name}.sm_{arch}.ptx")
            with open(path, "wb") as f:
                f.write(compile_ptx(nvrtc, name, program, arch))
            for k in assemble(ptxas, path, arch):
                k["file"] = name
                rows.append(k)
                if k.get("spill_st", 0) or k.get("spill_ld", 0):
                    spilled.append(k)
    header = (
        f"{'file':<17} {'kernel':<26} {'arch':>6} {'regs':>5} {'smem B':>7} {'stack B':>8} "
        f"{'spill st/ld B':>14}"
    )
    print(header)
    print("-" * len(header))
    for k in sorted(rows, key=lambda k: (k["file"], k["kernel"], k["arch"])):
        print(
            f"{k['file']:<17} {k['kernel']:<26} {'sm_' + str(k['arch']):>6} {k['regs']:>5} "
            f"{k['smem']:>7} {k['stack']:>8} {str(k['spill_st']) + '/' + str(k['spill_ld']):>14}"
        )
    print(f"{len(rows)} kernel builds checked")
    if spilled:
        names = ", ".join(f"{k['kernel']} (sm_{k['arch']})" for k in spilled)
        sys.exit(f"register spills in: {names}")


if __name__ == "__main__":
    main()
