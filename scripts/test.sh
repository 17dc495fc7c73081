#!/usr/bin/env bash
# Runs every test of the project from a fresh clone: installs the package (built with the
# `emulation` feature, so the CUDA kernels also run on the CPU) with its test and parity extras
# (torch, pytest, ruff, ptxas, verl), then the Rust checks, the kernel compile check, the
# ThreadSanitizer run of the emulated kernels and the Python tests.
set -euo pipefail
cd "$(dirname "$0")/.."

MATURIN_PEP517_ARGS="--features emulation" python -m pip install --quiet --editable ".[test,parity]"

echo "== cargo fmt / clippy / test"
cargo fmt --all -- --check
cargo clippy --all-targets --features emulation -- -D warnings
cargo test --no-default-features --features emulation --quiet
echo "== Rust tests of the kernels, four emulated blocks at once"
HIDDEN_ALIGN_EMULATED_BLOCKS=4 cargo test --no-default-features --features emulation --quiet \
    --lib cuda::tests

echo "== CUDA kernels: NVRTC + ptxas for sm_80 and sm_90, no spills"
python scripts/check_kernels.py

echo "== CUDA kernels: emulated under ThreadSanitizer"
bash scripts/tsan.sh

echo "== ruff"
ruff check .
ruff format --check .

echo "== pytest"
python -m pytest -q
echo "== pytest: the emulated kernels again, four blocks of each launch at once"
HIDDEN_ALIGN_EMULATED_BLOCKS=4 python -m pytest -q tests/test_cuda_emulated.py
