// Anchors from tokens: per row, the column `offset` away from the start of the last (or first)
// occurrence of any spelling of the answer marker lying wholly inside the response. Two kinds
// of marker: token-id spellings (`find_anchors`), and marker texts matched on the bytes the
// tokens spell (`find_text_anchors`: a match starts at the token holding the text's first byte).
#include "common.cuh"

// The rows both kernels scan: token ids and the response mask.
struct TokenRows {
    const void* tokens;          // [B, T] int32 or int64, any strides
    int64_t token_code;          // CODE_I32 or CODE_I64
    int64_t token_s0, token_s1;  // element strides
    const void* mask;            // [B, T] any dtype, any strides: nonzero = response token
    int64_t mask_code;
    int64_t mask_s0, mask_s1;

    HA_DEVICE int64_t token(int64_t r, int64_t c) const {
        return load_label(tokens, token_code, r * token_s0 + c * token_s1);
    }
    HA_DEVICE bool in_response(int64_t r, int64_t c) const {
        return load_as_double(mask, mask_code, r * mask_s0 + c * mask_s1) != 0.0;
    }
};

struct FindAnchorsParams {
    TokenRows in;
    const int64_t* marker_tokens;   // every spelling's ids one after another
    const int64_t* marker_offsets;  // [M + 1]: spelling m is tokens[offsets[m]..offsets[m + 1]]
    int64_t num_markers;            // M
    int64_t rows, cols;             // B, T
    int64_t last;                   // 1: last occurrence, 0: first
    int64_t offset;                 // anchor = start + offset
    int64_t* out;                   // [B] anchors, -1 = none
};

// Length of the longest spelling matching at column s of row r wholly inside the response
// (0: none). A spelling no longer than the best so far is skipped without reading.
HA_DEVICE int64_t match_at(const FindAnchorsParams& p, int64_t r, int64_t s) {
    int64_t best = 0;
    for (int64_t m = 0; m < p.num_markers; ++m) {
        const int64_t lo = p.marker_offsets[m];
        const int64_t len = p.marker_offsets[m + 1] - lo;
        if (len <= best || s + len > p.cols) continue;
        bool hit = true;
        for (int64_t j = 0; j < len && hit; ++j) {
            const int64_t c = s + j;
            hit = p.in.token(r, c) == p.marker_tokens[lo + j] && p.in.in_response(r, c);
        }
        if (hit) best = len;
    }
    return best;
}

struct FindTextAnchorsParams {
    TokenRows in;
    const uint8_t* vocab_bytes;     // every token's bytes one after another
    const int64_t* vocab_offsets;   // [V + 1]: token v spells vocab_bytes[offsets[v]..offsets[v + 1]]
    int64_t vocab_size;             // V
    const uint8_t* token_starts;    // [V]: nonzero where a marker can start inside the token
    const uint8_t* marker_bytes;    // every marker's bytes one after another
    const int64_t* marker_offsets;  // [M + 1]
    int64_t num_markers;            // M
    int64_t rows, cols;             // B, T
    int64_t last;                   // 1: last occurrence, 0: first
    int64_t offset;                 // anchor = start + offset
    int64_t* out;                   // [B] anchors, -1 = none
};

// The id at column c of row r when it is a response token inside the vocabulary (its bytes are
// then vocab_bytes[*lo..*hi]), else -1.
HA_DEVICE int64_t text_token(const FindTextAnchorsParams& p, int64_t r, int64_t c, int64_t* lo,
                             int64_t* hi) {
    if (!p.in.in_response(r, c)) return -1;
    const int64_t id = p.in.token(r, c);
    if (id < 0 || id >= p.vocab_size) return -1;
    *lo = p.vocab_offsets[id];
    *hi = p.vocab_offsets[id + 1];
    return id;
}

// 1 when a marker text starts inside the token at column s of row r (at any of its bytes) and
// continues through the following response tokens to its last byte; 0 otherwise. Tokens the
// per-token filter rules out are not read further.
HA_DEVICE int64_t match_at(const FindTextAnchorsParams& p, int64_t r, int64_t s) {
    int64_t lo = 0, hi = 0;
    const int64_t id = text_token(p, r, s, &lo, &hi);
    if (id < 0 || p.token_starts[id] == 0) return 0;
    for (int64_t m = 0; m < p.num_markers; ++m) {
        const int64_t m_lo = p.marker_offsets[m], m_hi = p.marker_offsets[m + 1];
        for (int64_t j = lo; j < hi; ++j) {
            // Walk the marker's bytes from byte j of token s onwards.
            int64_t k = m_lo, q = j, end = hi, c = s;
            bool ok = true;
            while (ok) {
                while (q < end && k < m_hi && p.vocab_bytes[q] == p.marker_bytes[k]) ++q, ++k;
                if (k == m_hi) return 1;
                if (q < end) break;  // a byte differs
                ++c;
                ok = c < p.cols && text_token(p, r, c, &q, &end) >= 0;
            }
        }
    }
    return 0;
}

// Maximum over the block, returned to every thread. `red` is a shared array of HA_WARPS slots.
HA_DEVICE int64_t block_max_i64(int64_t v, int64_t* red) {
    for (int o = 16; o > 0; o >>= 1) {
        const int64_t other = __shfl_xor_sync(0xffffffffu, v, o);
        v = other > v ? other : v;
    }
    __syncthreads();  // earlier readers of `red` are done
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    int64_t m = red[0];
    for (int w = 1; w < HA_WARPS; ++w) m = red[w] > m ? red[w] : m;
    return m;
}

// out[r] = s + offset for the winning start s of row r (greatest s for `last`, least for
// `first`; at equal s the longest spelling), or -1 when nothing matches or s + offset is
// outside 0..T.
// Grid: (B); block: HA_BLOCK threads. Block r scans row r in tiles of HA_BLOCK start columns in
// scan order (from the end for `last`, from the start for `first`); thread x checks the x-th
// start of the tile. A block max over the key k (T + 1) + len, k the start's rank in scan
// order counted from the far end, picks the tile's winner; the scan stops at the first tile
// with a match, so a marker near the scanned end costs one tile.
//
// `Params` is either parameter struct; `match_at(p, r, s)` (overloaded on it) is the length of
// the longest match starting at column s (0: none).
template <class Params>
HA_DEVICE void find_row(const Params& p) {
    __shared__ int64_t red[HA_WARPS];
    const int64_t r = blockIdx.x;
    const int64_t cols = p.cols;
    const int64_t width = cols + 1;
    int64_t best = -1;
    for (int64_t base = 0; base < cols; base += HA_BLOCK) {
        const int64_t k = base + threadIdx.x;
        int64_t key = -1;
        if (k < cols) {
            const int64_t s = p.last ? cols - 1 - k : k;
            const int64_t len = match_at(p, r, s);
            // Greater keys win: for `last` a greater start, for `first` a smaller one.
            if (len > 0) key = (p.last ? s : cols - 1 - s) * width + len;
        }
        best = block_max_i64(key, red);
        if (best >= 0) break;
    }
    if (threadIdx.x == 0) {
        int64_t anchor = -1;
        if (best >= 0) {
            const int64_t q = best / width;
            const int64_t s = p.last ? q : cols - 1 - q;
            // s + offset in 0..T, tested without forming a sum that could overflow.
            if (p.offset >= -s && p.offset < cols - s) anchor = s + p.offset;
        }
        p.out[r] = anchor;
    }
}
HA_DEVICE void find_anchors_row(const FindAnchorsParams& p) { find_row(p); }
HA_DEVICE void find_text_anchors_row(const FindTextAnchorsParams& p) { find_row(p); }
HA_KERNEL(find_anchors, find_anchors_row, FindAnchorsParams)
HA_KERNEL(find_text_anchors, find_text_anchors_row, FindTextAnchorsParams)
