"""Supervised warm-up and the DAPO loop, with or without the alignment term.

One RL step: P prompts x G rollouts sampled from the policy, the verifiable reward (+1 / -1, as
DAPO's scores) plus overlong shaping, dynamic sampling (groups whose rollouts all agree are
dropped), group advantages, then a no-grad pass over the kept rollouts for the old log-probs
that also collects the anchor statistics of each micro-batch, and one optimiser step over
shuffled micro-batches whose alignment shares (``reference=``) add up to the full-batch loss.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

import hidden_align as ha

from .model import TinyLM, generate, response_log_probs
from .task import Problems, prompt_text, verify, worked_trace
from .tokenizer import Codec


@dataclass
class Setup:
    """What both arms share: the task, the tokenizer and the sequence sizes."""

    codec: Codec
    problems: Problems
    prompt_len: int
    max_response: int
    overlong_buffer: int
    device: torch.device

    @classmethod
    def create(cls, args, device: torch.device) -> Setup:
        codec = Codec()
        problems = Problems(args.digits, args.eval_size, args.seed)
        top = 10**args.digits - 1
        prompt_len = len(codec.encode(prompt_text(top, top)))
        longest = max(len(codec.encode(worked_trace(top, top, v))) for v in range(4)) + 1
        # DAPO's soft overlong punishment starts past the longest correct response.
        buffer = args.overlong_buffer
        return cls(codec, problems, prompt_len, longest + buffer, buffer, device)

    def prompts(self, pairs: list) -> torch.Tensor:
        ids = [self.codec.encode(prompt_text(a, b)) for a, b in pairs]
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def targets(self, pairs: list, rng: random.Random) -> torch.Tensor:
        """Worked traces (a random correct variant each) + eos, padded to ``max_response``."""
        rows = []
        for a, b in pairs:
            ids = self.codec.encode(worked_trace(a, b, rng.randrange(4))) + [self.codec.eos]
            rows.append(ids + [self.codec.pad] * (self.max_response - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def correct(self, pairs: list, responses: torch.Tensor) -> torch.Tensor:
        """1.0 where the response ends (eos) and its answer verifies, else 0.0; ``[len]``."""
        acc = []
        for (a, b), row in zip(pairs, responses.tolist()):
            text, ended = self.codec.decode_response(row)
            acc.append(1.0 if ended and verify(text, a + b) else 0.0)
        return torch.tensor(acc, device=self.device)

    def anchors(self, prompts: torch.Tensor, responses: torch.Tensor, lengths: torch.Tensor):
        """Full sequences, response mask and anchor index (into the full sequence) per row."""
        ids = torch.cat([prompts, responses], 1)
        cols = torch.arange(responses.shape[1], device=self.device)
        mask = (cols[None] < lengths[:, None]).float()
        in_response = torch.cat([torch.zeros_like(prompts), mask.long()], 1)
        return ids, mask, ha.find_anchors(ids, in_response, self.codec.markers)

    def model(self, args) -> TinyLM:
        return TinyLM(
            self.codec.vocab_size,
            args.d_model,
            args.layers,
            args.heads,
            self.prompt_len + self.max_response,
        ).to(self.device)


def warmup(model: TinyLM, setup: Setup, args, rng: random.Random, on_step) -> list:
    """Supervised fine-tuning on worked traces; returns the loss per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.warmup_lr, weight_decay=0.0)
    losses = []
    for _ in range(args.warmup_steps):
        pairs = setup.problems.train(args.warmup_batch, rng)
        prompts, targets = setup.prompts(pairs), setup.targets(pairs, rng)
        logits, _, _ = model(torch.cat([prompts, targets], 1))
        lp = response_log_probs(logits, targets)
        mask = (targets != setup.codec.pad).float()
        loss = -(lp * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        on_step()
    return losses


class _Timer:
    """Wall time of the alignment term: its forward calls, and its backward node (timed with
    hooks around the autograd node, which runs inside the shared ``backward()``)."""

    def __init__(self):
        self.seconds = 0.0
        self._start = 0.0

    def forward(self, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        self.seconds += time.perf_counter() - t
        return out

    def watch_backward(self, value: torch.Tensor) -> None:
        node = value.grad_fn
        if node is None:
            return
        node.register_prehook(self._pre)
        node.register_hook(self._post)

    def _pre(self, grad_outputs):
        self._start = time.perf_counter()

    def _post(self, grad_inputs, grad_outputs):
        self.seconds += time.perf_counter() - self._start


def rl_step(model, opt, setup: Setup, args, align_weight: float, rng, gen) -> dict:
    """One DAPO step; returns its metrics (floats, NaN where undefined)."""
    t0 = time.perf_counter()
    timer = _Timer()
    nan = float("nan")
    g = args.group_size
    pairs = setup.problems.train(args.prompts_per_step, rng)
    prompts = setup.prompts(pairs).repeat_interleave(g, 0)
    rollout_pairs = [p for p in pairs for _ in range(g)]
    gid = torch.arange(len(pairs), device=setup.device).repeat_interleave(g)
    model.eval()
    responses, lengths = generate(
        model,
        prompts,
        setup.max_response,
        setup.codec.eos,
        setup.codec.pad,
        args.temperature,
        gen,
    )
    acc = setup.correct(rollout_pairs, responses)
    score = 2.0 * acc - 1.0
    score = score + ha.dapo.overlong_penalty(
        lengths, setup.max_response, setup.overlong_buffer, args.overlong_factor
    )
    keep = ha.dapo.dynamic_sampling_mask(acc, group_ids=gid)
    rec = {
        "reward": float(score.mean()),
        "accuracy": float(acc.mean()),
        "response_length": float(lengths.float().mean()),
        "kept_groups": int(keep.sum()) // g,
        "anchored": float((setup.anchors(prompts, responses, lengths)[2] >= 0).float().mean()),
    }
    idx = keep.nonzero().squeeze(1)
    rec.update(pg_loss=nan, align_loss=nan, anchor_cosine=nan, clipfrac=nan)
    if idx.numel() == 0:
        rec.update(seconds=time.perf_counter() - t0, align_seconds=0.0)
        return rec
    prompts, responses, lengths = prompts[idx], responses[idx], lengths[idx]
    acc, score, gid = acc[idx], score[idx], gid[idx]
    adv = ha.dapo.group_advantages(score, group_ids=gid)
    ids, mask, anchors = setup.anchors(prompts, responses, lengths)
    micro = torch.arange(idx.numel(), device=setup.device).split(args.micro_batch)
    use_align = align_weight > 0
    old, parts = torch.empty_like(mask), []
    with torch.no_grad():
        for mb in micro:
            logits, hidden, _ = model(ids[mb])
            old[mb] = response_log_probs(logits, responses[mb])
            # The anchor statistics come from the pass that computes old log-probs anyway; the
            # baseline collects them too (as a diagnostic), untimed.
            collect = timer.forward if use_align else (lambda f, *a, **k: f(*a, **k))
            parts.append(
                collect(ha.group_anchor_stats, hidden, anchors[mb], acc[mb], group_ids=gid[mb])
            )
    stats = parts[0].merge(*parts[1:])
    rec["anchor_cosine"] = float(stats.mean_cosine)
    if use_align:
        ref = timer.forward(stats.rows, gid, loss_type=args.loss_type)
    model.train()
    opt.zero_grad(set_to_none=True)
    tokens = mask.sum()
    pg_total, align_total, clip = 0.0, 0.0, 0.0
    perm = torch.randperm(idx.numel(), generator=gen, device=setup.device)
    for mb in perm.split(args.micro_batch):
        logits, hidden, _ = model(ids[mb])
        lp = response_log_probs(logits, responses[mb])
        pg, metrics = ha.dapo.policy_loss(lp, old[mb], adv[mb], mask[mb], batch_num_tokens=tokens)
        loss = pg
        if use_align:
            align = timer.forward(
                ha.loss,
                hidden,
                anchors[mb],
                acc[mb],
                group_ids=gid[mb],
                loss_type=args.loss_type,
                reference=ref[mb],
            )
            timer.watch_backward(align)
            loss = loss + align_weight * align
            align_total += float(align.detach())
        loss.backward()
        pg_total += float(pg.detach())
        clip += float(metrics["pg_clipfrac"]) * float(mask[mb].sum())
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    opt.step()
    rec.update(pg_loss=pg_total, clipfrac=clip / float(tokens))
    rec["align_loss"] = align_total if use_align else nan
    rec.update(seconds=time.perf_counter() - t0, align_seconds=timer.seconds)
    return rec
