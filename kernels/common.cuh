// Shared vocabulary of the kernels: fixed-width types, element loads and stores for float32,
// bfloat16 and float16 (own conversions: NVRTC compiles these sources with no include path),
// loads of integer/bool/float side inputs by dtype code, and deterministic reductions.
//
// The same sources compile as C++ against emulation/cuda_emulation.hpp (HA_EMULATION), which
// runs them on the CPU for the test suite.
#pragma once

#ifndef HA_EMULATION
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#define HA_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

#define HA_DEVICE __device__ __forceinline__

// Threads per block of every kernel; launches (src/cuda/) use the same constant.
#define HA_BLOCK 256
#define HA_WARPS (HA_BLOCK / 32)

// Storage types. bfloat16 and float16 travel as their 16-bit patterns.
struct bf16 {
    uint16_t bits;
};
struct f16 {
    uint16_t bits;
};

HA_DEVICE float to_float(float x) { return x; }
HA_DEVICE float to_float(bf16 x) { return __uint_as_float(static_cast<uint32_t>(x.bits) << 16); }
HA_DEVICE float to_float(f16 x) {
#ifdef HA_EMULATION
    _Float16 h;
    __builtin_memcpy(&h, &x.bits, 2);
    return static_cast<float>(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
#endif
}

template <class T>
HA_DEVICE T from_float(float x);
template <>
HA_DEVICE float from_float<float>(float x) {
    return x;
}
// Round to nearest even; NaN stays a (quiet) NaN.
template <>
HA_DEVICE bf16 from_float<bf16>(float x) {
    const uint32_t u = __float_as_uint(x);
    bf16 out;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        out.bits = static_cast<uint16_t>((u >> 16) | 0x40u);
    } else {
        out.bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return out;
}
template <>
HA_DEVICE f16 from_float<f16>(float x) {
    f16 out;
#ifdef HA_EMULATION
    const _Float16 h = static_cast<_Float16>(x);
    __builtin_memcpy(&out.bits, &h, 2);
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(out.bits) : "f"(x));
#endif
    return out;
}

HA_DEVICE float f32_inf() { return __uint_as_float(0x7f800000u); }
HA_DEVICE float f32_nan() { return __uint_as_float(0x7fc00000u); }
HA_DEVICE bool is_nan(float x) { return x != x; }
HA_DEVICE bool is_nan(double x) { return x != x; }

// dtype codes of side inputs (masks, rewards, labels, lengths): src/cuda/mod.rs `code_of`.
enum Code : int64_t {
    CODE_BOOL = 0,  // bool: true is any nonzero byte
    CODE_I32 = 1,
    CODE_I64 = 2,
    CODE_F32 = 3,
    CODE_BF16 = 4,
    CODE_F16 = 5,
    CODE_F64 = 6,
    CODE_I8 = 7,
    CODE_I16 = 8,
    CODE_U8 = 9,  // a number like any other (rewards > threshold), unlike bool
};

// Element `i` (in elements, strides applied by the caller) of a side input as double.
HA_DEVICE double load_as_double(const void* p, int64_t code, int64_t i) {
    switch (code) {
        case CODE_BOOL:
        case CODE_U8: return static_cast<const uint8_t*>(p)[i];
        case CODE_I8: return static_cast<const int8_t*>(p)[i];
        case CODE_I16: return static_cast<const short*>(p)[i];
        case CODE_I32: return static_cast<const int32_t*>(p)[i];
        case CODE_I64: return static_cast<double>(static_cast<const int64_t*>(p)[i]);
        case CODE_F32: return static_cast<const float*>(p)[i];
        case CODE_BF16: return to_float(static_cast<const bf16*>(p)[i]);
        case CODE_F16: return to_float(static_cast<const f16*>(p)[i]);
        default: return static_cast<const double*>(p)[i];
    }
}

// A side input of any dtype: pointer (null: absent), dtype code and element stride.
struct Side {
    const void* p;
    int64_t code;
    int64_t stride;
};

// Integer labels (int32 or int64) as int64.
HA_DEVICE int64_t load_label(const void* p, int64_t code, int64_t i) {
    return code == CODE_I32 ? static_cast<const int32_t*>(p)[i] : static_cast<const int64_t*>(p)[i];
}

// Sum over the 32 lanes of a warp (all lanes must be live). The xor butterfly leaves the same
// bits in every lane: each step adds the same two numbers on both partner lanes.
template <class A>
HA_DEVICE A warp_sum(A v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
HA_DEVICE float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, v, o);
        v = other > v ? other : v;
    }
    return v;
}

// Sum over the block, returned to every thread. `red` is a shared array of HA_WARPS slots.
// Fixed order (butterfly within warps, then warps 0..n in sequence): same inputs, same bits.
template <class A>
HA_DEVICE A block_sum(A v, A* red) {
    v = warp_sum(v);
    __syncthreads();  // earlier readers of `red` are done
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    A s = red[0];
    for (int w = 1; w < HA_WARPS; ++w) s += red[w];
    return s;
}

// Strided 2-D view of a float tensor of element type T.
template <class T>
struct View2 {
    const T* p;
    int64_t s0, s1;
    HA_DEVICE float at(int64_t r, int64_t c) const { return to_float(p[r * s0 + c * s1]); }
};

// Kernels carry no __launch_bounds__: with one, ptxas caps registers for occupancy and spills.
// HA_KERNEL(name, fn, Params): the extern "C" kernel `name` (kernels are found by name: NVRTC
// exports them unmangled) running the device function `fn` on its parameter struct.
// HA_KERNEL_FLOATS(name, Params): one per storage type, `<name>_f32`, `<name>_bf16`,
// `<name>_f16`, each running the device template `name<T>`. These names are what src/cuda/
// launches. The emulation build registers the device functions under the same names instead.
#ifdef HA_EMULATION
#define HA_KERNEL(name, fn, Params) HA_EMU_REGISTER(ha_register_##name, #name, Params, fn)
#define HA_KERNEL_FOR(name, Params, T, suffix) \
    HA_EMU_REGISTER(ha_register_##name##_##suffix, #name "_" #suffix, Params, name<T>)
#else
#define HA_KERNEL(name, fn, Params) \
    extern "C" __global__ void name(Params p) { fn(p); }
#define HA_KERNEL_FOR(name, Params, T, suffix) \
    extern "C" __global__ void name##_##suffix(Params p) { name<T>(p); }
#endif
#define HA_KERNEL_FLOATS(name, Params)      \
    HA_KERNEL_FOR(name, Params, float, f32) \
    HA_KERNEL_FOR(name, Params, bf16, bf16) \
    HA_KERNEL_FOR(name, Params, f16, f16)

// ---------------------------------------------------------------------------------------------
// Grouping rollouts by an integer key without O(n^2) work: one block sorts the indices
// 0..n-1 by (key, index), after which every group is a run of ascending indices.

// Key of element i: an int32/int64 side input (labels, rows).
HA_DEVICE int64_t key_at(const Side& keys, int64_t i) {
    return load_label(keys.p, keys.code, i * keys.stride);
}

// Strict total order of (key, index): equal keys keep index order, so the sort is stable.
HA_DEVICE bool key_before(const Side& keys, int32_t a, int32_t b) {
    const int64_t ka = key_at(keys, a), kb = key_at(keys, b);
    return ka < kb || (ka == kb && a < b);
}

// Sorts 0..n-1 by (key, index) into `out`, using `tmp` (both int32 [n], global) as the other
// buffer; run by every thread of one block. Bottom-up merge sort: in each of ceil(log2 n)
// passes the block's threads split the output evenly and each finds where its share starts in
// the two runs it merges by a binary search along the merge path (Green et al., "Merge Path",
// 2012), then merges it sequentially. Work O(n log n); steps per thread
// O((n / HA_BLOCK + log n) log n). The starting buffer is chosen so the last pass writes `out`.
HA_DEVICE void block_sort_by_key(const Side& keys, int64_t n, int32_t* out, int32_t* tmp) {
    int passes = 0;
    for (int64_t w = 1; w < n; w <<= 1) ++passes;
    int32_t* src = (passes % 2 == 0) ? out : tmp;
    int32_t* dst = (passes % 2 == 0) ? tmp : out;
    for (int64_t i = threadIdx.x; i < n; i += HA_BLOCK) src[i] = static_cast<int32_t>(i);
    __syncthreads();
    const int64_t share = (n + HA_BLOCK - 1) / HA_BLOCK;
    for (int64_t w = 1; w < n; w <<= 1) {
        const int64_t end = (threadIdx.x + 1) * share < n ? (threadIdx.x + 1) * share : n;
        int64_t o = threadIdx.x * share;
        while (o < end) {
            // The pair of runs [s, s + la) and [s + la, s + la + lb) holding output o.
            const int64_t s = o / (2 * w) * (2 * w);
            const int64_t la = s + w < n ? w : n - s;
            const int64_t lb = s + 2 * w < n ? w : (n - s - la > 0 ? n - s - la : 0);
            const int32_t* a = src + s;
            const int32_t* b = a + la;
            const int64_t d = o - s;
            int64_t lo = d > lb ? d - lb : 0, hi = d < la ? d : la;
            while (lo < hi) {
                const int64_t mid = (lo + hi) / 2;
                if (key_before(keys, a[mid], b[d - mid - 1])) {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            int64_t i = lo, j = d - lo;
            const int64_t stop = end < s + la + lb ? end : s + la + lb;
            for (; o < stop; ++o) {
                const bool take_a = j >= lb || (i < la && key_before(keys, a[i], b[j]));
                dst[o] = take_a ? a[i++] : b[j++];
            }
        }
        __syncthreads();
        int32_t* t = src;
        src = dst;
        dst = t;
    }
}

// After block_sort_by_key: for each element its next element of equal key (-1 at the end of a
// run), whether it starts its run, and its run's rank in key order (0, 1, ...); returns the
// number of runs to every thread. `red` is a shared array of HA_BLOCK int64 slots. O(n).
HA_DEVICE int64_t runs_of_sorted(const Side& keys, int64_t n, const int32_t* sorted,
                                 int32_t* next, int32_t* starts, int64_t* rank, int64_t* red) {
    const int64_t share = (n + HA_BLOCK - 1) / HA_BLOCK;
    const int64_t lo = threadIdx.x * share;
    const int64_t hi = lo + share < n ? lo + share : n;
    int64_t mine = 0;
    for (int64_t k = lo; k < hi; ++k) {
        mine += k == 0 || key_at(keys, sorted[k - 1]) != key_at(keys, sorted[k]);
    }
    __syncthreads();
    red[threadIdx.x] = mine;
    __syncthreads();
    if (threadIdx.x == 0) {
        int64_t total = 0;
        for (int t = 0; t < HA_BLOCK; ++t) {
            const int64_t c = red[t];
            red[t] = total;
            total += c;
        }
        red[HA_BLOCK] = total;
    }
    __syncthreads();
    int64_t run = red[threadIdx.x] - 1;
    for (int64_t k = lo; k < hi; ++k) {
        const int32_t e = sorted[k];
        const int64_t key = key_at(keys, e);
        const bool first = k == 0 || key_at(keys, sorted[k - 1]) != key;
        run += first;
        const bool more = k + 1 < n && key_at(keys, sorted[k + 1]) == key;
        if (next != nullptr) next[e] = more ? sorted[k + 1] : -1;
        if (starts != nullptr) starts[e] = first ? 1 : 0;
        if (rank != nullptr) rank[e] = run;
    }
    const int64_t runs = red[HA_BLOCK];
    __syncthreads();
    return runs;
}
