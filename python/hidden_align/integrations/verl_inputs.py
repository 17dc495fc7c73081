"""What the verl alignment term reads: the hooked module, and from a verl micro-batch the
anchors (as rows of the captured hidden states), the groups and the correctness.

A verl micro-batch is in verl's no-padding layout (``left_right_2_no_padding``): ``input_ids``
is nested over prompt + response (the packed model input concatenates these sequences);
``prompts``, ``responses``, ``response_mask`` are padded ``[b, width]`` tensors in the default
trainer and nested in verl's V1 trainer; ``uid`` and the reward manager's extra fields (such as
``acc``) are non-tensor lists.
"""

from __future__ import annotations

import torch
from verl.utils import tensordict_utils as tu

import hidden_align as ha

from ._layers import first_tensor, hook_target
from ._markers import resolve_markers as _resolve
from .verl_settings import Settings

__all__ = ["anchor_inputs", "first_tensor", "hook_target", "resolve_markers"]


# ---- markers, anchors, groups, correctness ---------------------------------------------------


def resolve_markers(markers: tuple, tokenizer):
    """The ``markers`` of :func:`hidden_align.find_anchors`: strings matched as text under
    ``tokenizer`` (:func:`hidden_align.text_markers`: found however it merges them with their
    neighbours), id tuples token for token.

    Args:
        markers: strings and/or token-id tuples (:attr:`Settings.markers`).
        tokenizer: the actor's tokenizer, or None when every marker is given as ids.
    """
    try:
        return _resolve(markers, tokenizer, "HIDDEN_ALIGN_MARKERS")
    except ha.ArgumentError as exc:
        raise RuntimeError(f"hidden_align: {exc}") from exc


def _padded(t: torch.Tensor) -> torch.Tensor:
    return t.to_padded_tensor(0) if t.is_nested else t


def _response_lengths(data) -> torch.Tensor:
    """Response tokens of each rollout inside the packed sequence (the rule of verl's
    ``no_padding_2_padding``: nested prompts/responses give their own lengths, padded ones
    the attention mask over the response columns)."""
    prompts, responses = data["prompts"], data["responses"]
    if prompts.is_nested:
        return responses.offsets().diff()
    return data["attention_mask"][:, prompts.shape[1] :].sum(1)


def _correctness(data, key: str, device) -> tuple:
    """``(float32 [b], source)`` from ``key``, else from ``rm_scores`` summed per rollout."""
    for name in dict.fromkeys((key, "rm_scores")):
        if name not in data.keys():
            continue
        value = tu.get(data, name)
        if isinstance(value, torch.Tensor):
            value = _padded(value)
            value = value.sum(-1) if value.dim() == 2 else value
            return value.to(device=device, dtype=torch.float32), name
        values = torch.tensor([float(v) for v in value], dtype=torch.float32)
        return values.to(device, non_blocking=True), name
    raise RuntimeError(
        f"hidden_align: the batch has neither {key!r} nor 'rm_scores' to tell correct rollouts "
        "(set HIDDEN_ALIGN_CORRECT to the key your reward manager writes)"
    )


def anchor_inputs(
    data, markers: list, settings: Settings, packed: bool, hidden: torch.Tensor
) -> dict:
    """The arguments of ``hidden_align.loss`` for one verl micro-batch.

    Args:
        data: the micro-batch (a ``TensorDict`` in verl's no-padding layout).
        markers: the markers (:func:`resolve_markers`).
        settings: offset, occurrence and correctness key.
        packed: whether ``hidden`` is the packed ``[N, H]`` (remove-padding) or the padded
            ``[b, T, H]`` states (each sequence left-aligned).
        hidden: the captured hidden states (for their device).

    Returns:
        A dict: ``rows`` (int64 ``[b]``: anchor rows of packed ``hidden`` or positions in
        ``T``; -1 for none), ``cu`` (the packed offsets, or None), ``gid`` (int64 group ids
        from the uids, on the CPU), ``correct`` (float32 ``[b]``) and ``source`` (the key
        the correctness came from).
    """
    input_ids = data["input_ids"]
    if not input_ids.is_nested:
        raise RuntimeError(
            "hidden_align: expected verl's no-padding micro-batch (nested input_ids)"
        )
    device = hidden.device
    offsets = input_ids.offsets().to(device)
    seq_len = offsets.diff()
    start = ha.find_anchors(
        _padded(data["responses"]),
        _padded(data["response_mask"]),
        markers,
        occurrence=settings.occurrence,
        offset=0,
    ).to(device)
    # The response fills the end of each sequence; the anchor may fall before it (offset -1
    # of a marker that opens the response is the last prompt token).
    pos = seq_len - _response_lengths(data).to(device) + start + settings.offset
    ok = (start >= 0) & (pos >= 0) & (pos < seq_len)
    none = torch.full_like(pos, -1)
    if packed:
        rows, cu = torch.where(ok, offsets[:-1] + pos, none), offsets
    else:
        rows, cu = torch.where(ok, pos, none), None
    uids = tu.get(data, "uid")
    if uids is None:
        raise RuntimeError("hidden_align: the batch has no 'uid' (verl's prompt id per rollout)")
    correct, source = _correctness(data, settings.correct_key, device)
    gid = ha.dapo.group_ids_from_uids(uids)
    return dict(rows=rows, cu=cu, gid=gid, correct=correct, source=source)
