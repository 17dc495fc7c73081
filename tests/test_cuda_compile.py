"""The runtime's own NVRTC path (Rust, through cudarc) compiles every kernel family to a CUBIN
without a GPU, and the on-disk cache serves the second request. Skipped without NVRTC."""

import os

import pytest

import hidden_align as ha
from hidden_align import _native

pytestmark = pytest.mark.skipif(
    not ha.cuda_status()["nvrtc_found"],
    reason="NVRTC not found (it ships with PyTorch's CUDA wheels, or pip install "
    "nvidia-cuda-nvrtc)",
)


def test_every_family_compiles_for_sm80_and_sm90_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HIDDEN_ALIGN_CACHE_DIR", str(tmp_path))
    files = {name for name, _ in _native.kernel_programs()}
    for arch in (80, 90):
        built = dict(_native.compile_kernels(arch))
        assert set(built) == files and all(size > 0 for size in built.values())
        assert dict(_native.compile_kernels(arch)) == built
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert len(cached) == 2 * len(files)
    assert all(name.endswith(".cubin") and "-sm_" in name for name in cached)


def test_ptx_for_devices_newer_than_nvrtc(tmp_path, monkeypatch):
    # The fallback when NVRTC predates the GPU: PTX for the newest arch it knows.
    monkeypatch.setenv("HIDDEN_ALIGN_CACHE_DIR", str(tmp_path))
    built = dict(_native.compile_kernels(90, ptx=True))
    assert all(size > 1000 for size in built.values())
    assert all(p.name.endswith(".ptx") for p in tmp_path.iterdir())


def test_programs_need_no_include_path():
    for name, program in _native.kernel_programs():
        assert "#include" not in program, name
        assert 'extern "C" __global__' in program, name


# The disk cache: each file is a header (magic, format, image length, hash) and the image; a
# file that does not validate is compiled afresh and replaced, written through a temporary
# file of its own and a rename.


def _cache(tmp_path):
    return {p.name: p.read_bytes() for p in sorted(tmp_path.iterdir())}


def test_truncated_cache_files_are_recompiled_and_rewritten_whole(tmp_path, monkeypatch):
    monkeypatch.setenv("HIDDEN_ALIGN_CACHE_DIR", str(tmp_path))
    built = dict(_native.compile_kernels(80))
    whole = _cache(tmp_path)
    for name, data in whole.items():
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    assert dict(_native.compile_kernels(80)) == built
    assert _cache(tmp_path) == whole


def test_corrupted_cache_files_are_recompiled_and_rewritten(tmp_path, monkeypatch):
    # Same length, one byte changed in the image: only the hash can tell.
    monkeypatch.setenv("HIDDEN_ALIGN_CACHE_DIR", str(tmp_path))
    built = dict(_native.compile_kernels(90, ptx=True))
    whole = _cache(tmp_path)
    for name, data in whole.items():
        damaged = bytearray(data)
        damaged[len(data) * 2 // 3] ^= 0x20
        (tmp_path / name).write_bytes(bytes(damaged))
    assert dict(_native.compile_kernels(90, ptx=True)) == built
    assert _cache(tmp_path) == whole


def test_cache_files_of_another_kind_are_replaced(tmp_path, monkeypatch):
    # E.g. a bare image written by an earlier release, or anything else under that name.
    monkeypatch.setenv("HIDDEN_ALIGN_CACHE_DIR", str(tmp_path))
    built = dict(_native.compile_kernels(80))
    whole = _cache(tmp_path)
    for name in whole:
        (tmp_path / name).write_bytes(b"not a kernel image")
    assert dict(_native.compile_kernels(80)) == built
    assert _cache(tmp_path) == whole


def test_cache_writes_leave_no_temporary_files_and_never_touch_another_writers(
    tmp_path, monkeypatch
):
    # Another process (on another node sharing the home directory, with the same PID) is
    # writing the same entries: its temporary files must survive our writes, and ours must not
    # be left behind. `<key minus extension>.tmp<pid>` is the name earlier releases used.
    monkeypatch.setenv("HIDDEN_ALIGN_CACHE_DIR", str(tmp_path))
    built = dict(_native.compile_kernels(80))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == len(built) and all(n.endswith(".cubin") for n in names)
    theirs = {}
    for name in names:
        (tmp_path / name).unlink()
        foreign = tmp_path / f"{name.rsplit('.', 1)[0]}.tmp{os.getpid()}"
        foreign.write_bytes(b"half of another writer's image")
        theirs[foreign.name] = foreign.read_bytes()
    assert dict(_native.compile_kernels(80)) == built
    after = _cache(tmp_path)
    assert {n: after.get(n) for n in theirs} == theirs
    assert sorted(set(after) - set(theirs)) == names


def test_cuda_status_says_what_the_kernels_compile_to():
    status = ha.cuda_status()
    assert "kernel_target" in status and "kernel_target_reason" in status
    if status["available"]:
        assert status["kernel_target"].startswith(("sm_", "compute_"))
        assert status["kernel_target_reason"]
    elif not status["driver_found"]:
        assert status["kernel_target"] is None
