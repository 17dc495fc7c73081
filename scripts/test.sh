#!/usr/bin/env bash
# Runs every test of the project from a fresh clone: installs the package with its test and
# parity extras (torch, pytest, ruff, verl), then the Rust checks and the Python checks.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --editable ".[test,parity]"

echo "== cargo fmt / clippy / test"
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --no-default-features --quiet

echo "== ruff"
ruff check .
ruff format --check .

echo "== pytest"
python -m pytest -q
