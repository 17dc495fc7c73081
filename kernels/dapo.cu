// DAPO token-level math: group advantages, dynamic-sampling filter, overlong shaping and the
// clipped policy loss (forward, reduction, backward). The CPU kernels in src/cpu/dapo.rs are
// the specification; per-token math is float32 in the same operation order.
#include "common.cuh"

// Rollout grouping: labels (int32/int64) or contiguous blocks of `size` rollouts. With labels
// `order` holds the rollouts sorted by (label, index) (dapo_resolve_groups), so in both cases
// a group is a run of positions k of the group order whose members ascend.
struct Grouping {
    Side labels;           // p == null: contiguous blocks
    int64_t size;          // rollouts per block when labels.p is null
    const int32_t* order;  // [B] with labels: the sorted order
};

// The rollout at position k of the group order.
HA_DEVICE int64_t member_at(const Grouping& g, int64_t k) {
    return g.labels.p == nullptr ? k : g.order[k];
}

// Whether position k starts a group; if so, *end is one past its last position.
HA_DEVICE bool group_starting_at(const Grouping& g, int64_t k, int64_t batch, int64_t* end) {
    if (g.labels.p == nullptr) {
        *end = k + g.size < batch ? k + g.size : batch;
        return k % g.size == 0;
    }
    const int64_t key = key_at(g.labels, g.order[k]);
    if (k > 0 && key_at(g.labels, g.order[k - 1]) == key) return false;
    int64_t e = k + 1;
    while (e < batch && key_at(g.labels, g.order[e]) == key) ++e;
    *end = e;
    return true;
}

struct ResolveParams {
    Side labels;     // [B]
    int64_t batch;
    int32_t* order;  // [2 B] out: the sorted order in [0, B), sort scratch in [B, 2 B)
};

// Sorts the rollouts by (label, index): O(B log B) (block_sort_by_key of common.cuh).
// Grid: (1); block: HA_BLOCK threads.
HA_DEVICE void resolve_dapo_groups(const ResolveParams& p) {
    block_sort_by_key(p.labels, p.batch, p.order, p.order + p.batch);
}
HA_KERNEL(dapo_resolve_groups, resolve_dapo_groups, ResolveParams)

struct RowSumParams {
    Side scores;       // [B] or [B, T] (stride of the row index; `col_stride` along T)
    int64_t col_stride;
    int64_t cols;      // T, or 1 for [B]
    double* totals;    // [B] out
};

// totals[b] = sum_t scores[b, t] in double.
// Grid: (B); block: HA_BLOCK threads over t (strided), one block_sum.
HA_DEVICE void row_sums(const RowSumParams& p) {
    __shared__ double red[HA_WARPS];
    const int64_t b = blockIdx.x;
    double s = 0.0;
    for (int64_t t = threadIdx.x; t < p.cols; t += HA_BLOCK) {
        s += load_as_double(p.scores.p, p.scores.code, b * p.scores.stride + t * p.col_stride);
    }
    s = block_sum(s, red);
    if (threadIdx.x == 0) p.totals[b] = s;
}
HA_KERNEL(dapo_row_sums, row_sums, RowSumParams)

struct AdvantageParams {
    const double* totals;  // [B] per-rollout scores
    Grouping groups;
    int64_t batch;
    double eps;
    int64_t norm_by_std;
    float* out;  // [B]
};

// A_b = (x_b - mean_g) / (std_g + eps) (or x_b - mean_g), mean and unbiased std of b's group in
// double over members in ascending order, rounded to float as verl's float32 math; a singleton
// group has mean 0 and std 1.
// Grid: ceil(B / HA_BLOCK); the thread at the first position of a group does the group's work
// (O(B) in all); the others and threads past B return.
HA_DEVICE void group_advantages(const AdvantageParams& p) {
    const int64_t k = static_cast<int64_t>(blockIdx.x) * HA_BLOCK + threadIdx.x;
    int64_t end;
    if (k >= p.batch || !group_starting_at(p.groups, k, p.batch, &end)) return;
    double sum = 0.0;
    for (int64_t i = k; i < end; ++i) sum += p.totals[member_at(p.groups, i)];
    const int64_t n = end - k;
    float mean = 0.0f, std = 1.0f;
    if (n > 1) {
        const double m = sum / static_cast<double>(n);
        double var = 0.0;
        for (int64_t i = k; i < end; ++i) {
            const double d = p.totals[member_at(p.groups, i)] - m;
            var += d * d;
        }
        mean = static_cast<float>(m);
        std = static_cast<float>(sqrt(var / static_cast<double>(n - 1)));
    }
    for (int64_t i = k; i < end; ++i) {
        const int64_t b = member_at(p.groups, i);
        const float centred = static_cast<float>(p.totals[b]) - mean;
        p.out[b] = p.norm_by_std ? centred / (std + static_cast<float>(p.eps)) : centred;
    }
}
HA_KERNEL(dapo_group_advantages, group_advantages, AdvantageParams)

struct SamplingParams {
    Side metric;  // [B]
    Grouping groups;
    int64_t batch;
    uint8_t* out;  // [B] bool
};

HA_DEVICE double metric_of(const SamplingParams& p, int64_t b) {
    return load_as_double(p.metric.p, p.metric.code, b * p.metric.stride);
}

// keep_b = |g| == 1 or (every metric of g finite and some differs from the first member's): a NaN
// or inf member makes verl's std NaN, which its `std > 0` filter drops.
// Grid: ceil(B / HA_BLOCK); the thread at the first position of a group decides for all its
// members; the others and threads past B return.
HA_DEVICE void dynamic_sampling(const SamplingParams& p) {
    const int64_t k = static_cast<int64_t>(blockIdx.x) * HA_BLOCK + threadIdx.x;
    int64_t end;
    if (k >= p.batch || !group_starting_at(p.groups, k, p.batch, &end)) return;
    bool finite = true, differs = false;
    const double first = metric_of(p, member_at(p.groups, k));
    for (int64_t i = k; i < end; ++i) {
        const double v = metric_of(p, member_at(p.groups, i));
        // v - v is 0 for finite v and NaN for NaN or +-inf.
        finite = finite && (v - v) == 0.0;
        differs = differs || v != first;
    }
    const uint8_t keep = (end - k == 1 || (finite && differs)) ? 1 : 0;
    for (int64_t i = k; i < end; ++i) p.out[member_at(p.groups, i)] = keep;
}
HA_KERNEL(dapo_dynamic_sampling, dynamic_sampling, SamplingParams)

struct OverlongParams {
    Side lengths;  // [B]
    int64_t batch;
    double expected;  // max_response_length - buffer_length
    double buffer_length;
    double penalty_factor;
    float* out;  // [B]
};

// out_b = min(-(L_b - expected) / buffer * factor, 0), in double, rounded once.
// Grid: ceil(B / HA_BLOCK); one thread per rollout. Threads past B return.
HA_DEVICE void overlong_penalty(const OverlongParams& p) {
    const int64_t b = static_cast<int64_t>(blockIdx.x) * HA_BLOCK + threadIdx.x;
    if (b >= p.batch) return;
    const double l = load_as_double(p.lengths.p, p.lengths.code, b * p.lengths.stride);
    const double v = -(l - p.expected) / p.buffer_length * p.penalty_factor;
    // A NaN length stays NaN, as verl's min(v, 0) and the CPU backend leave it.
    p.out[b] = static_cast<float>((v < 0.0 || is_nan(v)) ? v : 0.0);
}
HA_KERNEL(dapo_overlong_penalty, overlong_penalty, OverlongParams)

// ---------------------------------------------------------------------------------------------
// Clipped policy loss.

// Number of per-block sums the forward writes: loss, mask, clipped, kl, clipped_lower.
#define POLICY_SUMS 5

struct PolicyParams {
    const void* log_prob;  // [B, T], storage type T
    int64_t lp_s0, lp_s1;
    const void* old_log_prob;
    int64_t old_s0, old_s1;
    const void* advantages;  // [B, T] or [B] (adv_s1 = 0)
    int64_t adv_s0, adv_s1;
    Side mask;  // response_mask, any dtype; stride of the row index
    int64_t mask_s1;
    const void* weights;  // optional [B, T] importance weights (null: none)
    int64_t w_s0, w_s1;
    int64_t batch, cols;
    int64_t chunk;       // columns per block
    double clip_lo;      // 1 - clip_ratio_low
    double clip_hi;      // 1 + clip_ratio_high
    double clip_c;       // dual-clip bound
    double clamp;        // log-ratio clamp (inf: none)
    void* factor;        // forward: optional [B, T] contiguous out; backward: the gradient
    double* partials;    // [B, chunks, POLICY_SUMS] forward out
    // backward only
    const float* row_scale;  // [B]
    Side upstream;           // 0-d gradient of the loss
    int64_t saved;           // 1: `factor` holds the saved derivative, scaled in place
};

struct Token {
    float loss, d, clipped, clipped_lower, grad;
};

HA_DEVICE float nan_max(float a, float b) { return is_nan(a) || is_nan(b) ? f32_nan() : fmaxf(a, b); }
HA_DEVICE float nan_min(float a, float b) { return is_nan(a) || is_nan(b) ? f32_nan() : fminf(a, b); }

// verl's compute_policy_loss_vanilla for one token, with the derivative autograd gives (ties
// of max/min split the gradient in half; clamps pass it on their closed interval).
HA_DEVICE Token token(float lp, float old, float adv, const PolicyParams& p) {
    const float lo = static_cast<float>(p.clip_lo), hi = static_cast<float>(p.clip_hi);
    const float c = static_cast<float>(p.clip_c), clamp = static_cast<float>(p.clamp);
    const float raw = lp - old;
    const float d = is_nan(raw) ? raw : fminf(fmaxf(raw, -clamp), clamp);
    const float d_grad = (raw >= -clamp && raw <= clamp) ? 1.0f : 0.0f;
    const float ratio = expf(d);
    const float l1 = -adv * ratio;
    const float l2 = -adv * fminf(fmaxf(ratio, lo), hi);
    const float dl1 = l1;
    const float dl2 = (ratio >= lo && ratio <= hi) ? dl1 : 0.0f;
    const float c1 = nan_max(l1, l2);
    const float dc1 = l1 > l2 ? dl1 : (l1 < l2 ? dl2 : 0.5f * (dl1 + dl2));
    const float l3 = -adv * c;
    const bool negative = adv < 0.0f;
    const float c2 = nan_min(l3, c1);
    const float share = c1 < l3 ? 1.0f : (c1 == l3 ? 0.5f : 0.0f);
    Token t;
    t.loss = negative ? c2 : c1;
    t.d = d;
    t.clipped = l2 > l1 ? 1.0f : 0.0f;
    t.clipped_lower = (c1 > l3 && negative) ? 1.0f : 0.0f;
    t.grad = (negative ? share : 1.0f) * dc1 * d_grad;
    return t;
}

// Inputs of token (r, c); masked positions are neutralised after loading, so garbage there
// (NaN, inf) never enters the arithmetic. Returns the mask value.
template <class T>
HA_DEVICE float load_token(const PolicyParams& p, int64_t r, int64_t c, float* lp, float* old,
                           float* adv, float* w) {
    const float m =
        static_cast<float>(load_as_double(p.mask.p, p.mask.code, r * p.mask.stride + c * p.mask_s1));
    const bool on = m != 0.0f;
    *lp = on ? to_float(static_cast<const T*>(p.log_prob)[r * p.lp_s0 + c * p.lp_s1]) : 0.0f;
    *old = on ? to_float(static_cast<const T*>(p.old_log_prob)[r * p.old_s0 + c * p.old_s1]) : 0.0f;
    *adv = on ? to_float(static_cast<const T*>(p.advantages)[r * p.adv_s0 + c * p.adv_s1]) : 0.0f;
    *w = p.weights == nullptr ? (on ? 1.0f : 0.0f)
         : on                 ? to_float(static_cast<const T*>(p.weights)[r * p.w_s0 + c * p.w_s1])
                              : 0.0f;
    return m;
}

// Per token: l = loss w m, kl = -d m, clipped m, clipped_lower m, and (when `factor` is given)
// factor[r, c] = T(m w dl/dlog_prob). Per block: the five sums, in double.
// Grid: (B, ceil(T / chunk)) (rows on x: no 65535 limit on B); block (r, x) covers columns
// [x chunk, (x + 1) chunk) of row r, HA_BLOCK threads strided over them;
// partials[(r chunks + x) 5 + q].
template <class T>
HA_DEVICE void policy_forward(const PolicyParams& p) {
    __shared__ double red[HA_WARPS];
    const int64_t r = blockIdx.x, x = blockIdx.y;
    const int64_t c0 = x * p.chunk;
    const int64_t c1 = c0 + p.chunk < p.cols ? c0 + p.chunk : p.cols;
    float sums[POLICY_SUMS] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t c = c0 + threadIdx.x; c < c1; c += HA_BLOCK) {
        float lp, old, adv, w;
        const float m = load_token<T>(p, r, c, &lp, &old, &adv, &w);
        const Token t = token(lp, old, adv, p);
        sums[0] += t.loss * w * m;
        sums[1] += m;
        sums[2] += t.clipped * m;
        sums[3] += -t.d * m;
        sums[4] += t.clipped_lower * m;
        if (p.factor != nullptr) static_cast<T*>(p.factor)[r * p.cols + c] = from_float<T>(t.grad * w * m);
    }
    const int64_t chunks = gridDim.y;
    for (int q = 0; q < POLICY_SUMS; ++q) {
        const double s = block_sum(static_cast<double>(sums[q]), red);
        if (threadIdx.x == 0) p.partials[(r * chunks + x) * POLICY_SUMS + q] = s;
    }
}
HA_KERNEL_FLOATS(policy_forward, PolicyParams)

struct PolicyReduceParams {
    const double* partials;  // [B, chunks, POLICY_SUMS]
    int64_t batch, chunks, cols;
    int64_t mode;  // 0 token-mean, 1 token-sum, 2 seq-mean-token-sum, 3 seq-mean-token-mean,
                   // 4 seq-mean-token-sum-norm (src/op/dapo.rs AggMode)
    double dp_size;
    // Normalisers: a value (< 0: not given) or a 0-d/1-element tensor read here.
    double batch_num_tokens;
    Side batch_num_tokens_tensor;
    double global_batch_size;
    Side global_batch_size_tensor;
    double loss_scale_factor;
    Side loss_scale_factor_tensor;
    float* loss;         // [] out
    float* metrics;      // [3] out: pg_clipfrac, ppo_kl, pg_clipfrac_lower
    float* row_scale;    // [B] out: dloss/d(l m) per row
};

HA_DEVICE double row_total(const PolicyReduceParams& p, int64_t r, int q) {
    double s = 0.0;
    for (int64_t x = 0; x < p.chunks; ++x) s += p.partials[(r * p.chunks + x) * POLICY_SUMS + q];
    return s;
}

HA_DEVICE double normaliser(double value, const Side& tensor) {
    return tensor.p != nullptr ? load_as_double(tensor.p, tensor.code, 0) : value;
}

// verl's agg_loss over the row sums: the loss, the three metrics (sum / (mask sum + 1e-8)) and
// the per-row scale the backward multiplies by. An empty denominator gives 0.
// Grid: (1); block: HA_BLOCK threads strided over rows; fixed-order block sums.
HA_DEVICE void policy_reduce(const PolicyReduceParams& p) {
    __shared__ double red[HA_WARPS];
    double tot[POLICY_SUMS] = {0.0, 0.0, 0.0, 0.0, 0.0};
    double live = 0.0;
    for (int64_t r = threadIdx.x; r < p.batch; r += HA_BLOCK) {
        for (int q = 0; q < POLICY_SUMS; ++q) tot[q] += row_total(p, r, q);
        live += row_total(p, r, 1) > 0.0 ? 1.0 : 0.0;
    }
    for (int q = 0; q < POLICY_SUMS; ++q) tot[q] = block_sum(tot[q], red);
    live = block_sum(live, red);
    const double bnt = normaliser(p.batch_num_tokens, p.batch_num_tokens_tensor);
    const double gbs = normaliser(p.global_batch_size, p.global_batch_size_tensor);
    const double lsf = normaliser(p.loss_scale_factor, p.loss_scale_factor_tensor);
    double loss = 0.0;
    if (p.mode <= 1) {
        const double n = bnt >= 0.0 ? bnt : tot[1];
        const double s = p.mode == 1 ? p.dp_size : (n == 0.0 ? 0.0 : p.dp_size / n);
        for (int64_t r = threadIdx.x; r < p.batch; r += HA_BLOCK) p.row_scale[r] = static_cast<float>(s);
        loss = tot[0] * s;
    } else {
        const double seqs = gbs >= 0.0 ? gbs : live;
        double s = seqs == 0.0 ? 0.0 : p.dp_size / seqs;
        if (p.mode == 4) s /= lsf >= 0.0 ? lsf : static_cast<double>(p.cols);
        double part = 0.0;
        for (int64_t r = threadIdx.x; r < p.batch; r += HA_BLOCK) {
            const double mask = row_total(p, r, 1);
            const double token_mean = p.mode == 3 ? mask + 1e-8 : 1.0;
            const double scale = (mask > 0.0 ? 1.0 : 0.0) * s / token_mean;
            p.row_scale[r] = static_cast<float>(scale);
            part += row_total(p, r, 0) * scale;
        }
        loss = block_sum(part, red);
    }
    if (threadIdx.x == 0) {
        const double den = tot[1] + 1e-8;
        *p.loss = static_cast<float>(loss);
        p.metrics[0] = static_cast<float>(tot[2] / den);
        p.metrics[1] = static_cast<float>(tot[3] / den);
        p.metrics[2] = static_cast<float>(tot[4] / den);
    }
}
HA_KERNEL(dapo_policy_reduce, policy_reduce, PolicyReduceParams)

// grad[r, c] = T(factor[r, c] * (up * scale[r])) in place when the forward saved the factor,
// else T(up * scale[r] * m * w * dl/dlog_prob) recomputed from the inputs; `up` is the
// upstream gradient read from device memory.
// Grid: (B, ceil(T / chunk)) as the forward; threads strided over the block's columns.
template <class T>
HA_DEVICE void policy_backward(const PolicyParams& p) {
    const int64_t r = blockIdx.x;
    const int64_t c0 = static_cast<int64_t>(blockIdx.y) * p.chunk;
    const int64_t c1 = c0 + p.chunk < p.cols ? c0 + p.chunk : p.cols;
    const float up = static_cast<float>(load_as_double(p.upstream.p, p.upstream.code, 0));
    const float row_up = up * p.row_scale[r];
    T* grad = static_cast<T*>(p.factor);
    for (int64_t c = c0 + threadIdx.x; c < c1; c += HA_BLOCK) {
        if (p.saved) {
            grad[r * p.cols + c] = from_float<T>(to_float(grad[r * p.cols + c]) * row_up);
            continue;
        }
        float lp, old, adv, w;
        const float m = load_token<T>(p, r, c, &lp, &old, &adv, &w);
        const float g = token(lp, old, adv, p).grad;
        grad[r * p.cols + c] = from_float<T>(row_up * m * w * g);
    }
}
HA_KERNEL_FLOATS(policy_backward, PolicyParams)
