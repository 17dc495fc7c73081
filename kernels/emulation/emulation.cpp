// The kernels of kernels/*.cu compiled as C++ for the CPU (cargo feature `emulation`), behind
// one C entry point that src/cuda/emulated.rs calls with the same grid, block, shared memory
// and parameter block as a real launch. One translation unit, so the static registrations of
// every kernel are linked in.
#include "cuda_emulation.hpp"

#include "../common.cuh"
#include "../rows.cu"
#include "../dapo.cu"
#include "../anchor_align.cu"

// Runs kernel `name` to completion; returns 0, or 1 when no kernel has that name.
extern "C" int ha_emu_launch(const char* name, const unsigned* grid, const unsigned* block,
                             size_t dynamic_shared_bytes, const void* params) {
    for (const ha_emu::Entry& e : ha_emu::registry()) {
        if (std::strcmp(e.name, name) == 0) {
            ha_emu::run(e.fn, params, ha_emu::dim3{grid[0], grid[1], grid[2]},
                        ha_emu::dim3{block[0], block[1], block[2]}, dynamic_shared_bytes);
            return 0;
        }
    }
    return 1;
}
