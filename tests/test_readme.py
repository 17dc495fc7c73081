"""Every ```python block of README.md runs: on the CPU, and again on a GPU when there is one.

A README snippet is a fragment of a training step: it uses what a real loop has at that point
(the output ``out`` of a model forward, ``log_prob``, verl's ``data``, ...). ``fixtures(device)``
builds those names from small real tensors and a tiny causal LM laid out as verl lays out a
batch (left-padded prompts, then right-padded responses containing the answer marker once,
twice or not at all). A snippet runs in that namespace and must not raise; then every loss it
computed must be finite, backward (the snippet's own, or ``loss.backward()``) must reach every
parameter of the model with finite values, and anchors it computed must be the token before
the marker's last occurrence (checked against a plain Python scan of the token ids).
"""

from __future__ import annotations

import pathlib
import re
import types

import numpy as np
import pytest
import torch

import hidden_align as ha

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list:
    """``pytest.param(code, id=<section>-<n>)`` for each ```python block of the README; the code
    is preceded by blank lines so that a traceback names the README's own line numbers."""
    text = README.read_text()
    params = []
    for n, match in enumerate(re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)):
        headings = re.findall(r"^## (.+)$", text[: match.start()], flags=re.M)
        section = re.sub(r"\W+", "-", headings[-1] if headings else "top").strip("-").lower()
        code = "\n" * text.count("\n", 0, match.start(1)) + match.group(1)
        params.append(pytest.param(code, id=f"{section}-{n}"))
    return params


SNIPPETS = _snippets()
PROMPTS, ROLLOUTS, PROMPT_LEN, RESPONSE_LEN, VOCAB, DIM = 3, 4, 5, 12, 50, 16
PAD = 0
MARKER = [5, 6]  # the answer marker's token ids, as tokenizer.encode("Answer:") would give


class TinyCausalLM(torch.nn.Module):
    """Stands in for a Hugging Face causal LM: ``model(input_ids, attention_mask=...,
    output_hidden_states=True)`` returns ``.logits`` and ``.hidden_states`` (embeddings and the
    last layer, which also feeds the LM head)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.mix = torch.nn.Linear(DIM, DIM)
        self.lm_head = torch.nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
        x = self.embed(input_ids)
        if attention_mask is not None:
            x = x * attention_mask[..., None].to(x.dtype)
        h = torch.tanh(self.mix(x.cumsum(1)))  # causal: position t sees the tokens up to t
        return types.SimpleNamespace(
            logits=self.lm_head(h), hidden_states=(x, h) if output_hidden_states else None
        )


def marker_anchors(responses: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """The expected anchors (index into T), by a plain scan: -1 without a marker."""
    k, out = len(MARKER), []
    for row in responses.tolist():
        starts = [j for j in range(len(row) - k + 1) if row[j : j + k] == MARKER]
        out.append(prompt_length + starts[-1] - 1 if starts else -1)
    return torch.tensor(out)


def fixtures(device) -> dict:
    """The names README snippets use, on ``device``; see the module docstring."""
    gen = torch.Generator().manual_seed(0)
    batch = PROMPTS * ROLLOUTS
    model = TinyCausalLM()
    prompt_lengths = torch.randint(2, PROMPT_LEN + 1, (batch,), generator=gen)
    prompt_mask = torch.arange(PROMPT_LEN) >= PROMPT_LEN - prompt_lengths[:, None]  # left pad
    prompts = torch.randint(len(MARKER) + 5, VOCAB, (batch, PROMPT_LEN), generator=gen)
    response_lengths = torch.randint(6, RESPONSE_LEN + 1, (batch,), generator=gen)
    response_mask = torch.arange(RESPONSE_LEN) < response_lengths[:, None]  # right pad
    responses = torch.randint(len(MARKER) + 5, VOCAB, (batch, RESPONSE_LEN), generator=gen)
    for b in range(batch):  # the marker b % 3 times (0, 1 or 2), inside the response
        for _ in range(b % 3):
            j = int(
                torch.randint(0, int(response_lengths[b]) - len(MARKER) + 1, (1,), generator=gen)
            )
            responses[b, j : j + len(MARKER)] = torch.tensor(MARKER)
    prompts[~prompt_mask] = PAD
    responses[~response_mask] = PAD
    input_ids = torch.cat([prompts, responses], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1).long()
    uid = np.array([f"prompt-{i}" for i in range(PROMPTS) for _ in range(ROLLOUTS)], dtype=object)
    order = torch.randperm(batch, generator=gen).numpy()  # verl reorders rows
    uid, input_ids, attention_mask = uid[order], input_ids[order], attention_mask[order]
    responses, response_mask = responses[order], response_mask[order]
    acc = (torch.rand(batch, generator=gen) < 0.7).float()

    model, input_ids, attention_mask, responses, response_mask, acc = (
        t.to(device) for t in (model, input_ids, attention_mask, responses, response_mask, acc)
    )
    out = model(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    logits = out.logits[:, PROMPT_LEN - 1 : -1]
    log_prob = torch.log_softmax(logits, -1).gather(-1, responses[..., None]).squeeze(-1)
    old_log_prob = log_prob.detach() + 0.1 * torch.randn(log_prob.shape, generator=gen).to(device)
    gid = ha.dapo.group_ids_from_uids(uid)  # on the CPU, as verl's uids give them
    advantages = ha.dapo.group_advantages(acc, group_ids=gid.to(device))
    world_size = 2
    return {
        "ha": ha,
        "torch": torch,
        "model": model,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "responses": responses,
        "marker_ids": list(MARKER),
        "response_mask": response_mask,
        "out": out,
        "log_prob": log_prob,
        "old_log_prob": old_log_prob,
        "anchor_index": marker_anchors(responses, PROMPT_LEN).to(device),
        "rewards": 2 * acc - 1,  # DAPO scores
        "scores": 2 * acc - 1,
        "gid": gid,
        "advantages": advantages[:, None] * response_mask,  # verl broadcasts them over T
        # verl's data.batch is a TensorDict on the device; non_tensor_batch holds numpy arrays
        "data": types.SimpleNamespace(batch={"acc": acc}, non_tensor_batch={"uid": uid}),
        "global_tokens": int(response_mask.sum()) * world_size,
        "world_size": world_size,
        "align_coef": 0.1,
    }


def run_snippet(code: str, device) -> None:
    ns = fixtures(device)
    exec(compile(code, str(README), "exec"), ns)
    for name in ("align", "pg", "loss"):
        value = ns.get(name)
        if isinstance(value, torch.Tensor):
            assert value.device.type == torch.device(device).type, name
            assert torch.isfinite(value).all(), f"{name} = {value}"
    params = list(ns["model"].parameters())
    if all(p.grad is None for p in params) and isinstance(ns.get("loss"), torch.Tensor):
        ns["loss"].backward()
    for name, p in ns["model"].named_parameters():
        assert p.grad is not None, f"backward did not reach {name}"
        assert torch.isfinite(p.grad).all(), name
    if isinstance(ns.get("anchors"), torch.Tensor):
        expected = marker_anchors(ns["responses"].cpu(), PROMPT_LEN)
        assert (expected >= 0).any() and (expected < 0).any()  # the fixture has both kinds
        assert torch.equal(ns["anchors"].cpu(), expected)


def test_readme_has_python_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("code", SNIPPETS)
def test_readme_snippet_cpu(code):
    run_snippet(code, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(
    not (torch.cuda.is_available() and ha.cuda_status()["available"]),
    reason="no usable CUDA device",
)
@pytest.mark.parametrize("code", SNIPPETS)
def test_readme_snippet_cuda(code):
    run_snippet(code, "cuda")
    torch.cuda.synchronize()
