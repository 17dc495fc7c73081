// The Hidden-Align loss with fused anchor gathering: forward (two launches: per-rollout
// preparation, then per-group losses with the final reduction in the last block to finish)
// and backward (one launch). The CPU kernels in src/cpu/align.rs are the specification.
//
// Only the anchor rows of `hidden` are read. Groups are linked lists through `links`: every
// rollout knows the next rollout of its group; the first member (the leader) does the group's
// work in the block of its index, so every group sum runs over members in ascending order.
#include "common.cuh"

enum LossType : int64_t { LOSS_COSINE = 0, LOSS_CENTROID = 1, LOSS_MSE = 2, LOSS_CONTRASTIVE = 3 };
enum Reduction : int64_t { RED_MEAN = 0, RED_SUM = 1, RED_NONE = 2 };

// Float scratch regions of `work` ([8, B] float32). `links` (int32 [4 B + 1]) holds the next
// member of each rollout's group [0, B), the leader flags [B, 2 B), the block ticket [2 B] and
// the two buffers of the label sort [2 B + 1, 4 B + 1).
enum Work : int64_t {
    W_INV_NORM = 0,  // 1 / max(||h||, eps), 0 for rollouts that take no part
    W_SELF_SQ = 1,   // ||u||^2
    W_CLAMPED = 2,   // 1 when the norm was clamped to eps
    W_AUX = 3,       // contrastive: per correct anchor its loss (forward) or logsumexp (backward)
    W_COS = 4,       // per dense group: mean pairwise cosine
    W_HAS_COS = 5,   // per dense group: 1 when the group has two anchored correct rollouts
    W_COEF = 6,      // contrastive backward: coefficient of each row in the current gradient
};

// Row of a rollout with no anchor; an anchor that is out of range, or two anchors in one mask
// row, mark the rollout invalid and make the loss NaN (the CUDA path cannot raise without a
// host synchronisation).
#define ROW_NONE (-1)
#define ROW_INVALID (-2)

struct AlignParams {
    const void* hidden;  // [B, T, H] or [N, H], storage type T, any strides
    int64_t outer_stride, inner_stride, feature_stride;
    int64_t inner;     // T (N for packed)
    int64_t num_rows;  // B T or N
    int64_t hidden_size;
    int64_t packed;
    const void* anchors;  // bool/uint8 mask [B, T] or [N], or int32/int64 indices [B]
    int64_t anchor_code;
    int64_t anchor_is_mask;
    int64_t anchor_s0, anchor_s1;  // element strides (s1: along T of a padded mask)
    int64_t anchor_cols;           // T of a padded mask
    Side cu_seqlens;               // [B + 1] for packed hidden, or absent
    Side rewards;                  // [B]
    double threshold;
    Side labels;  // [B] group labels, or absent for contiguous groups
    int64_t group_size;
    int64_t batch;
    int64_t loss_type;
    int64_t reduction;
    double eps, tau;
    int64_t* rows;         // [B] out: flat anchor row, ROW_NONE or ROW_INVALID
    int64_t* groups;       // [B] out: dense group index (sorted label order)
    uint8_t* correct;      // [B] out
    float* group_loss;     // [B] out (first G used)
    uint8_t* group_valid;  // [B] out (first G used)
    float* loss;           // [] out: the reduced loss (mean or sum)
    float* mean_cosine;    // [] out
    int64_t* counts;       // [2] out: valid groups, anchored correct rollouts
    float* work;           // [8, B] scratch, kept for the backward
    int32_t* links;        // [4 B + 1] scratch: next member, leader flag, ticket, sort buffers
    Side upstream;         // backward: gradient of the result ([1] or [G])
    float* centre;         // backward: [B, H] scratch (group sums at the leader's row)
    float* grad_rows;      // backward: [B, H] out, dL/dh at each rollout's anchor row
};

template <class T>
HA_DEVICE float h_at(const AlignParams& p, int64_t row, int64_t k) {
    const int64_t off = (row / p.inner) * p.outer_stride + (row % p.inner) * p.inner_stride +
                        k * p.feature_stride;
    return to_float(static_cast<const T*>(p.hidden)[off]);
}

HA_DEVICE float* work(const AlignParams& p, int64_t region) { return p.work + region * p.batch; }
HA_DEVICE int32_t next_of(const AlignParams& p, int64_t b) { return p.links[b]; }
HA_DEVICE bool is_leader(const AlignParams& p, int64_t b) { return p.links[p.batch + b] != 0; }
HA_DEVICE bool anchored(const AlignParams& p, int64_t b) { return p.rows[b] >= 0; }
HA_DEVICE bool anchored_correct(const AlignParams& p, int64_t b) {
    return p.rows[b] >= 0 && p.correct[b] != 0;
}
HA_DEVICE int64_t cu_at(const AlignParams& p, int64_t i) {
    return load_label(p.cu_seqlens.p, p.cu_seqlens.code, i * p.cu_seqlens.stride);
}

// Anchor row of rollout b (every thread of the block gets the same value).
HA_DEVICE int64_t find_anchor(const AlignParams& p, int64_t b, int64_t* ired) {
    if (!p.anchor_is_mask) {
        const int64_t idx = load_label(p.anchors, p.anchor_code, b * p.anchor_s0);
        if (idx == -1) return ROW_NONE;
        if (!p.packed) return (idx >= 0 && idx < p.inner) ? b * p.inner + idx : ROW_INVALID;
        bool ok = idx >= 0 && idx < p.num_rows;
        if (p.cu_seqlens.p != nullptr) ok = ok && idx >= cu_at(p, b) && idx < cu_at(p, b + 1);
        return ok ? idx : ROW_INVALID;
    }
    int64_t lo = 0, hi = p.anchor_cols, step = p.anchor_s1, base = b * p.anchor_s0;
    if (p.packed) {
        lo = cu_at(p, b);
        hi = cu_at(p, b + 1);
        if (lo < 0 || hi < lo || hi > p.num_rows) return ROW_INVALID;
        step = p.anchor_s0;
        base = 0;
    }
    int64_t count = 0, pos = 0;
    for (int64_t t = lo + threadIdx.x; t < hi; t += HA_BLOCK) {
        if (load_as_double(p.anchors, p.anchor_code, base + t * step) != 0.0) {
            ++count;
            pos = t;
        }
    }
    count = block_sum(count, ired);
    pos = block_sum(pos, ired);
    if (count == 0) return ROW_NONE;
    if (count > 1) return ROW_INVALID;
    return p.packed ? pos : b * p.inner + pos;
}

// Groups from labels in O(B log B): sorts the rollouts by (label, index), then writes every
// rollout's next group member (ascending indices), leader flag (the group's first index) and
// dense group index (the label's rank, so groups come in sorted label order).
// Grid: (1); block: HA_BLOCK threads (the sort and scan of common.cuh).
HA_DEVICE void resolve_align_groups(const AlignParams& p) {
    __shared__ int64_t red[HA_BLOCK + 1];
    const int64_t nb = p.batch;
    int32_t* sorted = p.links + 2 * nb + 1;
    block_sort_by_key(p.labels, nb, sorted, sorted + nb);
    runs_of_sorted(p.labels, nb, sorted, p.links, p.links + nb, p.groups, red);
}
HA_KERNEL(align_resolve_groups, resolve_align_groups, AlignParams)

// Per rollout b: its anchor row, correctness, the next member of its group and whether it
// leads the group (contiguous groups; with labels align_resolve_groups wrote them); for each
// anchored row taking part, 1 / max(||h||, eps), ||u||^2 and the clamp flag. Block 0 also
// resets the ticket of align_groups.
// Grid: (max(B, 1)); block: HA_BLOCK threads strided over T (mask scan) and H (norms).
template <class T>
HA_DEVICE void align_prepare(const AlignParams& p) {
    __shared__ int64_t ired[HA_WARPS];
    __shared__ float fred[HA_WARPS];
    const int64_t b = blockIdx.x, nb = p.batch;
    if (b == 0 && threadIdx.x == 0) p.links[2 * nb] = 0;
    if (b >= nb) return;  // the one block of an empty batch only resets the ticket
    const int64_t row = find_anchor(p, b, ired);
    const double reward = load_as_double(p.rewards.p, p.rewards.code, b * p.rewards.stride);
    // NaN compares false: a NaN-scored rollout counts as incorrect.
    const bool correct = p.rewards.code == CODE_BOOL ? reward != 0.0 : reward > p.threshold;

    float inv = 0.0f, self_sq = 0.0f, clamped = 0.0f;
    if (row >= 0 && (correct || p.loss_type == LOSS_CONTRASTIVE)) {
        float sq = 0.0f;
        for (int64_t k = threadIdx.x; k < p.hidden_size; k += HA_BLOCK) {
            const float h = h_at<T>(p, row, k);
            sq += h * h;
        }
        const float norm = sqrtf(block_sum(sq, fred));
        const float eps = static_cast<float>(p.eps);
        clamped = norm <= eps ? 1.0f : 0.0f;
        inv = norm <= eps ? 1.0f / eps : 1.0f / norm;
        float us = 0.0f;
        for (int64_t k = threadIdx.x; k < p.hidden_size; k += HA_BLOCK) {
            const float u = h_at<T>(p, row, k) * inv;
            us += u * u;
        }
        self_sq = block_sum(us, fred);
    }
    if (threadIdx.x == 0) {
        p.rows[b] = row;
        p.correct[b] = correct ? 1 : 0;
        work(p, W_INV_NORM)[b] = inv;
        work(p, W_SELF_SQ)[b] = self_sq;
        work(p, W_CLAMPED)[b] = clamped;
        if (p.labels.p == nullptr) {
            p.links[b] = (b + 1) % p.group_size != 0 && b + 1 < nb ? static_cast<int32_t>(b + 1) : -1;
            p.links[nb + b] = b % p.group_size == 0 ? 1 : 0;
        }
    }
}
HA_KERNEL_FLOATS(align_prepare, AlignParams)

// u_ik = h_ik / max(||h_i||, eps) of rollout i.
template <class T>
HA_DEVICE float u_at(const AlignParams& p, int64_t i, int64_t k) {
    return h_at<T>(p, p.rows[i], k) * work(p, W_INV_NORM)[i];
}

// Dot product u_i . u_a over H by one warp; every lane gets the same value.
template <class T>
HA_DEVICE float warp_dot(const AlignParams& p, int64_t i, int64_t a) {
    float s = 0.0f;
    for (int64_t k = threadIdx.x & 31; k < p.hidden_size; k += 32) s += u_at<T>(p, i, k) * u_at<T>(p, a, k);
    return warp_sum(s);
}

// Contrastive: for each correct anchor i of the group led by `leader`, the logsumexp of
// z_ia = u_i . u_a / tau over the group's other anchored rows a (one warp per i), written to
// W_AUX[i]; with `with_loss`, the loss lse_i - sum_{a correct} z_ia / (n - 1) instead.
template <class T>
HA_DEVICE void contrastive_rows(const AlignParams& p, int64_t leader, int64_t n, bool with_loss) {
    const int warp = threadIdx.x >> 5;
    const float inv_tau = 1.0f / static_cast<float>(p.tau);
    const float pos_weight = 1.0f / static_cast<float>(n - 1);
    int64_t ordinal = 0;
    for (int64_t i = leader; i >= 0; i = next_of(p, i)) {
        if (!anchored_correct(p, i)) continue;
        if (ordinal++ % HA_WARPS != warp) continue;
        float m = -f32_inf(), s = 0.0f, pos = 0.0f;
        for (int64_t a = leader; a >= 0; a = next_of(p, a)) {
            if (a == i || !anchored(p, a)) continue;
            const float z = warp_dot<T>(p, i, a) * inv_tau;
            if (z > m) {
                s = s * expf(m - z) + 1.0f;
                m = z;
            } else {
                s += expf(z - m);
            }
            if (p.correct[a]) pos += z;
        }
        const float lse = m + logf(s);
        if ((threadIdx.x & 31) == 0) work(p, W_AUX)[i] = with_loss ? lse - pos_weight * pos : lse;
    }
    __syncthreads();
}

// The loss of the group led by b (see src/cpu/align.rs for the four formulas), written at its
// dense index with its validity and mean pairwise cosine; also the dense index of every member.
template <class T>
HA_DEVICE void group_forward(const AlignParams& p, int64_t b, float* fred) {
    // Contiguous blocks, or the label's rank written by align_resolve_groups.
    const int64_t dense = p.labels.p == nullptr ? b / p.group_size : p.groups[b];
    int64_t n = 0, negatives = 0;
    float self_sum = 0.0f;
    for (int64_t j = b; j >= 0; j = next_of(p, j)) {
        // With labels align_resolve_groups already wrote every member's group.
        if (threadIdx.x == 0 && p.labels.p == nullptr) p.groups[j] = dense;
        if (!anchored(p, j)) continue;
        if (p.correct[j]) {
            ++n;
            self_sum += work(p, W_SELF_SQ)[j];
        } else {
            ++negatives;
        }
    }
    const bool valid = n >= 2 && (p.loss_type != LOSS_CONTRASTIVE || negatives >= 1);
    float cosine = 0.0f, loss = 0.0f;
    if (n >= 2) {
        const float nf = static_cast<float>(n);
        float sq = 0.0f, dev = 0.0f;
        for (int64_t k = threadIdx.x; k < p.hidden_size; k += HA_BLOCK) {
            float s = 0.0f, raw = 0.0f;
            for (int64_t j = b; j >= 0; j = next_of(p, j)) {
                if (!anchored_correct(p, j)) continue;
                const float h = h_at<T>(p, p.rows[j], k);
                s += h * work(p, W_INV_NORM)[j];
                raw += h;
            }
            sq += s * s;
            if (p.loss_type == LOSS_MSE) {
                const float mean = raw / nf;
                for (int64_t j = b; j >= 0; j = next_of(p, j)) {
                    if (!anchored_correct(p, j)) continue;
                    const float d = h_at<T>(p, p.rows[j], k) - mean;
                    dev += d * d;
                }
            }
        }
        const float s2 = block_sum(sq, fred);
        cosine = (s2 - self_sum) / (nf * (nf - 1.0f));
        // Held to [-1, 1] (rounding can pass 1 for identical anchors); NaN stays NaN.
        cosine = cosine > 1.0f ? 1.0f : (cosine < -1.0f ? -1.0f : cosine);
        if (p.loss_type == LOSS_MSE) dev = block_sum(dev, fred);
        if (valid) {
            if (p.loss_type == LOSS_COSINE) {
                loss = 1.0f - cosine;
            } else if (p.loss_type == LOSS_CENTROID) {
                // mean_i (1 - u_i . S / |S|) = 1 - |S|^2 / (max(|S|, eps) n)
                const float norm = sqrtf(s2), eps = static_cast<float>(p.eps);
                loss = 1.0f - s2 * (norm > eps ? 1.0f / norm : 1.0f / eps) / nf;
            } else if (p.loss_type == LOSS_MSE) {
                loss = dev / (nf * static_cast<float>(p.hidden_size));
            } else {
                contrastive_rows<T>(p, b, n, true);
                for (int64_t j = b; j >= 0; j = next_of(p, j)) {
                    if (anchored_correct(p, j)) loss += work(p, W_AUX)[j];
                }
                loss /= nf;
            }
        }
    }
    if (threadIdx.x == 0) {
        p.group_loss[dense] = valid ? loss : 0.0f;
        p.group_valid[dense] = valid ? 1 : 0;
        work(p, W_COS)[dense] = cosine;
        work(p, W_HAS_COS)[dense] = n >= 2 ? 1.0f : 0.0f;
    }
}

// The reduction over groups, run by the last block to finish: loss (mean over valid groups,
// 0 when none; or the sum), mean cosine (NaN when no group has two anchored correct rollouts),
// counts; NaN loss when some rollout had an invalid anchor.
HA_DEVICE void finish_forward(const AlignParams& p, int64_t* ired, float* fred) {
    const int64_t nb = p.batch;
    int64_t groups = 0, anchored_ok = 0, invalid = 0;
    for (int64_t j = threadIdx.x; j < nb; j += HA_BLOCK) {
        groups += is_leader(p, j);
        anchored_ok += anchored_correct(p, j);
        invalid += p.rows[j] == ROW_INVALID;
    }
    groups = block_sum(groups, ired);
    anchored_ok = block_sum(anchored_ok, ired);
    invalid = block_sum(invalid, ired);
    // Written by other blocks of this launch: read through volatile so that no line this SM's
    // L1 might hold is used (the writers fenced before taking their tickets).
    const volatile float* group_loss = p.group_loss;
    const volatile uint8_t* group_valid = p.group_valid;
    const volatile float* cos = work(p, W_COS);
    const volatile float* has_cos = work(p, W_HAS_COS);
    float total = 0.0f, cos_sum = 0.0f, cos_n = 0.0f, valid = 0.0f;
    for (int64_t g = threadIdx.x; g < groups; g += HA_BLOCK) {
        total += group_loss[g];
        valid += group_valid[g];
        if (has_cos[g] != 0.0f) {
            cos_sum += cos[g];
            cos_n += 1.0f;
        }
        if (invalid) p.group_loss[g] = f32_nan();
    }
    total = block_sum(total, fred);
    valid = block_sum(valid, fred);
    cos_sum = block_sum(cos_sum, fred);
    cos_n = block_sum(cos_n, fred);
    if (threadIdx.x == 0) {
        float loss = total;
        if (p.reduction == RED_MEAN) loss = valid > 0.0f ? total / valid : 0.0f;
        *p.loss = invalid ? f32_nan() : loss;
        *p.mean_cosine = (invalid || cos_n == 0.0f) ? f32_nan() : cos_sum / cos_n;
        p.counts[0] = static_cast<int64_t>(valid);
        p.counts[1] = anchored_ok;
    }
}

// Per-group losses, then the reduction. Block b does the work of the group b leads (others
// have none); then it takes a ticket, and the block that takes the last one reduces over the
// groups in dense order (deterministic, no float atomics). align_prepare reset the ticket.
// Grid: (max(B, 1)): an empty batch still gets its (zero) loss written; block: HA_BLOCK threads
// strided over H (one warp per anchor for contrastive).
template <class T>
HA_DEVICE void align_groups(const AlignParams& p) {
    __shared__ int64_t ired[HA_WARPS];
    __shared__ float fred[HA_WARPS];
    __shared__ int last;
    const int64_t b = blockIdx.x;
    if (b < p.batch && is_leader(p, b)) group_forward<T>(p, b, fred);
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();  // this block's results are visible before its ticket is
        last = atomicAdd(&p.links[2 * p.batch], 1) == static_cast<int>(gridDim.x) - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    finish_forward(p, ired, fred);
}
HA_KERNEL_FLOATS(align_groups, AlignParams)

// Gradient of the group led by b into grad_rows (see src/cpu/align.rs backward): dL/du per
// member, chained through u = h / max(||h||, eps) as (g - (u . g) u) / ||h|| (g / eps when
// clamped); mse differentiates the raw states.
template <class T>
HA_DEVICE void group_backward(const AlignParams& p, int64_t b, float* fred) {
    const int64_t g = p.groups[b], hs = p.hidden_size;
    const int64_t up_at = p.reduction == RED_NONE ? g * p.upstream.stride : 0;
    const float up = static_cast<float>(load_as_double(p.upstream.p, p.upstream.code, up_at));
    const float w = p.reduction == RED_MEAN ? up / static_cast<float>(p.counts[0]) : up;
    int64_t n = 0;
    for (int64_t j = b; j >= 0; j = next_of(p, j)) n += anchored_correct(p, j);
    const float nf = static_cast<float>(n);
    float* centre = p.centre + b * hs;
    const float* inv = work(p, W_INV_NORM);
    const float* clamped = work(p, W_CLAMPED);

    if (p.loss_type == LOSS_MSE) {
        const float scale = 2.0f * w / (nf * static_cast<float>(hs));
        for (int64_t k = threadIdx.x; k < hs; k += HA_BLOCK) {
            float s = 0.0f;
            for (int64_t j = b; j >= 0; j = next_of(p, j)) {
                if (anchored_correct(p, j)) s += h_at<T>(p, p.rows[j], k);
            }
            const float mean = s / nf;
            for (int64_t j = b; j >= 0; j = next_of(p, j)) {
                if (anchored_correct(p, j)) p.grad_rows[j * hs + k] = scale * (h_at<T>(p, p.rows[j], k) - mean);
            }
        }
        return;
    }

    if (p.loss_type == LOSS_CONTRASTIVE) {
        contrastive_rows<T>(p, b, n, false);
        const int warp = threadIdx.x >> 5;
        const float inv_tau = 1.0f / static_cast<float>(p.tau);
        const float pos_weight = 1.0f / (nf - 1.0f);
        const float c0 = w / nf * inv_tau;
        float* coef = work(p, W_COEF);
        const float* lse = work(p, W_AUX);
        for (int64_t r = b; r >= 0; r = next_of(p, r)) {
            if (!anchored(p, r)) continue;
            // coef_j: dL/dz_rj (r correct) + dL/dz_jr (j correct); z is symmetric.
            int64_t ordinal = 0;
            for (int64_t j = b; j >= 0; j = next_of(p, j)) {
                if (j == r || !anchored(p, j)) continue;
                if (ordinal++ % HA_WARPS != warp) continue;
                const float z = warp_dot<T>(p, r, j) * inv_tau;
                float c = 0.0f;
                if (p.correct[r]) c += c0 * (expf(z - lse[r]) - (p.correct[j] ? pos_weight : 0.0f));
                if (p.correct[j]) c += c0 * (expf(z - lse[j]) - (p.correct[r] ? pos_weight : 0.0f));
                if ((threadIdx.x & 31) == 0) coef[j] = c;
            }
            __syncthreads();
            float proj = 0.0f;
            for (int64_t k = threadIdx.x; k < hs; k += HA_BLOCK) {
                float gk = 0.0f;
                for (int64_t j = b; j >= 0; j = next_of(p, j)) {
                    if (j != r && anchored(p, j)) gk += coef[j] * u_at<T>(p, j, k);
                }
                p.grad_rows[r * hs + k] = gk;
                proj += u_at<T>(p, r, k) * gk;
            }
            proj = block_sum(proj, fred);  // also orders the coef reads before the next writes
            if (clamped[r] != 0.0f) proj = 0.0f;
            for (int64_t k = threadIdx.x; k < hs; k += HA_BLOCK) {
                const float gk = p.grad_rows[r * hs + k];
                p.grad_rows[r * hs + k] = (gk - proj * u_at<T>(p, r, k)) * inv[r];
            }
        }
        return;
    }

    // cosine: dL/du_i = -2 w / (n (n - 1)) (S - u_i); centroid: -w / n S / max(|S|, eps).
    float sq = 0.0f;
    for (int64_t k = threadIdx.x; k < hs; k += HA_BLOCK) {
        float s = 0.0f;
        for (int64_t j = b; j >= 0; j = next_of(p, j)) {
            if (anchored_correct(p, j)) s += u_at<T>(p, j, k);
        }
        centre[k] = s;  // read back only by this thread
        sq += s * s;
    }
    float scale, inv_s = 0.0f;
    if (p.loss_type == LOSS_CENTROID) {
        const float norm = sqrtf(block_sum(sq, fred)), eps = static_cast<float>(p.eps);
        inv_s = norm > eps ? 1.0f / norm : 1.0f / eps;
        scale = -w / nf;
    } else {
        scale = -2.0f * w / (nf * (nf - 1.0f));
    }
    for (int64_t i = b; i >= 0; i = next_of(p, i)) {
        if (!anchored_correct(p, i)) continue;
        float proj = 0.0f;
        for (int64_t k = threadIdx.x; k < hs; k += HA_BLOCK) {
            const float u = u_at<T>(p, i, k);
            const float gk = p.loss_type == LOSS_CENTROID ? scale * (centre[k] * inv_s)
                                                          : scale * (centre[k] - u);
            proj += u * gk;
        }
        proj = clamped[i] != 0.0f ? 0.0f : block_sum(proj, fred);
        for (int64_t k = threadIdx.x; k < hs; k += HA_BLOCK) {
            const float u = u_at<T>(p, i, k);
            const float gk = p.loss_type == LOSS_CENTROID ? scale * (centre[k] * inv_s)
                                                          : scale * (centre[k] - u);
            p.grad_rows[i * hs + k] = (gk - proj * u) * inv[i];
        }
    }
}

// dL/dh at every rollout's anchor row: block b zeroes row b when rollout b receives no
// gradient, and computes the whole group when b leads a valid group.
// Grid: (B); block: HA_BLOCK threads strided over H.
template <class T>
HA_DEVICE void align_backward(const AlignParams& p) {
    __shared__ float fred[HA_WARPS];
    const int64_t b = blockIdx.x, hs = p.hidden_size;
    const bool valid = p.group_valid[p.groups[b]] != 0;
    const bool takes_part =
        valid && anchored(p, b) && (p.correct[b] || p.loss_type == LOSS_CONTRASTIVE);
    if (!takes_part) {
        for (int64_t k = threadIdx.x; k < hs; k += HA_BLOCK) p.grad_rows[b * hs + k] = 0.0f;
    }
    if (valid && is_leader(p, b)) group_backward<T>(p, b, fred);
}
HA_KERNEL_FLOATS(align_backward, AlignParams)
