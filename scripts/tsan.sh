#!/usr/bin/env bash
# Runs the CUDA kernels under the emulator with ThreadSanitizer: the C++ build of kernels/*.cu
# (one CPU thread per CUDA thread, barriers for __syncthreads and warp exchanges) is
# instrumented, so a missing __syncthreads or a shared-memory race is reported as a data race.
# Drives src/cuda/tests.rs (every kernel family) twice: blocks one after another, then four
# blocks of each launch at once (the cross-block protocols under real concurrency). Exits
# non-zero on any report.
set -euo pipefail
cd "$(dirname "$0")/.."
export TSAN_OPTIONS="halt_on_error=1 exitcode=66 suppressions=$PWD/scripts/tsan.supp ${TSAN_OPTIONS:-}"
for blocks in 1 4; do
    echo "-- emulated blocks at once: $blocks"
    HIDDEN_ALIGN_EMULATED_BLOCKS=$blocks cargo test --no-default-features --features tsan \
        --target-dir target/tsan --lib cuda::tests -- --test-threads=1
done
