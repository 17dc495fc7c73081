#!/usr/bin/env bash
# Prepares what scripts/device_check.sh needs on a GPU machine without network access: the
# release wheel of this package (abi3, so one wheel serves that machine's Python 3.12) built
# WITHOUT the `emulation` feature, so the check exercises the build users install, and with
# --extras the wheels of packages such a machine may lack. Everything goes into one git-ignored
# folder, which is what travels with the working tree (named as the run's carry path).
#
# Usage: bash scripts/prepare_device.sh [--out DIR] [--reuse] [--extras]
#   --out DIR  destination folder (default target/device)
#   --reuse    keep the wheel already in DIR when no source file is newer than it
#   --extras   also download (network) CPython 3.12 manylinux x86_64 wheels of pytest and its
#              dependencies, tqdm and tokenizers into DIR/extras; device_check.sh installs them
#              next to the package. Only needed on a machine whose Python lacks them.
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/device
reuse=0
extras=0
while [ $# -gt 0 ]; do
    case "$1" in
    --out) out=$2; shift 2 ;;
    --reuse) reuse=1; shift ;;
    --extras) extras=1; shift ;;
    -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "prepare_device.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
# The limit on what travels with the working tree is 64 MiB; the tracked files take some of it.
limit_mib=48

mkdir -p "$out"
wheel=$(ls "$out"/hidden_align-*.whl 2>/dev/null | head -n 1 || true)
newer=""
if [ -n "$wheel" ]; then
    # Any source that goes into the wheel and changed after it was built (compiled leftovers and
    # caches excluded) makes it stale.
    newer=$(find src kernels python build.rs Cargo.toml Cargo.lock pyproject.toml -type f \
        -newer "$wheel" ! -name '*.so' ! -name '*.pyc' -print -quit)
fi
if [ "$reuse" = 1 ] && [ -n "$wheel" ] && [ -z "$newer" ]; then
    echo "reusing $wheel (no source newer than it)"
else
    rm -f "$out"/hidden_align-*.whl
    # Cargo serialises builds that share target/ through its lock, so this waits for any other
    # build of the project instead of competing with it.
    maturin build --release --out "$out"
    wheel=$(ls "$out"/hidden_align-*.whl | head -n 1)
fi
case "$wheel" in
*-cp39-abi3-*x86_64.whl) ;;
*) echo "prepare_device.sh: $wheel is not an abi3 x86_64 wheel" >&2; exit 1 ;;
esac

if [ "$extras" = 1 ]; then
    mkdir -p "$out/extras"
    # --no-deps with every dependency named: pip resolves nothing against this machine's Python.
    # pytest's own (Python 3.12 needs neither tomli nor exceptiongroup) are named; tokenizers'
    # huggingface-hub, with its many dependencies, is taken to be there already.
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$out/extras" \
        pytest pluggy iniconfig packaging pygments tqdm tokenizers
fi

size_kib=$(du -sk "$out" | cut -f1)
echo "prepared $out: $(ls "$out" | tr '\n' ' ')($((size_kib / 1024)) MiB)"
if [ "$size_kib" -gt $((limit_mib * 1024)) ]; then
    echo "prepare_device.sh: $out is over $limit_mib MiB, too much to travel" >&2
    exit 1
fi
echo "carry: $out"
