"""scripts/prepare_device.sh and scripts/device_check.sh on a machine without a GPU: the release
wheel is prepared (rebuilt only when a source is newer than the one in target/device), installed
into the check's private folder and imported from there; doctor, the test collection and the
smoke script run; every part that needs a GPU is reported as skipped; the run exits 0."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "target" / "device"
TRAVEL_LIMIT = 64 << 20  # bytes that may travel with the working tree to a GPU machine

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the device scripts are bash for Linux"),
    pytest.mark.skipif(
        torch.cuda.is_available(),
        reason="a GPU is present: run bash scripts/device_check.sh itself (minutes)",
    ),
]


def prepared_wheels() -> Path:
    have_wheel = any(WHEELS.glob("hidden_align-*.whl"))
    if not have_wheel and shutil.which("maturin") is None:
        pytest.skip("no wheel in target/device and no maturin to build one")
    done = subprocess.run(
        ["bash", "scripts/prepare_device.sh", "--reuse"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "carry: target/device" in done.stdout
    return WHEELS


def run_check(out_dir: Path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **env}
    full_env.pop("OUT", None)  # no archive next to the caller's files
    return subprocess.run(
        ["bash", "scripts/device_check.sh", str(out_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=full_env,
    )


def test_prepare_and_check_without_gpu(tmp_path):
    wheels = prepared_wheels()
    wheel_files = list(wheels.glob("hidden_align-*.whl"))
    assert len(wheel_files) == 1 and "-cp39-abi3-" in wheel_files[0].name
    travel = sum(f.stat().st_size for f in wheels.rglob("*") if f.is_file())
    assert travel < TRAVEL_LIMIT, f"{travel} bytes would travel"

    out_dir = tmp_path / "check"
    done = run_check(out_dir, DEVICE_WHEELS=str(wheels))
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "No GPU: PyTorch sees no CUDA device" in done.stdout

    summary = (out_dir / "summary.txt").read_text()
    site = out_dir / "site"
    assert (site / "hidden_align" / "__init__.py").is_file()
    # Imported from the private folder, and the release build: no emulated backend in it.
    assert f"imported:  {site}/hidden_align/__init__.py (emulation built: False)" in summary
    for part in ("install", "doctor", "tests-collect", "smoke-cpu"):
        assert f"{part:<13} pass" in summary, summary
        assert (out_dir / f"{part}.log").is_file()
    assert "self-check" in (out_dir / "doctor.log").read_text()
    assert "skipped" in (out_dir / "tests-collect.log").read_text()
    assert "all ops ran on cpu" in (out_dir / "smoke-cpu.log").read_text()
    for part in ("tests", "memcheck", "racecheck", "bench", "logprobs", "demo"):
        assert f"{part:<13} skipped: no GPU" in summary, summary
    assert "all parts that ran passed" in summary


def test_missing_wheel_is_reported(tmp_path):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    done = run_check(tmp_path / "check", DEVICE_WHEELS=str(empty))
    assert done.returncode == 1
    assert "run bash scripts/prepare_device.sh first" in done.stdout
