// Executes the kernels of kernels/*.cu on the CPU, for testing without a GPU.
//
// Each CUDA thread of a block is a std::thread; blocks run one after another, so `__shared__`
// variables can be plain statics. `__syncthreads` is a barrier over the block's live threads,
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
    Barrier block_barrier;
    std::vector<Warp> warps;
    std::vector<unsigned char> dynamic_shared;
};

inline Launch* current = nullptr;
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
    Warp& w = current->warps[linear_tid / 32];
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

// Runs `kernel(params)` over the whole grid; returns after the last block.
inline void run(void (*kernel)(const void*), const void* params, dim3 grid, dim3 block,
                size_t dynamic_shared_bytes) {
    static std::mutex one_launch_at_a_time;
    std::lock_guard<std::mutex> lock(one_launch_at_a_time);
    Launch launch;
    launch.grid = grid;
    launch.block = block;
    const unsigned n = block.x * block.y * block.z;
    const unsigned warps = (n + 31) / 32;
    launch.warps = std::vector<Warp>(warps);
    // Uninitialised shared memory on a GPU holds garbage; a NaN pattern makes reads of it show.
    launch.dynamic_shared.assign(dynamic_shared_bytes, 0xFF);
    current = &launch;
    Barrier block_end;
    block_end.reset(static_cast<int>(n));
    auto reset_block = [&] {
        launch.block_barrier.reset(static_cast<int>(n));
        for (unsigned w = 0; w < warps; ++w) launch.warps[w].barrier.reset(threads_in_warp(w));
    };
    reset_block();
    std::vector<std::thread> threads;
    threads.reserve(n);
    for (unsigned t = 0; t < n; ++t) {
        threads.emplace_back([&, t] {
            linear_tid = t;
            thread_idx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            for (unsigned z = 0; z < grid.z; ++z) {
                for (unsigned y = 0; y < grid.y; ++y) {
                    for (unsigned x = 0; x < grid.x; ++x) {
                        block_idx = dim3{x, y, z};
                        kernel(params);
                        // The thread has exited this block: it no longer counts at barriers.
                        launch.warps[t / 32].barrier.arrive_and_drop();
                        launch.block_barrier.arrive_and_drop();
                        block_end.arrive_and_wait();
                        if (t == 0) reset_block();
                        block_end.arrive_and_wait();
                    }
                }
            }
        });
    }
    for (auto& th : threads) th.join();
    current = nullptr;
}

template <class P, void (*K)(P)>
void trampoline(const void* params) {
    K(*static_cast<const P*>(params));
}

struct Entry {
    const char* name;
    void (*fn)(const void*);
};

inline std::vector<Entry>& registry() {
    static std::vector<Entry> entries;
    return entries;
}

struct Register {
    Register(const char* name, void (*fn)(const void*)) { registry().push_back({name, fn}); }
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
    type* name = reinterpret_cast<type*>(ha_emu::current->dynamic_shared.data())

inline void __syncthreads() { ha_emu::current->block_barrier.arrive_and_wait(); }
// Blocks run one after another, each ending at a barrier: every write of an earlier block is
// already visible, so the fence has nothing to order (and TSan does not model fences).
inline void __threadfence() {}
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

// Registers `name` so the Rust launcher finds it by the name NVRTC would export.
#define HA_EXPORT_KERNEL(name, Params)                                                 \
    static ha_emu::Register ha_register_##name(#name,                                  \
                                               &ha_emu::trampoline<Params, name>);
