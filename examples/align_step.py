"""One training step of a small causal transformer with the Hidden-Align term.

Eight prompts x four rollouts; each rollout is a random token sequence in which the answer
marker (token MARKER) appears at a random position, or not at all. The anchor is the token
right before the marker's last occurrence. The step adds `0.1 * hidden_align.loss` to a
language-model loss and prints the alignment loss, its statistics and the gradient norm. It
runs on the GPU (the CUDA kernels) when one is usable, else on the CPU.
"""

import torch
import torch.nn as nn

import hidden_align as ha

VOCAB, DIM, SEQ, PROMPTS, ROLLOUTS, MARKER = 101, 64, 48, 8, 4, 7


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        layer = nn.TransformerEncoderLayer(DIM, nhead=4, dim_feedforward=128, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, num_layers=2)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens):
        causal = nn.Transformer.generate_square_subsequent_mask(
            tokens.shape[1], device=tokens.device
        )
        hidden = self.norm(self.blocks(self.embed(tokens), mask=causal, is_causal=True))
        return hidden, self.head(hidden)


def anchors_before_marker(tokens: torch.Tensor, marker: int) -> torch.Tensor:
    """Index of the token before the marker's last occurrence per row; -1 without a marker."""
    hit = tokens == marker
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    last = torch.where(hit, positions, -1).amax(dim=1)
    return torch.where(last >= 1, last - 1, -1)


def main():
    torch.manual_seed(0)
    model = TinyLM()
    batch = PROMPTS * ROLLOUTS
    tokens = torch.randint(MARKER + 1, VOCAB, (batch, SEQ))
    has_marker = torch.rand(batch) < 0.9
    where = torch.randint(SEQ // 2, SEQ - 4, (batch,))
    tokens[has_marker, where[has_marker]] = MARKER
    rewards = torch.where(torch.rand(batch) < 0.6, 1.0, -1.0)  # DAPO scores
    uid = torch.arange(PROMPTS).repeat_interleave(ROLLOUTS)[torch.randperm(batch)]  # any order
    device = "cuda" if torch.cuda.is_available() and ha.cuda_status()["available"] else "cpu"
    model, tokens, rewards, uid = (x.to(device) for x in (model, tokens, rewards, uid))

    hidden, logits = model(tokens)
    lm_loss = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)
    )
    anchors = anchors_before_marker(tokens, MARKER)
    align, stats = ha.loss(hidden, anchors, rewards, group_ids=uid, return_stats=True)
    (lm_loss + 0.1 * align).backward()

    grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    print(
        f"hidden_align {ha.__version__}: hidden {tuple(hidden.shape)}, "
        f"{PROMPTS} prompts x {ROLLOUTS} rollouts, on {device}"
    )
    print(f"lm loss             {lm_loss.item():.4f}")
    print(f"alignment loss      {align.item():.4f}")
    print(f"mean cosine         {stats['mean_cosine'].item():.4f} (correct anchors, valid groups)")
    print(f"valid groups        {stats['valid_groups'].item()}")
    print(f"anchored correct    {stats['anchored_correct'].item()} of {batch}")
    print(f"grad norm           {grad_norm.item():.4f}")


if __name__ == "__main__":
    main()
