"""Calls every op of hidden_align once, forward and backward where there is one, on small
random inputs: short enough to run under ``compute-sanitizer`` (memcheck, racecheck), where
every kernel runs many times slower. Checks only that each result is finite; the comparisons
with the CPU backend are in tests/test_cuda_device.py.

Usage: python scripts/device_smoke.py [--device cuda]   (``--device cpu`` runs the CPU backend)
"""

from __future__ import annotations

import argparse
import sys

import torch

import hidden_align as ha
from hidden_align import dapo

LOSS_TYPES = ["cosine", "centroid", "mse", "contrastive"]
AGG_MODES = [
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
]


def finite(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if not bool(torch.isfinite(t.detach().float()).all()):
            raise SystemExit(f"{name}: non-finite result")
    print(f"ok  {name}", flush=True)


def alignment(device: str) -> None:
    # H = 300: not a multiple of any block size, so the last block has threads past the end.
    b, t, h, g = 16, 7, 300, 4
    ids = (torch.arange(b) // g)[torch.randperm(b)].to(device)  # labels: the sort path
    index = torch.randint(0, t, (b,), device=device)
    index[3] = -1  # a rollout without an anchor
    rewards = (torch.rand(b, device=device) > 0.4).float()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for loss_type in LOSS_TYPES:
            hidden = torch.randn(b, t, h, device=device, dtype=dtype, requires_grad=True)
            value = ha.loss(hidden, index, rewards, group_ids=ids, loss_type=loss_type)
            value.backward()
            finite(f"loss {loss_type} {str(dtype)[6:]} (group ids)", value, hidden.grad)
    # Contiguous groups, a bool mask, reduction="none" and statistics.
    hidden = torch.randn(b, t, h, device=device, requires_grad=True)
    mask = torch.zeros(b, t, dtype=torch.bool, device=device)
    mask[torch.arange(b, device=device), index.clamp_min(0)] = True
    (per_group, _valid), stats = ha.loss(
        hidden, mask, rewards, group_size=g, reduction="none", return_stats=True
    )
    per_group.sum().backward()
    finite("loss mask, group_size, reduction=none", per_group, hidden.grad, stats["valid_groups"])
    # Packed rows with cu_seqlens, feeding a second consumer (an LM-head-like product): the row
    # gradient is added in place into the dense gradient that consumer sends.
    lengths = torch.randint(1, t + 1, (b,))
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device)
    rows = (cu[:-1] + (lengths.to(device) - 1)).clone()
    x = torch.randn(int(lengths.sum()), h, device=device, requires_grad=True)
    packed = torch.tanh(x)
    head = torch.randn(h, 11, device=device)
    value = (packed @ head).square().mean() + ha.loss(
        packed, rows, rewards, group_ids=ids, cu_seqlens=cu
    )
    value.backward()
    finite("loss packed (cu_seqlens) + row-gradient delivery", value, x.grad)
    # The split loss: statistics of the whole batch, two micro-batches' shares.
    with torch.no_grad():
        full = torch.randn(b, t, h, device=device)
    reference = ha.group_anchor_stats(full, index, rewards, group_ids=ids)
    for part in (slice(0, b // 2), slice(b // 2, b)):
        hidden = full[part].clone().requires_grad_()
        share = ha.loss(
            hidden, index[part], rewards[part], group_ids=ids[part], reference=reference
        )
        share.backward()
        finite(f"loss share of rows {part.start}:{part.stop} (group_anchor_stats)", share)
    row_ref = reference.rows(ids)
    hidden = full.clone().requires_grad_()
    share = ha.loss(hidden, index, rewards, reference=row_ref)
    share.backward()
    finite("loss with a RowReference", share, hidden.grad)


def anchors(device: str) -> None:
    b, t = 8, 50
    tokens = torch.randint(0, 20, (b, t), device=device)
    tokens[:, 30:32] = torch.tensor([98, 99], device=device)
    response = torch.ones(b, t, dtype=torch.long, device=device)
    response[:, :5] = 0
    for occurrence in ("last", "first"):
        found = ha.find_anchors(tokens, response, [[98, 99], [7]], occurrence=occurrence)
        finite(f"find_anchors {occurrence}", found)
    attention = torch.ones(b, t, dtype=torch.long, device=device)
    attention[:, -3:] = 0
    finite("unpadded_rows", ha.unpadded_rows(found, attention))
    # Marker texts (the find_text_anchors kernel) over a vocabulary of 20 short tokens.
    from tokenizers import Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate("x y z An s wer : Ans wer: ĠAns".split())}
    vocab.update({f"t{i}": len(vocab) + i for i in range(20 - len(vocab))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="x"))
    tok.decoder = decoders.ByteLevel()
    tokens[:, 40:43] = torch.tensor([3, 4, 5], device=device)  # "An" "s" "wer"
    tokens[:, 43] = 6  # ":"
    text = ha.text_markers(tok, ["Answer:"])
    for occurrence in ("last", "first"):
        found = ha.find_anchors(tokens, response, text, occurrence=occurrence)
        finite(f"find_anchors, text markers, {occurrence}", found)


def dapo_ops(device: str) -> None:
    b = 64
    ids = (torch.arange(b) // 8)[torch.randperm(b)].to(device)
    scores = torch.randn(b, device=device)
    finite("group_advantages (group ids)", dapo.group_advantages(scores, group_ids=ids))
    token_scores = torch.randn(b, 17, device=device)
    finite("group_advantages token-level", dapo.group_advantages(token_scores, group_size=8))
    metric = (torch.rand(b, device=device) > 0.5).float()
    finite("dynamic_sampling_mask", dapo.dynamic_sampling_mask(metric, group_ids=ids).float())
    lengths = torch.randint(0, 300, (b,), device=device)
    finite("overlong_penalty", dapo.overlong_penalty(lengths, 256, 64, 0.5))
    host_ids = dapo.group_ids_from_uids([f"p{int(i)}" for i in ids.cpu()], device=device)
    finite("group_ids_from_uids", host_ids)


def policy(device: str) -> None:
    b, t = 8, 700
    for dtype in (torch.float32, torch.bfloat16):
        logp = (-torch.rand(b, t, device=device) * 3).to(dtype)
        old = (logp.float() + (torch.rand(b, t, device=device) - 0.5) * 0.6).to(dtype)
        adv = torch.randn(b, t, device=device).to(dtype)
        mask = torch.arange(t, device=device)[None] < torch.randint(1, t, (b, 1), device=device)
        for mode in AGG_MODES:
            x = logp.clone().requires_grad_()
            value, metrics = dapo.policy_loss(
                x,
                old,
                adv,
                mask.float(),
                loss_agg_mode=mode,
                dp_size=2,
                batch_num_tokens=torch.tensor(900.0, device=device),
                global_batch_size=16.0,
            )
            value.backward()
            finite(f"policy_loss {mode} {str(dtype)[6:]}", value, x.grad, *metrics.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        status = ha.cuda_status()
        if not (torch.cuda.is_available() and status["available"]):
            print(f"no usable CUDA device: {status.get('reason') or 'torch sees no GPU'}")
            return 2
    torch.manual_seed(0)
    for part in (alignment, anchors, dapo_ops, policy):
        part(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()  # an asynchronous launch error surfaces here at the latest
    print(f"all ops ran on {args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
