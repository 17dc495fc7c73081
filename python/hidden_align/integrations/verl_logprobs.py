"""verl 0.9.1's fused log-prob path on :func:`hidden_align.token_logprobs` (opt-in).

With ``actor_rollout_ref.model.use_fused_kernels=True`` (and the default ``torch`` backend of
``fused_kernel_options.impl_backend``), verl's patched model forward hands the last hidden
state, the LM head's weight and the shifted input ids to
``verl.utils.experimental.torch_functional.FusedLinearForPPO``, which computes the token
log-probs and entropies in chunks of 512 tokens with eager PyTorch ops (six passes over each
float32 chunk of logits forward, more backward). :func:`patch` replaces that module's
``forward`` on the class with :func:`hidden_align.token_logprobs`: the same contract
(``(log_probs, entropy)`` shaped like the ids, float32 log-probs), one pass of our kernel per
chunk each way, and float32 entropies (verl's are rounded to the model's dtype). verl's Liger
backend (``impl_backend=liger``) is left alone.

Turned on by ``HIDDEN_ALIGN_FUSED_LOGPROBS=1`` (see :mod:`hidden_align.integrations.verl`).
"""

from __future__ import annotations

import torch
from verl.utils.experimental import torch_functional

import hidden_align as ha

__all__ = ["patch", "unpatch"]

_ORIGINAL = "_hidden_align_original_forward"


def fused_forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
    """``FusedLinearForPPO.forward`` through :func:`hidden_align.token_logprobs`."""
    if getattr(self, "impl_backend", "torch") != "torch":
        return getattr(type(self), _ORIGINAL)(
            self, hidden_states, vocab_weights, input_ids, temperature
        )
    return ha.token_logprobs(
        hidden_states,
        vocab_weights,
        input_ids.to(torch.int64),
        temperature=float(temperature),
        return_entropy=True,
    )


def patch() -> None:
    """Routes verl's ``FusedLinearForPPO`` (torch backend) through ours. Idempotent."""
    cls = torch_functional.FusedLinearForPPO
    if _ORIGINAL not in cls.__dict__:
        setattr(cls, _ORIGINAL, cls.forward)
        cls.forward = fused_forward


def unpatch() -> None:
    """Restores verl's own ``FusedLinearForPPO.forward``."""
    cls = torch_functional.FusedLinearForPPO
    if _ORIGINAL in cls.__dict__:
        cls.forward = cls.__dict__[_ORIGINAL]
        delattr(cls, _ORIGINAL)
