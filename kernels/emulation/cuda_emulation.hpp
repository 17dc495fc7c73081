// Executes the kernels of kernels/*.cu on the CPU, for testing without a GPU.
//
// Each CUDA thread of a block is a std::thread. A launch runs its blocks on `slots` block
// slots: one (blocks one after another, the default) or several at once, so that the
// protocols between the blocks of a launch (the last-block ticket, reads of other blocks'
// results) run concurrently as on a GPU. Slot s runs blocks s, s + slots, ... on its own
// threads, with its own copy of the kernels (compiled once per slot in a namespace of their
// own, kernels_slot.cpp), so `__shared__` variables can be statics of that copy.
// `__syncthreads` is a barrier over the block's live threads,
// warp shuffles go through a 32-slot exchange guarded by a per-warp barrier, and a thread that
// returns early leaves both barriers (as an exited CUDA thread stops counting). Every barrier is
// a mutex + condition variable, so ThreadSanitizer sees the same ordering a GPU guarantees and
// reports a data race when a kernel lacks a `__syncthreads` it needs.
#pragma once

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#define HA_EMULATION 1

// Block slots: copies of the kernels, so that up to this many blocks run at once. build.rs
// compiles kernels_slot.cpp once per slot (a missing copy fails the link).
#define HA_EMU_SLOTS 4
#define HA_EMU_FOR_EACH_SLOT(X) X(0) X(1) X(2) X(3)

namespace ha_emu {

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

// A barrier whose participant count shrinks when a participant leaves.
class Barrier {
  public:
    void reset(int expected) {
        std::lock_guard<std::mutex> lock(mutex_);
        expected_ = expected;
        arrived_ = 0;
    }
    void arrive_and_wait() {
        std::unique_lock<std::mutex> lock(mutex_);
        const long generation = generation_;
        if (++arrived_ == expected_) {
            release();
            return;
        }
        cv_.wait(lock, [&] { return generation != generation_; });
    }
    void arrive_and_drop() {
        std::lock_guard<std::mutex> lock(mutex_);
        --expected_;
        if (expected_ > 0 && arrived_ == expected_) release();
    }

  private:
    void release() {
        arrived_ = 0;
        ++generation_;
        cv_.notify_all();
    }
    std::mutex mutex_;
    std::condition_variable cv_;
    int expected_ = 0;
    int arrived_ = 0;
    long generation_ = 0;
};

struct Warp {
    Barrier barrier;
    uint64_t slots[32];
};

struct Launch {
    dim3 grid, block;
};

// What the threads of one block in flight share.
struct BlockSlot {
    Barrier block_barrier;
    Barrier block_end;
    std::vector<Warp> warps;
    std::vector<unsigned char> dynamic_shared;
};

inline constexpr int max_slots = HA_EMU_SLOTS;

inline Launch* current = nullptr;
inline thread_local BlockSlot* slot = nullptr;
inline thread_local dim3 thread_idx, block_idx;
inline thread_local unsigned linear_tid = 0;

inline int threads_in_warp(unsigned warp) {
    const unsigned n = current->block.x * current->block.y * current->block.z;
    const unsigned first = warp * 32;
    return static_cast<int>(n - first < 32 ? n - first : 32);
}

// Value of `v` held by lane `src` of the calling thread's warp.
template <class T>
T exchange(T v, unsigned src) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values are at most 8 bytes");
    Warp& w = slot->warps[linear_tid / 32];
    const unsigned lane = linear_tid % 32;
    std::memcpy(&w.slots[lane], &v, sizeof(T));
    w.barrier.arrive_and_wait();
    T out = v;
    if (src < static_cast<unsigned>(threads_in_warp(linear_tid / 32))) {
        std::memcpy(&out, &w.slots[src], sizeof(T));
    }
    w.barrier.arrive_and_wait();
    return out;
}

// Runs `kernels[s](params)` for the blocks of slot s, `slots` slots at once, over the whole
// grid; returns after the last block.
inline void run(void (*const* kernels)(const void*), int slots, const void* params, dim3 grid,
                dim3 block, size_t dynamic_shared_bytes) {
    static std::mutex one_launch_at_a_time;
    std::lock_guard<std::mutex> lock(one_launch_at_a_time);
    Launch launch;
    launch.grid = grid;
    launch.block = block;
    const unsigned n = block.x * block.y * block.z;
    const unsigned warps = (n + 31) / 32;
    const unsigned long blocks = static_cast<unsigned long>(grid.x) * grid.y * grid.z;
    if (slots < 1) slots = 1;
    if (blocks > 0 && static_cast<unsigned long>(slots) > blocks) slots = static_cast<int>(blocks);
    std::vector<BlockSlot> state(slots);
    current = &launch;
    for (BlockSlot& b : state) {
        b.warps = std::vector<Warp>(warps);
        // Uninitialised shared memory on a GPU holds garbage; a NaN pattern makes reads show.
        b.dynamic_shared.assign(dynamic_shared_bytes, 0xFF);
        b.block_end.reset(static_cast<int>(n));
    }
    auto reset_block = [&](BlockSlot& b) {
        b.block_barrier.reset(static_cast<int>(n));
        for (unsigned w = 0; w < warps; ++w) b.warps[w].barrier.reset(threads_in_warp(w));
    };
    for (BlockSlot& b : state) reset_block(b);
    std::vector<std::thread> threads;
    threads.reserve(static_cast<size_t>(n) * slots);
    for (int s = 0; s < slots; ++s) {
        for (unsigned t = 0; t < n; ++t) {
            threads.emplace_back([&, s, t] {
                BlockSlot& mine = state[s];
                slot = &mine;
                linear_tid = t;
                thread_idx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                const unsigned long plane = static_cast<unsigned long>(grid.x) * grid.y;
                for (unsigned long l = s; l < blocks; l += slots) {
                    block_idx = dim3{static_cast<unsigned>(l % grid.x),
                                     static_cast<unsigned>((l / grid.x) % grid.y),
                                     static_cast<unsigned>(l / plane)};
                    kernels[s](params);
                    // The thread has exited this block: it no longer counts at barriers.
                    mine.warps[t / 32].barrier.arrive_and_drop();
                    mine.block_barrier.arrive_and_drop();
                    mine.block_end.arrive_and_wait();
                    if (t == 0) reset_block(mine);
                    mine.block_end.arrive_and_wait();
                }
            });
        }
    }
    for (auto& th : threads) th.join();
    current = nullptr;
}

struct Entry {
    const char* name;
    void (*fn[max_slots])(const void*);
};

inline std::vector<Entry>& registry() {
    static std::vector<Entry> entries;
    return entries;
}

inline std::mutex& registry_mutex() {
    static std::mutex m;
    return m;
}

// Records slot `s`'s copy of kernel `name` (static initialisers of kernels_slot.cpp).
struct Register {
    Register(const char* name, int s, void (*fn)(const void*)) {
        std::lock_guard<std::mutex> lock(registry_mutex());
        for (Entry& e : registry()) {
            if (std::strcmp(e.name, name) == 0) {
                e.fn[s] = fn;
                return;
            }
        }
        Entry e{name, {}};
        e.fn[s] = fn;
        registry().push_back(e);
    }
};

template <class T>
inline T bits_as(const void* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}

}  // namespace ha_emu

// The CUDA vocabulary the kernels use.
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
#define threadIdx (ha_emu::thread_idx)
#define blockIdx (ha_emu::block_idx)
#define blockDim (ha_emu::current->block)
#define gridDim (ha_emu::current->grid)
#define HA_DYNAMIC_SHARED(type, name) \
    type* name = reinterpret_cast<type*>(ha_emu::slot->dynamic_shared.data())

inline void __syncthreads() { ha_emu::slot->block_barrier.arrive_and_wait(); }
// Orders this thread's writes before its later atomics, as between concurrent blocks.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    return ha_emu::exchange(v, (ha_emu::linear_tid % 32) ^ static_cast<unsigned>(lane_mask));
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src_lane) {
    return ha_emu::exchange(v, static_cast<unsigned>(src_lane) % 32);
}
inline int atomicAdd(int* p, int v) {
    return std::atomic_ref<int>(*p).fetch_add(v, std::memory_order_acq_rel);
}
inline unsigned __float_as_uint(float f) { return ha_emu::bits_as<unsigned>(&f); }
inline float __uint_as_float(unsigned u) { return ha_emu::bits_as<float>(&u); }
inline long long __double_as_longlong(double d) { return ha_emu::bits_as<long long>(&d); }

// Registers slot HA_EMU_SLOT's copy of a kernel under the name NVRTC would export; `call` is
// the device function the kernel runs on its parameter struct.
#define HA_EMU_REGISTER(var, name, Params, call)                            \
    static ha_emu::Register var(name, HA_EMU_SLOT, [](const void* params) { \
        call(*static_cast<const Params*>(params));                          \
    });
