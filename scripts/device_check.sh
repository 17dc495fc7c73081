#!/usr/bin/env bash
# The checks of the CUDA backend that need a GPU, in one run of under 8 minutes on a machine
# with no network: installs the wheel made by scripts/prepare_device.sh into a private folder
# (never the source tree's python/), then, each part under its own time limit:
#   doctor     `hidden-align doctor`
#   tests      tests/test_cuda_device.py (CUDA against the CPU backend, sync debug mode "error")
#   memcheck   scripts/device_smoke.py (every op once) under compute-sanitizer's memcheck
#   racecheck  the same under racecheck
#   bench      benches/bench_cuda.py (every op against eager formulas and torch.compile)
#   logprobs   benches/bench_logprobs.py at N=8192, H=4096, V=151936 (bfloat16) against eager
#   demo       `hidden-align demo --device cuda` for a few steps
# Without a GPU it says so, still installs the wheel, runs doctor, runs the tests (which then
# skip) and the smoke script on the CPU, marks the GPU parts skipped, and exits 0.
#
# Usage: bash scripts/device_check.sh [OUT_DIR] [--archive FILE]
#   OUT_DIR     where everything is written (default target/device-check): site/ (the install),
#               <part>.log, summary.txt, bench-results/, demo/, cache/
#   --archive   also pack the logs, summary and results (not site/ or cache/) into FILE
#               (.tar.gz); the default is $OUT/device-check.tar.gz when $OUT is set
# Environment: DEVICE_WHEELS (default target/device), PYTHON (default python3).
# Exit status: 0 when every part that ran passed (or was skipped), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

out_dir=""
archive=""
while [ $# -gt 0 ]; do
    case "$1" in
    --archive) archive=$2; shift 2 ;;
    -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "device_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) out_dir=$1; shift ;;
    esac
done
out_dir=${out_dir:-target/device-check}
if [ -z "$archive" ] && [ -n "${OUT:-}" ]; then
    archive="$OUT/device-check.tar.gz"
fi
wheels=${DEVICE_WHEELS:-target/device}
py=${PYTHON:-python3}

mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
site="$out_dir/site"
summary="$out_dir/summary.txt"
rm -rf "$site" "$out_dir/bench-results" "$out_dir/demo" "$out_dir"/*.log
: >"$summary"
# Every cache the parts write goes under OUT_DIR too: compiled kernels, torch.compile's.
export HIDDEN_ALIGN_CACHE_DIR="$out_dir/cache/hidden_align"
export TORCHINDUCTOR_CACHE_DIR="$out_dir/cache/inductor"
export TRITON_CACHE_DIR="$out_dir/cache/triton"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

# Budget in seconds for the whole run; each part gets at most its own limit and at most what is
# left of the budget, so one part that hangs cannot push the run past it.
budget=470
start=$SECONDS
failed=0

note() { echo "$*" | tee -a "$summary"; }

# run_part NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, its output shown and kept in
# NAME.log; records pass, fail (exit status) or timeout with the seconds it took.
run_part() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget - (SECONDS - start)))
    if [ "$left" -lt 10 ]; then
        note "$(printf '%-13s skipped: the %ss budget is spent' "$name" "$budget")"
        failed=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out_dir/$name.log"
    rc=${PIPESTATUS[0]}
    local took=$((SECONDS - t0))
    if [ "$rc" = 0 ]; then
        note "$(printf '%-13s pass (%ss)' "$name" "$took")"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        note "$(printf '%-13s FAIL: timed out after %ss' "$name" "$took")"
        failed=1
    else
        note "$(printf '%-13s FAIL: exit status %s (%ss), see %s.log' "$name" "$rc" "$took" "$name")"
        failed=1
    fi
}

skip() { note "$(printf '%-13s skipped: %s' "$1" "$2")"; }

# ---- the GPU, if any
gpu_name=$("$py" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>/dev/null)
smi="nvidia-smi not found"
if command -v nvidia-smi >/dev/null; then
    smi=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4)
fi
note "device check of hidden_align, $(date -u '+%Y-%m-%d %H:%M UTC'), host $(hostname)"
note "python: $("$py" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)' 2>&1)"
note "nvidia-smi: $smi"
if [ -n "$gpu_name" ]; then
    note "GPU: $gpu_name"
else
    note "No GPU: PyTorch sees no CUDA device here (torch.cuda.is_available() is False)."
    note "The parts that need one are skipped; the install, doctor, the test collection and the"
    note "smoke script on the CPU still run."
fi

# ---- install the wheel into the private site folder
shopt -s nullglob
wheel_files=("$wheels"/hidden_align-*.whl)
extra_files=("$wheels"/extras/*.whl)
shopt -u nullglob
if [ "${#wheel_files[@]}" != 1 ]; then
    note "install    FAIL: expected one hidden_align wheel in $wheels, found ${#wheel_files[@]};"
    note "           run bash scripts/prepare_device.sh first and carry $wheels"
    exit 1
fi
run_part install 60 "$py" -m pip install --no-index --no-deps --no-compile --no-cache-dir \
    --disable-pip-version-check --quiet --target "$site" "${wheel_files[@]}" "${extra_files[@]}"
# The package must come from the wheel: the repository root (pytest's rootdir, the scripts'
# folders) must not put the source tree's python/hidden_align in front of it.
where=$("$py" -c 'import hidden_align as ha; print(ha.__file__)' 2>&1)
case "$where" in
"$site"/*) note "imported:  $where (emulation built: $("$py" -c 'import hidden_align as ha; print(ha.cuda_status()["emulation_built"])'))" ;;
*)
    note "install    FAIL: hidden_align imports from $where, not from $site"
    exit 1
    ;;
esac
hidden_align=("$py" -m hidden_align)

# ---- 1. doctor (exits 1 when a self-check fails)
run_part doctor 60 "${hidden_align[@]}" doctor

# ---- 2. the GPU tests; without a GPU they are collected and every one skips
pytest_args=(-p no:cacheprovider --rootdir "$repo" -o addopts="" -q -rs)
if [ -n "$gpu_name" ]; then
    run_part tests 150 "$py" -m pytest "${pytest_args[@]}" tests/test_cuda_device.py
    # With a GPU that the CUDA backend cannot use, every test skips and pytest exits 0.
    if ! grep -q ' passed' "$out_dir/tests.log"; then
        note "$(printf '%-13s FAIL: no test passed (skip reasons in tests.log)' tests)"
        failed=1
    fi
else
    run_part tests-collect 60 "$py" -m pytest "${pytest_args[@]}" tests/test_cuda_device.py
    skip tests "no GPU (every test of tests/test_cuda_device.py skipped)"
fi

# ---- 3. compute-sanitizer over every op
sanitizer=$(command -v compute-sanitizer || true)
for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [ -z "$sanitizer" ] && [ -x "$candidate" ] && sanitizer=$candidate
done
if [ -z "$gpu_name" ]; then
    run_part smoke-cpu 90 "$py" scripts/device_smoke.py --device cpu
    skip memcheck "no GPU (scripts/device_smoke.py ran on the CPU instead)"
    skip racecheck "no GPU"
elif [ -z "$sanitizer" ]; then
    run_part smoke 60 "$py" scripts/device_smoke.py --device cuda
    skip memcheck "compute-sanitizer not found (the smoke script ran without it)"
    skip racecheck "compute-sanitizer not found"
else
    # Without PyTorch's caching allocator every tensor is its own cudaMalloc, so an access past
    # the end of one is outside any allocation, which is what memcheck can see.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_part memcheck 90 "$sanitizer" --tool memcheck \
        --error-exitcode 3 --target-processes all "$py" scripts/device_smoke.py --device cuda
    run_part racecheck 75 "$sanitizer" --tool racecheck --error-exitcode 3 \
        --target-processes all "$py" scripts/device_smoke.py --device cuda
fi

# ---- 4. benchmark; the table lands in bench-results/ of the repository, copied to OUT_DIR
if [ -n "$gpu_name" ]; then
    before=$(date +%s)
    run_part bench 200 "$py" benches/bench_cuda.py --reps 30
    mkdir -p "$out_dir/bench-results"
    find bench-results -maxdepth 1 -name 'cuda*' -newermt "@$before" \
        -exec cp {} "$out_dir/bench-results/" \;
else
    skip bench "no GPU"
fi

# ---- 4b. token_logprobs at a real LM head's size, against eager (torch.compile left out: its
# compile would take most of the part's time)
if [ -n "$gpu_name" ]; then
    before=$(date +%s)
    run_part logprobs 90 "$py" benches/bench_logprobs.py --device cuda --n 8192 --h 4096 \
        --v 151936 --dtypes bfloat16 --reps 3 --no-compile
    mkdir -p "$out_dir/bench-results"
    find bench-results -maxdepth 1 -name 'token-logprobs-cuda*' -newermt "@$before" \
        -exec cp {} "$out_dir/bench-results/" \;
else
    skip logprobs "no GPU"
fi

# ---- 5. the demo on the GPU, a few steps
if [ -n "$gpu_name" ]; then
    run_part demo 60 "${hidden_align[@]}" demo --device cuda --steps 4 --warmup-steps 30 \
        --eval-every 2 --eval-size 32 --quiet --out "$out_dir/demo"
else
    skip demo "no GPU"
fi

note "total: $((SECONDS - start))s of a ${budget}s budget; $([ "$failed" = 0 ] && echo 'all parts that ran passed' || echo 'SOME PARTS FAILED')"
if [ -n "$archive" ]; then
    mkdir -p "$(dirname "$archive")"
    tar -czf "$archive" -C "$out_dir" --exclude=./site --exclude=./cache . &&
        cp "$summary" "$(dirname "$archive")/summary.txt" 2>/dev/null
    echo "packed into $archive"
fi
echo
echo "== summary ($summary)"
cat "$summary"
exit "$failed"
