"""The runtime's own NVRTC path (Rust, through cudarc) compiles every kernel family to a CUBIN
without a GPU, and the on-disk cache serves the second request. Skipped without NVRTC."""

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
