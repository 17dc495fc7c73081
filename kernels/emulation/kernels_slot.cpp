// One copy of the kernels of kernels/*.cu compiled as C++ for the CPU, for block slot
// HA_EMU_SLOT (build.rs compiles this file once per slot with -DHA_EMU_SLOT=s). Each copy
// lives in a namespace of its own, so its `__shared__` statics belong to the blocks that slot
// runs; the static registrations hand every copy to the launcher in emulation.cpp.
#include "cuda_emulation.hpp"

#ifndef HA_EMU_SLOT
#error "build.rs defines HA_EMU_SLOT"
#endif

#define HA_EMU_CONCAT_(a, b) a##b
#define HA_EMU_CONCAT(a, b) HA_EMU_CONCAT_(a, b)

namespace HA_EMU_CONCAT(ha_emu_slot_, HA_EMU_SLOT) {
#include "../common.cuh"
#include "../rows.cu"
#include "../dapo.cu"
#include "../anchor_align.cu"
#include "../anchors.cu"
#include "../logprobs.cu"
}  // namespace

// Referenced by emulation.cpp, so that the linker keeps this copy and its registrations.
extern "C" int HA_EMU_CONCAT(ha_emu_slot_linked_, HA_EMU_SLOT)() { return HA_EMU_SLOT; }
