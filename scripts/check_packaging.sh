#!/usr/bin/env bash
# Checks the package as users get it: `maturin build --release` gives one abi3 manylinux wheel
# (CPython 3.9+) that `auditwheel show` accepts, that installs into a clean virtual environment
# (no site packages; torch comes from PyPI) and passes `hidden-align doctor` there (versions,
# backends, and the correctness self-check of the CPU backend against float64 formulas); and the
# sdist builds a wheel. The release workflow (.github/workflows/release.yml) runs the same steps
# for Linux x86_64 and aarch64.
#
# Usage: bash scripts/check_packaging.sh [--keep-venv]
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/packaging
venv=target/venv-clean
rm -rf "$out"
mkdir -p "$out/wheel" "$out/sdist" "$out/from-sdist"

echo "== maturin build --release"
maturin build --release --out "$out/wheel"
wheel=$(ls "$out"/wheel/hidden_align-*.whl)
echo "$wheel"
case "$(basename "$wheel")" in
*-cp39-abi3-manylinux*) ;;
*) echo "check_packaging.sh: $wheel is not a cp39-abi3 manylinux wheel" >&2; exit 1 ;;
esac

echo "== auditwheel show"
report=$(auditwheel show "$wheel")
echo "$report"
# auditwheel names the manylinux policy the wheel's symbols and libraries satisfy; a wheel that
# links a library outside the policy is reported as needing repair instead.
echo "$report" | tr -s ' \n' ' ' | grep -q 'consistent with the following platform tag: "manylinux' || {
    echo "check_packaging.sh: auditwheel does not accept $wheel" >&2
    exit 1
}

echo "== clean virtual environment: install the wheel, run hidden-align doctor"
if [ ! -x "$venv/bin/python" ]; then
    python -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "$wheel"
"$venv/bin/python" -m pip install --quiet "$wheel"
# Run from outside the repository so the import cannot pick up the source tree.
(cd "$out" && "../../$venv/bin/python" -c '
import hidden_align, hidden_align._native as n, sys
assert "site-packages" in hidden_align.__file__, hidden_align.__file__
assert n.__file__.endswith(".abi3.so"), n.__file__
print("imported", hidden_align.__version__, "from", hidden_align.__file__)
' && "../../$venv/bin/hidden-align" doctor)

echo "== sdist builds"
maturin sdist --out "$out/sdist"
sdist=$(ls "$out"/sdist/hidden_align-*.tar.gz)
echo "$sdist"
tar -xzf "$sdist" -C "$out/sdist"
# The same target folder as the build above: only this crate is compiled again.
target_dir="$(pwd)/target"
(cd "$out"/sdist/hidden_align-*/ && CARGO_TARGET_DIR="$target_dir" \
    maturin build --release --out "../../from-sdist")
ls "$out"/from-sdist/hidden_align-*-cp39-abi3-manylinux*.whl
echo "packaging checks passed"
