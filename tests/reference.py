"""Pure-torch references written from the formulas of docs/design.md (sections 3 and 5), not
from the kernels.

Explicit loops over groups and pairs; run them in float64. Shared by tests and benches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def anchor_rows(hidden: torch.Tensor, index: torch.Tensor) -> list:
    """Per rollout its anchor state (a [H] tensor) or None; index is [B] (T positions or N rows)."""
    out = []
    for b, a in enumerate(index.tolist()):
        if a < 0:
            out.append(None)
        elif hidden.dim() == 3:
            out.append(hidden[b, a])
        else:
            out.append(hidden[a])
    return out


def mask_to_index(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool mask with at most one true per row -> [B] positions, -1 where none."""
    has = mask.any(dim=1)
    return torch.where(has, mask.int().argmax(dim=1), torch.full_like(has, -1, dtype=torch.long))


def _unit(h: torch.Tensor, eps: float) -> torch.Tensor:
    return h / h.norm().clamp_min(eps)


def alignment_loss(
    hidden: torch.Tensor,
    index: torch.Tensor,
    rewards: torch.Tensor,
    labels: torch.Tensor,
    loss_type: str = "cosine",
    reduction: str = "mean",
    threshold: float = 0.5,
    eps: float = 1e-8,
    tau: float = 0.1,
):
    """Returns (result, stats): result is a scalar, or (per_group [G], valid [G]) for 'none'."""
    rows = anchor_rows(hidden, index)
    if rewards.dtype == torch.bool:
        correct = rewards.tolist()
    else:
        correct = [bool(r > threshold) for r in rewards.tolist()]
    groups = sorted(set(labels.tolist()))
    per_group, valid, cosines = [], [], []
    zero = hidden.sum() * 0
    for g in groups:
        members = [b for b in range(len(rows)) if labels[b].item() == g]
        pos = [rows[b] for b in members if correct[b] and rows[b] is not None]
        neg = [rows[b] for b in members if not correct[b] and rows[b] is not None]
        n = len(pos)
        u = [_unit(h, eps) for h in pos]
        if n >= 2:
            pairs = [torch.dot(u[i], u[j]) for i in range(n) for j in range(n) if i != j]
            cosines.append(torch.stack(pairs).mean().detach())
        ok = n >= 2 and (loss_type != "contrastive" or len(neg) >= 1)
        valid.append(ok)
        if not ok:
            per_group.append(zero)
            continue
        if loss_type == "cosine":
            terms = [1 - torch.dot(u[i], u[j]) for i in range(n) for j in range(n) if i != j]
            per_group.append(torch.stack(terms).mean())
        elif loss_type == "centroid":
            s = torch.stack(u).sum(0).detach()
            d = s / s.norm().clamp_min(eps)
            per_group.append(torch.stack([1 - torch.dot(ui, d) for ui in u]).mean())
        elif loss_type == "mse":
            m = torch.stack(pos).mean(0).detach()
            per_group.append(torch.stack([((h - m) ** 2).sum() / h.numel() for h in pos]).mean())
        elif loss_type == "contrastive":
            everyone = u + [_unit(h, eps) for h in neg]
            terms = []
            for i in range(n):
                logits = torch.stack(
                    [torch.dot(u[i], a) / tau for k, a in enumerate(everyone) if k != i]
                )
                log_p = logits - torch.logsumexp(logits, 0)
                # the first n - 1 entries are the other correct anchors (the positives)
                terms.append(-log_p[: n - 1].mean())
            per_group.append(torch.stack(terms).mean())
        else:
            raise ValueError(loss_type)
    values = torch.stack(per_group) if per_group else hidden.new_zeros(0)
    valid_t = torch.tensor(valid, dtype=torch.bool)
    nvalid = int(valid_t.sum())
    if reduction == "mean":
        result = values.sum() / nvalid if nvalid else values.sum() * 0
    elif reduction == "sum":
        result = values.sum()
    else:
        result = (values, valid_t)
    stats = {
        "mean_cosine": torch.stack(cosines).mean() if cosines else torch.tensor(float("nan")),
        "valid_groups": nvalid,
        "anchored_correct": sum(1 for b, r in enumerate(rows) if r is not None and correct[b]),
    }
    return result, stats


def eager_alignment_loss(hidden, index, rewards, group_size, eps=1e-8):
    """What a user would write in PyTorch for the default loss (cosine, mean): index the anchors,
    F.normalize, a per-group similarity matrix, a masked mean over valid groups. Padded layout,
    contiguous groups."""
    batch = index.shape[0]
    b = torch.arange(batch, device=index.device)
    h = hidden[b, index.clamp_min(0)]
    u = F.normalize(h.float(), dim=-1, eps=eps).view(batch // group_size, group_size, -1)
    ok = ((index >= 0) & (rewards > 0.5)).view(-1, group_size)
    eye = torch.eye(group_size, dtype=torch.bool, device=index.device)
    pair = ok[:, :, None] & ok[:, None, :] & ~eye
    sim = u @ u.transpose(1, 2)
    count = pair.sum((1, 2))
    valid = count > 0
    per_group = 1 - (sim * pair).sum((1, 2)) / count.clamp_min(1)
    return (per_group * valid).sum() / valid.sum().clamp_min(1)


# ---- DAPO (docs/design.md section 5) --------------------------------------------------------


def grpo_advantages(scores, labels, eps=1e-6, norm_by_std=True):
    """Per group mean and unbiased std; singleton groups use mean 0, std 1."""
    scores = scores.double()
    if scores.dim() == 2:
        scores = scores.sum(-1)
    out = torch.empty_like(scores)
    for g in set(labels.tolist()):
        idx = [i for i, label in enumerate(labels.tolist()) if label == g]
        vals = scores[idx]
        mean, std = (vals.mean(), vals.std()) if len(idx) > 1 else (0.0, 1.0)
        out[idx] = (vals - mean) / (std + eps) if norm_by_std else vals - mean
    return out


def dynamic_sampling(metric, labels):
    keep = torch.empty(len(labels), dtype=torch.bool)
    for g in set(labels.tolist()):
        idx = [i for i, label in enumerate(labels.tolist()) if label == g]
        vals = metric[idx].double()
        keep[idx] = len(idx) == 1 or bool(vals.std(unbiased=False) > 0)
    return keep


def overlong(lengths, max_len, buffer, factor=1.0):
    exceed = lengths.double() - (max_len - buffer)
    return torch.clamp(-exceed / buffer * factor, max=0.0)


def policy_loss(
    logp,
    old,
    adv,
    mask,
    clip_low=0.2,
    clip_high=0.28,
    clip_c=10.0,
    clamp=20.0,
    agg="token-mean",
    weights=None,
    batch_num_tokens=None,
    dp_size=1,
    global_batch_size=None,
    loss_scale_factor=None,
    dtype=torch.float64,
):
    """The clipped token loss and its aggregation, written from the formulas; masked positions
    are replaced before use so garbage there cannot leak. Returns (loss, metrics). Computed in
    ``dtype``: float64 for the reference, a half dtype for PyTorch's own low-precision result."""
    m = mask.to(dtype)
    on = m != 0
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp)

    def safe(x):
        return torch.where(on, x.to(dtype), torch.zeros_like(x, dtype=dtype))

    lp, old, adv = safe(logp), safe(old), safe(adv)
    d = lp - old
    if clamp is not None:
        d = torch.clamp(d, -clamp, clamp)
    ratio = torch.exp(d)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    c1 = torch.maximum(l1, l2)
    l3 = -adv * clip_c
    c2 = torch.minimum(l3, c1)
    tok = torch.where(adv < 0, c2, c1)
    if weights is not None:
        tok = tok * safe(weights)
    lm = tok * m
    den = m.sum() + 1e-8
    metrics = {
        "pg_clipfrac": ((l2 > l1).to(dtype) * m).sum() / den,
        "ppo_kl": (-d * m).sum() / den,
        "pg_clipfrac_lower": (((c1 > l3) & (adv < 0)).to(dtype) * m).sum() / den,
    }
    row_tokens = m.sum(-1)
    live = (row_tokens > 0).to(dtype)
    if agg == "token-mean":
        n = m.sum() if batch_num_tokens is None else batch_num_tokens
        loss = lm.sum() / n * dp_size if n else lm.sum() * 0
    elif agg == "token-sum":
        loss = lm.sum() * dp_size
    else:
        seq = lm.sum(-1)
        if agg == "seq-mean-token-mean":
            # an empty row (sum 0) is divided by 1, not by 1e-8, which float16 rounds to 0
            seq = seq / torch.where(row_tokens > 0, row_tokens + 1e-8, 1.0)
        gbs = live.sum() if global_batch_size is None else global_batch_size
        loss = (seq * live).sum() / gbs * dp_size if gbs else seq.sum() * 0
        if agg == "seq-mean-token-sum-norm":
            loss = loss / (logp.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss, metrics


def find_anchors_loop(token_ids, response_mask, markers, occurrence="last", offset=-1) -> list:
    """Per row: every (start, spelling) whose tokens all lie in the response, the winner by
    start (greatest for 'last', least for 'first') then length, placed at start + offset."""
    ids, live = token_ids.tolist(), (response_mask != 0).tolist()
    out = []
    for row, inside in zip(ids, live):
        t = len(row)
        hits = [
            (s, len(m))
            for s in range(t)
            for m in markers
            if s + len(m) <= t and all(row[s + j] == m[j] and inside[s + j] for j in range(len(m)))
        ]
        if not hits:
            out.append(-1)
            continue
        if occurrence == "last":
            s = max(hits)[0]
        else:
            s = min(hits, key=lambda h: (h[0], -h[1]))[0]
        out.append(s + offset if 0 <= s + offset < t else -1)
    return out


def find_anchors_unfold(token_ids, response_mask, markers, offset=-1):
    """The way a PyTorch user writes the last-occurrence search: for each spelling, windows of
    ``unfold`` compared with the spelling and with the mask, then the last hit per row."""
    b, t = token_ids.shape
    cols = torch.arange(t, device=token_ids.device)
    best_start = torch.full((b,), -1, dtype=torch.long, device=token_ids.device)
    best_len = torch.zeros(b, dtype=torch.long, device=token_ids.device)
    live = response_mask != 0
    for m in markers:
        m = torch.as_tensor(m, device=token_ids.device)
        n = m.numel()
        if n > t:
            continue
        windows = token_ids.unfold(1, n, 1)  # [B, T - n + 1, n]
        inside = live.unfold(1, n, 1).all(-1)
        hit = (windows == m).all(-1) & inside
        start = torch.where(hit, cols[: t - n + 1], -1).amax(1)
        better = (start > best_start) | ((start == best_start) & (start >= 0) & (n > best_len))
        best_start = torch.where(better, start, best_start)
        best_len = torch.where(better, n, best_len)
    pos = best_start + offset
    return torch.where((best_start >= 0) & (pos >= 0) & (pos < t), pos, -1)
