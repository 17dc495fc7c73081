// The launcher of the kernels compiled as C++ for the CPU (cargo feature `emulation`): one C
// entry point that src/cuda/emulated.rs calls with the same grid, block, shared memory and
// parameter block as a real launch, running the blocks on one slot or several at once.
#include "cuda_emulation.hpp"

#define HA_EMU_SLOT_DECL(s) extern "C" int ha_emu_slot_linked_##s();
HA_EMU_FOR_EACH_SLOT(HA_EMU_SLOT_DECL)

namespace {
int link_every_slot() {
    int sum = 0;
#define HA_EMU_SLOT_USE(s) sum += ha_emu_slot_linked_##s();
    HA_EMU_FOR_EACH_SLOT(HA_EMU_SLOT_USE)
    return sum;
}
}  // namespace

// Runs kernel `name` to completion on `slots` block slots at once (1: blocks one after
// another; at most HA_EMU_SLOTS); returns 0, 1 when no kernel has that name, 2 when `slots`
// is out of range.
extern "C" int ha_emu_launch(const char* name, const unsigned* grid, const unsigned* block,
                             size_t dynamic_shared_bytes, const void* params, int slots) {
    static const int linked = link_every_slot();
    (void)linked;
    if (slots < 1 || slots > ha_emu::max_slots) return 2;
    for (const ha_emu::Entry& e : ha_emu::registry()) {
        if (std::strcmp(e.name, name) == 0) {
            ha_emu::run(e.fn, slots, params, ha_emu::dim3{grid[0], grid[1], grid[2]},
                        ha_emu::dim3{block[0], block[1], block[2]}, dynamic_shared_bytes);
            return 0;
        }
    }
    return 1;
}

// How many block slots this build has.
extern "C" int ha_emu_max_slots() { return ha_emu::max_slots; }
