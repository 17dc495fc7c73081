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
    int32_t* links;        // [4 k] scratch: sorted order, sort buffer, next occurrence, first flag
};

// Repeated rows in O(k log k): sorts j by (rows[j], j), then links every occurrence of a row to
// its next one (ascending j) and flags the first.
// Grid: (1); block: HA_BLOCK threads (the sort and scan of common.cuh).
HA_DEVICE void resolve_rows(const ScatterRowsParams& p) {
    __shared__ int64_t red[HA_BLOCK + 1];
    const Side keys{p.rows, CODE_I64, 1};
    int32_t* sorted = p.links;
    block_sort_by_key(keys, p.k, sorted, sorted + p.k);
    runs_of_sorted(keys, p.k, sorted, sorted + 2 * p.k, sorted + 3 * p.k, nullptr, red);
}
HA_KERNEL(scatter_resolve_rows, resolve_rows, ScatterRowsParams)

// dst[rows[j], c] = T(dst[rows[j], c] + vals[j, c]), repeated rows accumulated in order of j
// with a rounding after each addition (as the CPU backend). Out-of-range rows are skipped.
// Grid: (k, ceil(H / HA_BLOCK)); block (j, y) owns columns y*HA_BLOCK.. of row rows[j] and
// does the work only when j is the first occurrence of that row (scatter_resolve_rows), so no
// two blocks touch the same element; it follows the row's later occurrences through their
// links. Threads past H return early.
template <class T>
HA_DEVICE void scatter_add_rows(const ScatterRowsParams& p) {
    const int64_t j = blockIdx.x;
    const int64_t r = p.rows[j];
    if (r < 0 || r >= p.num_rows || p.links[3 * p.k + j] == 0) return;
    const int64_t c = static_cast<int64_t>(blockIdx.y) * HA_BLOCK + threadIdx.x;
    if (c >= p.hidden_size) return;
    T* dst = static_cast<T*>(p.dst) + (r / p.inner) * p.outer_stride +
             (r % p.inner) * p.inner_stride + c * p.feature_stride;
    float acc = to_float(*dst);
    const int32_t* next = p.links + 2 * p.k;
    for (int64_t e = j; e >= 0; e = next[e]) {
        acc = to_float(from_float<T>(acc + p.vals[e * p.hidden_size + c]));
    }
    *dst = from_float<T>(acc);
}
HA_KERNEL_FLOATS(scatter_add_rows, ScatterRowsParams)
