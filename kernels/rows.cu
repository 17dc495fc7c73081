// Scatter-add of gradient rows into a tensor shaped like `hidden`: how the alignment gradient
// reaches the dense gradient of `hidden` without a pass over all of it.
#include "common.cuh"

struct ScatterRowsParams {
    void* dst;             // [B, T, H] or [N, H], storage type T, any strides
    const int64_t* rows;   // [k] flat rows (b * T + t, or n), -1 = skip
    const float* vals;     // [k, H] contiguous float32
    int64_t k;             // number of rows
    int64_t num_rows;      // B T or N: rows outside 0..num_rows are skipped
    int64_t hidden_size;   // H
    int64_t inner;         // rows per outer index (T; N for packed)
    int64_t outer_stride;  // element strides of dst
    int64_t inner_stride;
    int64_t feature_stride;
};

// dst[rows[j], c] = T(dst[rows[j], c] + vals[j, c]), repeated rows accumulated in order of j
// with a rounding after each addition (as the CPU backend). Out-of-range rows are skipped.
// Grid: (k, ceil(H / HA_BLOCK)); block (j, y) owns columns y*HA_BLOCK.. of row rows[j] and
// does the work only when j is the first occurrence of that row, so no two blocks touch the
// same element. Threads past H return early.
template <class T>
HA_DEVICE void scatter_add_rows(const ScatterRowsParams& p) {
    const int64_t j = blockIdx.x;
    const int64_t r = p.rows[j];
    if (r < 0 || r >= p.num_rows) return;
    for (int64_t e = 0; e < j; ++e) {
        if (p.rows[e] == r) return;
    }
    const int64_t c = static_cast<int64_t>(blockIdx.y) * HA_BLOCK + threadIdx.x;
    if (c >= p.hidden_size) return;
    T* dst = static_cast<T*>(p.dst) + (r / p.inner) * p.outer_stride +
             (r % p.inner) * p.inner_stride + c * p.feature_stride;
    float acc = to_float(*dst);
    for (int64_t e = j; e < p.k; ++e) {
        if (p.rows[e] == r) acc = to_float(from_float<T>(acc + p.vals[e * p.hidden_size + c]));
    }
    *dst = from_float<T>(acc);
}
HA_KERNEL_FLOATS(scatter_add_rows, ScatterRowsParams)
