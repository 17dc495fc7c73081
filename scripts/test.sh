#!/usr/bin/env bash
# Runs every test of the project from a fresh clone: installs the package (built with the
# `emulation` feature, so the CUDA kernels also run on the CPU) with its test and parity extras
# (torch, pytest, ruff, ptxas, verl, TRL, tokenizers, transformers) and OpenRLHF (without its
# GPU-only dependencies), then the Rust checks, the kernel compile check, the ThreadSanitizer
# run of the emulated kernels, the Python tests (property, hostile-input, determinism, memory
# and thread tests among them), a short fuzz run, the packaging check (release wheel in a clean
# virtual environment, sdist) and the Python tests again with torch 2.11, the version verl
# 0.9.1 pins (the oldest supported; the first run uses the newest).
set -euo pipefail
cd "$(dirname "$0")/.."

MATURIN_PEP517_ARGS="--features emulation" python -m pip install --quiet --editable ".[test,parity]"
# OpenRLHF's dependencies include GPU-only packages (flash-attn, deepspeed, vllm): its classes
# are tested against ours with those stubbed, so it is installed without them. Its wheels are
# built for CPython 3.11: elsewhere its tests skip; here they must run (HIDDEN_ALIGN_REQUIRE_OPENRLHF).
if python -m pip install --quiet --no-deps "openrlhf==0.11.1"; then
    export HIDDEN_ALIGN_REQUIRE_OPENRLHF=1
else
    echo "OpenRLHF 0.11.1 has no wheel for this Python: its tests will skip"
fi

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
echo "== the package runs on Python 3.9 (the abi3 floor): no newer syntax or library use"
vermin --no-tips --violations -t=3.9- python/hidden_align

echo "== pytest"
python -m pytest -q
echo "== pytest: the CPU op tests at each lower SIMD level this CPU has (HIDDEN_ALIGN_SIMD)"
for level in $(python -c 'import hidden_align as ha; s = ha.simd_levels(); print(*s["available"][:-1])'); do
    echo "-- $level"
    HIDDEN_ALIGN_SIMD=$level python -m pytest -q -p no:cacheprovider tests/test_dapo.py \
        tests/test_dapo_verl.py tests/test_token_logprobs.py tests/test_align.py \
        tests/test_align_precision.py tests/test_find_anchors.py tests/test_simd_levels.py
done
echo "== pytest: the emulated kernels again, four blocks of each launch at once"
HIDDEN_ALIGN_EMULATED_BLOCKS=4 python -m pytest -q tests/test_cuda_emulated.py

echo "== pytest: the OpenRLHF tests with OpenRLHF 0.11.2 (the current release; 0.11.1 above)"
venv=target/venv-openrlhf0.11.2
bash scripts/overlay_venv.sh "$venv"
if "$venv/bin/python" -m pip install --quiet --no-deps "openrlhf==0.11.2"; then
    "$venv/bin/python" -c 'import importlib.metadata as m; v = m.version("openrlhf"); assert v == "0.11.2", v'
    "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_openrlhf_*.py
else
    echo "OpenRLHF 0.11.2 has no wheel for this Python: its tests are not run"
fi

echo "== fuzz: 20,000 atheris executions over every op and the native entry points"
mkdir -p target/fuzz
python scripts/fuzz.py --strict -atheris_runs=20000 -seed=1 -artifact_prefix=target/fuzz/

echo "== packaging: release abi3 wheel, auditwheel, clean virtual environment, sdist"
bash scripts/check_packaging.sh

echo "== pytest with torch 2.11 (verl 0.9.1's pin), in a virtual environment over this one"
# The environment sees every package of the active one (system Python, venv or conda env), with
# its own torch first: scripts/overlay_venv.sh says how.
venv=target/venv-torch2.11
bash scripts/overlay_venv.sh "$venv"
# What the tests need from the active environment, checked in one line instead of a collection
# error per test file.
if ! err=$("$venv/bin/python" -c 'import hidden_align, numpy, pytest' 2>&1); then
    echo "test.sh: $venv does not see the packages of $(python -c 'import sys; print(sys.prefix)'):" \
        "${err##*$'\n'}" >&2
    exit 1
fi
"$venv/bin/python" -m pip install --quiet "torch==2.11.0"
"$venv/bin/python" -c 'import torch; assert torch.__version__.startswith("2.11"), torch.__version__'
"$venv/bin/python" -m pytest -q -p no:cacheprovider
