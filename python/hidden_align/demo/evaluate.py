"""Held-out evaluation: pass@1 greedy and sampled, and the anchor cosine of correct rollouts."""

from __future__ import annotations

import torch

import hidden_align as ha

from .model import TinyLM, generate


@torch.no_grad()
def evaluate(model: TinyLM, setup, args, seed: int) -> dict:
    """Metrics on the held-out problems.

    ``pass1_greedy``: fraction solved by greedy decoding. ``pass1_sampled``: mean accuracy of
    ``eval_samples`` rollouts per problem at the training temperature. ``anchor_cosine``: mean
    pairwise cosine of the anchor hidden states of the correct sampled rollouts of each problem
    (over problems with at least two), from ``ha.group_anchor_stats``; NaN when no problem has
    two. The sampling generator is seeded by ``seed`` alone, so every evaluation (both arms,
    every step) draws the same random numbers: differences come from the models.
    """
    model.eval()
    pairs = setup.problems.held_out
    prompts = setup.prompts(pairs)
    codec = setup.codec
    greedy, _ = generate(model, prompts, setup.max_response, codec.eos, codec.pad, 0.0, None)
    pass_greedy = float(setup.correct(pairs, greedy).mean())

    k = args.eval_samples
    gen = torch.Generator(device=setup.device).manual_seed(seed)
    rep = prompts.repeat_interleave(k, 0)
    sampled, lengths = generate(
        model, rep, setup.max_response, codec.eos, codec.pad, args.temperature, gen
    )
    acc = setup.correct([p for p in pairs for _ in range(k)], sampled)
    gid = torch.arange(len(pairs), device=setup.device).repeat_interleave(k)
    ids, _, anchors = setup.anchors(rep, sampled, lengths)
    parts = []
    for mb in torch.arange(len(gid), device=setup.device).split(max(args.micro_batch, 64)):
        _, hidden, _ = model(ids[mb])
        parts.append(ha.group_anchor_stats(hidden, anchors[mb], acc[mb], group_ids=gid[mb]))
    stats = parts[0].merge(*parts[1:])
    return {
        "pass1_greedy": pass_greedy,
        "pass1_sampled": float(acc.mean()),
        "anchor_cosine": float(stats.mean_cosine),
    }
