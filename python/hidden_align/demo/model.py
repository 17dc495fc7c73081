"""A small causal transformer in plain torch, with sampling through a key/value cache.

``forward`` returns the logits and the last hidden state (after the final layer norm, the input
of the LM head: what ``out.hidden_states[-1]`` is for a Hugging Face Llama or Qwen model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor, cache: tuple | None = None) -> tuple:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        # New tokens attend to every cached one; among themselves causally. With a cache the
        # demo only feeds one token at a time, which needs no mask.
        causal = cache is None and t > 1
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        x = x + self.mlp(self.ln2(x))
        return x, (k, v)


class TinyLM(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_layer: int, n_head: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, ids: torch.Tensor, caches: list | None = None, start: int = 0) -> tuple:
        """``(logits [B, T, V], hidden [B, T, d], caches)`` for tokens at ``start, start+1...``"""
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(pos)
        new = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if caches is None else caches[i])
            new.append(kv)
        hidden = self.ln_f(x)
        return self.head(hidden), hidden, new


@torch.no_grad()
def generate(
    model: TinyLM,
    prompts: torch.Tensor,
    max_new: int,
    eos: int,
    pad: int,
    temperature: float,
    generator: torch.Generator | None,
) -> tuple:
    """Responses ``[B, max_new]`` (``pad`` after ``eos``) and their lengths (``eos`` included;
    ``max_new`` for a response cut off without one). ``temperature`` 0 is greedy."""
    batch, start = prompts.shape
    logits, _, caches = model(prompts)
    out = torch.full((batch, max_new), pad, dtype=torch.long, device=prompts.device)
    lengths = torch.full((batch,), max_new, dtype=torch.long, device=prompts.device)
    done = torch.zeros(batch, dtype=torch.bool, device=prompts.device)
    last = logits[:, -1]
    for t in range(max_new):
        if temperature > 0:
            probs = torch.softmax(last.float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = last.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        out[:, t] = nxt
        ended = ~done & (nxt == eos)
        lengths = torch.where(ended, torch.full_like(lengths, t + 1), lengths)
        done = done | ended
        if t + 1 == max_new or bool(done.all()):
            break
        logits, _, caches = model(nxt[:, None], caches, start + t)
        last = logits[:, -1]
    return out, lengths


def response_log_probs(logits: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[B, L]`` of the response tokens; ``logits`` are those of the whole
    sequence ``[B, P + L, V]``."""
    length = responses.shape[1]
    pred = logits[:, -length - 1 : -1].float()
    return torch.log_softmax(pred, -1).gather(-1, responses[..., None]).squeeze(-1)
