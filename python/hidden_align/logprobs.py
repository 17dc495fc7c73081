"""Token log-probs and entropies straight from the last hidden state: ``token_logprobs``.

``logits = hidden @ weight.T`` over a large vocabulary is the largest tensor of an RL step's
loss side (8192 tokens x 151936 x 4 bytes = 5 GB). Here tokens go in chunks: each chunk's
logits come from one matmul through torch into a buffer reused across chunks, and one pass of
our own kernel (Rust on the CPU, ``kernels/logprobs.cu`` on CUDA) reads it for the running max,
log-sum-exp, target logit and entropy. The backward recomputes each chunk's logits, turns them
in place into their gradient and hands them to two matmuls. Nothing of size ``[N, V]`` is ever
allocated.
"""

from __future__ import annotations

import math

import torch

from . import _native
from ._args import (
    accumulator,
    as_float,
    check_bool,
    check_int,
    require_tensor,
    same_device,
    saveable,
)
from ._backend import get_backend, stream_of
from ._double_backward import first_order_only
from .errors import ArgumentError, DeviceError, DtypeError, ShapeError

__all__ = ["token_logprobs"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Bytes of logits per chunk by default. On the CPU the budget counts every logit at float32's
# 4 bytes whatever the dtype, so that a chunk has as many rows in bfloat16 as in float32: a
# float32 matmul of [4096, 1024] x [1024, 32768] in chunks of 256 rows took 1275 ms against 1012
# ms in chunks of 1024 here, and each chunk's weight-gradient product is one more float32 add.
# 128 MiB keeps the peak extra memory of a step under an eighth of eager's at the benchmark's
# shape in both dtypes. On a GPU the matmuls need more rows to fill the device.
_CHUNK_BYTES = {"cpu": 128 << 20, "cuda": 512 << 20}
_MIN_TEMPERATURE = 1e-30
_NO_DOUBLE_BACKWARD = (
    b"hidden_align.token_logprobs supports first-order gradients only: its gradients cannot "
    b"be differentiated again (double backward through create_graph=True)"
)


def default_chunk_size(vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk when ``chunk_size`` is not given: the rows of logits that fit the
    device's chunk budget (128 MiB of float32 logits on the CPU whatever the dtype, 512 MiB on
    CUDA), at least 1."""
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cuda"])
    width = 4 if device.type == "cpu" else dtype.itemsize
    return max(1, budget // max(1, vocab * width))


def _chunks(h, weight, bias, chunk):
    """``(start, end, logits)`` of each chunk of rows of ``h``: ``logits = h[start:end] @
    weight.T (+ bias)``, written into one buffer reused by every chunk."""
    n = h.shape[0]
    buffer = torch.empty(min(chunk, n), weight.shape[0], dtype=h.dtype, device=h.device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        z = buffer[: e - s]
        if bias is None:
            torch.mm(h[s:e], weight.t(), out=z)
        else:
            torch.addmm(bias, h[s:e], weight.t(), out=z)
        yield s, e, z


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, want_entropy, chunk, ignore):
        n = hidden.shape[0]
        acc = accumulator(hidden.dtype)
        logprob = torch.empty(n, dtype=acc, device=hidden.device)
        # Per token the max and the log-sum of its logits, for the backward pass.
        stats = torch.empty(n, 2, dtype=acc, device=hidden.device)
        entropy = torch.empty(n, dtype=acc, device=hidden.device) if want_entropy else None
        stream = stream_of(hidden)
        h, w = hidden.detach(), weight.detach()
        b = None if bias is None else bias.detach()
        for s, e, z in _chunks(h, w, b, chunk):
            _native.token_logprobs_forward(
                z,
                targets[s:e],
                temperature,
                ignore,
                logprob[s:e],
                stats[s:e],
                None if entropy is None else entropy[s:e],
                stream,
            )
        saved = (hidden, weight, bias, targets)
        if any(ctx.needs_input_grad):
            # Inference tensors (a frozen head, targets made under inference_mode) as copies.
            saved = tuple(saveable(t) for t in saved)
        ctx.save_for_backward(*saved, stats, entropy)
        ctx.options = (temperature, chunk, ignore)
        ctx.set_materialize_grads(False)
        return (logprob, entropy) if want_entropy else logprob

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy=None):
        with torch.no_grad():
            grads = _TokenLogprobs._gradients(ctx, grad_logprob, grad_entropy)
        # create_graph=True: first-order values stay exact, but differentiating them again
        # must fail loudly rather than silently treat these gradients as constants.
        grads = first_order_only(_NO_DOUBLE_BACKWARD, grads, ctx.saved_tensors[:3])
        return (*grads, None, None, None, None, None)

    @staticmethod
    def _gradients(ctx, grad_logprob, grad_entropy):
        """The gradients w.r.t. hidden, weight and bias, chunk by chunk."""
        hidden, weight, bias, targets, stats, entropy = ctx.saved_tensors
        temperature, chunk, ignore = ctx.options
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logprob is None and grad_entropy is None:
            return None, None, None
        vocab = weight.shape[0]
        h, w = hidden.detach(), weight.detach()
        b = None if bias is None else bias.detach()
        acc = accumulator(weight.dtype)
        grad_h = torch.empty_like(h) if need_h else None
        # Weight and bias gradients accumulate over chunks in float32 (float64 for float64);
        # for half-precision weights each chunk's product is rounded once, then summed in f32.
        grad_w = torch.zeros(weight.shape, dtype=acc, device=w.device) if need_w else None
        partial = torch.empty_like(w) if need_w and w.dtype != acc else None
        grad_b = torch.zeros(vocab, dtype=acc, device=w.device) if need_b else None
        stream = stream_of(hidden)
        for s, e, z in _chunks(h, w, b, chunk):
            _native.token_logprobs_backward(
                z,
                targets[s:e],
                temperature,
                ignore,
                stats[s:e],
                None if entropy is None else entropy[s:e],
                None if grad_logprob is None else grad_logprob[s:e].detach(),
                None if grad_entropy is None else grad_entropy[s:e].detach(),
                stream,
            )
            if need_h:
                torch.mm(z, w, out=grad_h[s:e])
            if need_w:
                if partial is None:
                    grad_w.addmm_(z.t(), h[s:e])
                else:
                    torch.mm(z.t(), h[s:e], out=partial)
                    if partial.device.type == "cpu":
                        _native.accumulate_f32(grad_w, partial)
                    else:
                        grad_w.add_(partial)
            if need_b:
                grad_b.add_(z.sum(dim=0, dtype=acc))
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b


def _check(hidden, weight, targets, bias, temperature, chunk_size, ignore_index):
    require_tensor("hidden", hidden)
    require_tensor("weight", weight)
    require_tensor("targets", targets)
    require_tensor("bias", bias, optional=True)
    if hidden.dtype not in _FLOATS:
        raise DtypeError(
            f"hidden: expected dtype float32, bfloat16, float16 or float64, got {hidden.dtype}"
        )
    if weight.dtype != hidden.dtype:
        raise DtypeError(
            f"weight: expected the dtype of hidden ({hidden.dtype}), got {weight.dtype}"
        )
    if bias is not None and bias.dtype != hidden.dtype:
        raise DtypeError(f"bias: expected the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
    if targets.dtype != torch.int64:
        raise DtypeError(f"targets: expected dtype int64, got {targets.dtype}")
    if hidden.dim() not in (2, 3):
        raise ShapeError(f"hidden: expected shape [N, H] or [B, T, H], got {list(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ShapeError(
            f"weight: expected shape [V, H] with V >= 1 and H = {hidden.shape[-1]} (the last "
            f"dimension of hidden), got {list(weight.shape)}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ShapeError(
            f"targets: expected shape {list(hidden.shape[:-1])} (hidden without its last "
            f"dimension), got {list(targets.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ShapeError(f"bias: expected shape [{weight.shape[0]}], got {list(bias.shape)}")
    if hidden.device.type not in ("cpu", "cuda"):
        raise DeviceError(f"hidden: expected a tensor on cpu or cuda, got one on {hidden.device}")
    same_device(("hidden", hidden), ("weight", weight), ("targets", targets), ("bias", bias))
    if hidden.dtype == torch.float64 and (hidden.is_cuda or get_backend() == "cuda-emulated"):
        raise DtypeError(
            "hidden: expected float32, bfloat16 or float16 on the CUDA kernels (float64 runs on "
            "the CPU backend only), got torch.float64"
        )
    temperature = as_float("temperature", temperature)
    # Its inverse scales the logits in float32: it must be a float32 number.
    if not (math.isfinite(temperature) and temperature >= _MIN_TEMPERATURE):
        raise ArgumentError(
            f"temperature: expected a finite number >= {_MIN_TEMPERATURE:g}, got {temperature}"
        )
    check_int("chunk_size", chunk_size)
    if chunk_size is not None and chunk_size < 1:
        raise ArgumentError(f"chunk_size: expected an int >= 1, got {chunk_size}")
    check_int("ignore_index", ignore_index, optional=False)
    return temperature


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    ignore_index: int = -100,
):
    """Log-probabilities of ``targets`` (and the entropy per token) under
    ``softmax((hidden @ weight.T + bias) / temperature)``, without materialising the logits.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]``: the last hidden state (float32, bfloat16, float16
            or float64), any strides.
        weight: ``[V, H]``, the LM head (tied embeddings work), the dtype of ``hidden``.
        targets: int64, the shape of ``hidden`` without its last dimension (``[N]``, ``[B, T]``):
            the token whose log-prob is wanted at each position, e.g. the input ids shifted by
            one. ``ignore_index`` gives log-prob 0, entropy 0 and no gradient. Any other value
            outside ``[0, V)`` raises :class:`ArgumentError` on the CPU; on CUDA it makes that
            token's results NaN (no host synchronisation, like the other data-dependent checks).
        bias: optional ``[V]`` bias of the LM head.
        temperature: the logits are divided by it (verl's rollout temperature), finite,
            at least 1e-30 (its inverse scales the logits in float32).
        return_entropy: also return the entropy of each token's distribution.
        chunk_size: tokens per chunk (default: as many as fit 128 MiB of float32 logits on
            the CPU, 64 MiB of bfloat16 ones, and 512 MiB on CUDA). Peak extra memory is one
            chunk of logits plus the outputs.
        ignore_index: the target value of positions to skip (padding), default -100.

    Returns:
        log-probs shaped like ``targets``, float32 (float64 for float64 ``hidden``); with
        ``return_entropy=True`` a tuple ``(log-probs, entropy)``. Both are differentiable
        w.r.t. ``hidden``, ``weight`` and ``bias``: the backward recomputes each chunk's logits.

    float64 runs on the CPU backend only (``DtypeError`` on the CUDA kernels). The gradient is
    first-order only: differentiating it again raises.

    Each chunk's logits come from one matmul in the dtype of ``hidden`` (cuBLAS or the CPU
    BLAS: for bfloat16 they are rounded to bfloat16, as in an eager ``hidden @ weight.T``); our
    pass reads them and accumulates in float32. NaN or inf in a token's logits makes that
    token's results NaN; ``-inf`` entries (a masked vocabulary through ``bias``) have
    probability 0. The weight gradient accumulates over chunks in float32.

    Example:
        >>> hidden = torch.randn(2, 5, 16, requires_grad=True)
        >>> lm_head = torch.randn(100, 16, requires_grad=True)
        >>> ids = torch.randint(0, 100, (2, 5))
        >>> logp, ent = token_logprobs(hidden, lm_head, ids, return_entropy=True)
        >>> (logp.sum() + 0.01 * ent.sum()).backward()
        >>> logp.shape, ent.shape
        (torch.Size([2, 5]), torch.Size([2, 5]))
    """
    temperature = _check(hidden, weight, targets, bias, temperature, chunk_size, ignore_index)
    return_entropy = check_bool("return_entropy", return_entropy)
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    chunk = chunk_size or default_chunk_size(weight.shape[0], hidden.dtype, hidden.device)
    if h.shape[0] == 0:
        # No token: an empty result, still attached to the graph of every input.
        acc = accumulator(hidden.dtype)
        attached = hidden.sum() + weight.sum() + (0 if bias is None else bias.sum())
        empty = attached.to(acc) * torch.zeros(shape, dtype=acc, device=hidden.device)
        return (empty, empty.clone()) if return_entropy else empty
    out = _TokenLogprobs.apply(
        h, weight, bias, t, temperature, return_entropy, chunk, int(ignore_index)
    )
    if return_entropy:
        return out[0].view(shape), out[1].view(shape)
    return out.view(shape)
