// Token log-probs and entropies over a chunk of logits [n, V] (the LM head's output for n
// tokens), and the chunk's logit gradient in place. With x = z / temperature,
// lse = log sum e^x, p = e^{x - lse}: log-prob x_t - lse, entropy H = lse - sum p x, and the
// gradient of g_lp * logprob + g_ent * H w.r.t. z_k is
// (g_lp ([k = t] - p_k) - g_ent p_k (x_k - lse + H)) / temperature.
//
// Grid: (n) blocks, one row each (the x dimension allows 2^31 - 1 rows; no row limit of
// 65535); block: HA_BLOCK threads striding over the row's columns.
#include "common.cuh"

struct LogprobParams {
    void* logits;            // [n, V] storage type T, columns contiguous; overwritten by backward
    int64_t row_stride;      // elements between rows
    int64_t rows, cols;      // n, V
    const int64_t* targets;  // [n]
    int64_t target_stride;
    int64_t ignore_index;    // targets equal to it: log-prob 0, entropy 0, no gradient
    float inv_temperature;
    float* logprob;          // forward: [n] out
    float* entropy;          // forward: [n] out (null: skipped); backward: [n] in
    float* stats;            // [n, 2]: per row its max and log sum e^{x - max} (forward out,
                             // backward in; kept apart: x - (max + log-sum) loses digits)
    const float* grad_logprob;  // backward: [n] (null: zero)
    int64_t grad_logprob_stride;
    const float* grad_entropy;  // backward: [n] (null: zero)
    int64_t grad_entropy_stride;
};

// Running (max, sum e^{x - max}, sum e^{x - max} (x - max)) of one thread, and its merge.
struct Running {
    float m, s, t;
};

HA_DEVICE void running_add(Running& a, float x) {
    if (is_nan(x) || is_nan(a.m)) {
        a.m = f32_nan();
        return;
    }
    if (x > a.m) {
        if (a.m > -f32_inf()) {
            const float scale = expf(a.m - x);
            a.t = scale * (a.t + (a.m - x) * a.s);
            a.s *= scale;
        }
        a.m = x;
    }
    if (a.m == -f32_inf()) return;  // -inf columns add nothing
    const float d = x - a.m;
    const float e = expf(d);
    a.s += e;
    a.t += e > 0.0f ? e * d : 0.0f;
}

// The running sums of a thread rescaled to the block max `m` (every thread gets the same m).
HA_DEVICE Running running_at(const Running& a, float m) {
    if (!(a.m > -f32_inf()) || is_nan(m)) return Running{m, 0.0f, 0.0f};
    const float scale = expf(a.m - m);
    return Running{m, scale * a.s, scale * (a.t + (a.m - m) * a.s)};
}

// Maximum over the block (NaN wins), returned to every thread.
HA_DEVICE float block_max_nan(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, v, o);
        v = (is_nan(other) || other > v) ? other : v;
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float m = red[0];
    for (int w = 1; w < HA_WARPS; ++w) m = (is_nan(red[w]) || red[w] > m) ? red[w] : m;
    return m;
}

template <class T>
HA_DEVICE void logprob_forward(const LogprobParams& p) {
    __shared__ float red[HA_WARPS];
    const int64_t r = blockIdx.x;
    const int64_t target = p.targets[r * p.target_stride];
    const T* row = static_cast<const T*>(p.logits) + r * p.row_stride;
    if (target == p.ignore_index) {
        if (threadIdx.x == 0) {
            p.logprob[r] = 0.0f;
            p.stats[2 * r] = 0.0f;
            p.stats[2 * r + 1] = 0.0f;
            if (p.entropy != nullptr) p.entropy[r] = 0.0f;
        }
        return;
    }
    Running a{-f32_inf(), 0.0f, 0.0f};
    for (int64_t c = threadIdx.x; c < p.cols; c += HA_BLOCK) {
        running_add(a, to_float(row[c]) * p.inv_temperature);
    }
    const float m = block_max_nan(a.m, red);
    const Running b = running_at(a, m);
    const float s = block_sum(b.s, red);
    const float t = block_sum(b.t, red);
    if (threadIdx.x != 0) return;
    const bool valid = target >= 0 && target < p.cols;
    const float log_s = logf(s);
    const float xt = valid ? to_float(row[target]) * p.inv_temperature : f32_nan();
    // An out-of-range target makes the row's results NaN (and its gradient, through stats).
    p.logprob[r] = (xt - m) - log_s;
    p.stats[2 * r] = m;
    p.stats[2 * r + 1] = valid ? log_s : f32_nan();
    if (p.entropy != nullptr) p.entropy[r] = valid ? log_s - t / s : f32_nan();
}
HA_KERNEL_FLOATS(logprob_forward, LogprobParams)

template <class T>
HA_DEVICE void logprob_backward(const LogprobParams& p) {
    const int64_t r = blockIdx.x;
    const int64_t target = p.targets[r * p.target_stride];
    T* row = static_cast<T*>(p.logits) + r * p.row_stride;
    if (target == p.ignore_index) {
        for (int64_t c = threadIdx.x; c < p.cols; c += HA_BLOCK) row[c] = from_float<T>(0.0f);
        return;
    }
    const float g_lp = p.grad_logprob != nullptr ? p.grad_logprob[r * p.grad_logprob_stride] : 0.0f;
    const float g_ent = p.grad_entropy != nullptr ? p.grad_entropy[r * p.grad_entropy_stride] : 0.0f;
    const float a = g_lp * p.inv_temperature;
    const float b = g_ent * p.inv_temperature;
    const float m = p.stats[2 * r];
    const float log_s = p.stats[2 * r + 1];
    // log p + H = (x - max) - log_s + H.
    const float shift = (p.entropy != nullptr ? p.entropy[r] : 0.0f) - log_s;
    for (int64_t c = threadIdx.x; c < p.cols; c += HA_BLOCK) {
        const float d = to_float(row[c]) * p.inv_temperature - m;
        const float q = expf(d - log_s);
        // q = 0 where x = -inf, whose (d + shift) would make the product NaN.
        const float ent = q > 0.0f ? b * q * (d + shift) : 0.0f;
        const float hit = c == target ? a : 0.0f;
        row[c] = from_float<T>((hit - a * q) - ent);
    }
}
HA_KERNEL_FLOATS(logprob_backward, LogprobParams)
