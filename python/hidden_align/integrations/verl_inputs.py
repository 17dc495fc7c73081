"""What the verl alignment term reads: the hooked module, and from a verl micro-batch the
anchors (as rows of the captured hidden states), the groups and the correctness.

A verl micro-batch is in verl's no-padding layout (``left_right_2_no_padding``): ``input_ids``
is nested over prompt + response (the packed model input concatenates these sequences);
``prompts``, ``responses``, ``response_mask`` are padded ``[b, width]`` tensors in the default
trainer and nested in verl's V1 trainer; ``uid`` is a non-tensor list. The reward manager's extra
info (such as ``acc``) is a non-tensor key of its own in the default trainer; in the V1 trainer
it stays inside each rollout's ``extra_fields["reward_extra_info"]`` (verl's agent loop stores
the whole ``extra_fields`` dict per rollout), unless a colocated reward model wrote it back as
keys of their own. :func:`_correctness` reads both.
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


def _values(value, device) -> torch.Tensor:
    """float32 ``[b]`` from a tensor (``[b, T]`` summed over T, nested padded first) or a list."""
    if isinstance(value, torch.Tensor):
        value = _padded(value)
        value = value.sum(-1) if value.dim() == 2 else value
        return value.to(device=device, dtype=torch.float32)
    values = torch.tensor([float(v) for v in value], dtype=torch.float32)
    return values.to(device, non_blocking=True)


def _extra_info_values(data, key: str) -> list:
    """``extra_fields[i]["reward_extra_info"][key]`` of every rollout; raises naming the key and
    the first rollouts without it."""
    rows = tu.get(data, "extra_fields")
    values, missing = [], []
    for i, fields in enumerate(rows):
        info = fields.get("reward_extra_info") if isinstance(fields, dict) else None
        if isinstance(info, dict) and key in info:
            values.append(info[key])
        else:
            missing.append(i)
    if missing:
        uids = tu.get(data, "uid")
        shown = ", ".join(
            f"{i} (uid {uids[i]!r})" if uids is not None else str(i) for i in missing[:3]
        )
        raise RuntimeError(
            f"hidden_align: the batch has no key {key!r}, and {len(missing)} of its {len(rows)} "
            f"rollouts have no {key!r} in extra_fields['reward_extra_info'] (verl's V1 trainer "
            f"keeps the reward manager's extra info there): rollouts {shown}. Set "
            "HIDDEN_ALIGN_CORRECT to a key your reward manager writes for every rollout, or to "
            "rm_scores to use the reward score"
        )
    return values


def _correctness(data, key: str, device) -> tuple:
    """``(float32 [b], source)``: one correctness value per rollout and where it came from.

    Looked up in this order:

    1. ``key`` as a key of the batch (verl's default trainer puts the reward manager's extra
       info there; so does the V1 trainer's colocated reward model): a non-tensor list or a
       tensor (``[b, T]`` summed over T). ``source`` is ``key``; ``HIDDEN_ALIGN_CORRECT=rm_scores``
       reads the reward score this way.
    2. Where the batch has ``extra_fields`` (verl's V1 trainer):
       ``extra_fields[i]["reward_extra_info"][key]`` of every rollout. ``source`` is
       ``"extra_fields.reward_extra_info.<key>"``. A rollout without it raises (naming the key,
       where it was looked for and the first such rollouts): there is no fallback to
       ``rm_scores`` here, for part of the batch or for all of it. Each micro-batch and each
       data-parallel rank decides on its own rows, so a fallback taken by some of them would mix
       two sources in one batch; and the V1 DAPO reward adds the overlong penalty to the score,
       so ``rm_scores`` can count a correct but overlong answer as incorrect.
    3. Otherwise ``rm_scores`` summed per rollout; ``source`` is ``"rm_scores"``.

    Which case applies depends only on the batch's keys, the same in every micro-batch and on
    every rank.
    """
    if key in data.keys():
        return _values(tu.get(data, key), device), key
    if "extra_fields" in data.keys():
        values = _extra_info_values(data, key)
        return _values(values, device), f"extra_fields.reward_extra_info.{key}"
    if "rm_scores" in data.keys():
        return _values(tu.get(data, "rm_scores"), device), "rm_scores"
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
        from the uids, on the CPU), ``correct`` (float32 ``[b]``) and ``source`` (where
        the correctness came from, :func:`_correctness`).
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
