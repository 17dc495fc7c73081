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

from ._markers import resolve_markers as _resolve
from .verl_settings import Settings

__all__ = ["anchor_inputs", "first_tensor", "hook_target", "resolve_markers"]


# ---- the hooked module -----------------------------------------------------------------------


def _decoder_stack(names: dict):
    """``(name, ModuleList)`` of the decoder layers: a ``*.layers`` list with a ``norm``
    sibling (the language model's, not a vision tower's), the longest if several."""
    best = None
    for name, module in names.items():
        if not isinstance(module, torch.nn.ModuleList) or name.rpartition(".")[2] != "layers":
            continue
        parent = name.rpartition(".")[0]
        if (f"{parent}.norm" if parent else "norm") not in names:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    return best


def hook_target(model: torch.nn.Module, layer: str, index: int | None) -> torch.nn.Module:
    """The module whose output is the hidden state to align.

    Names are matched on ``model.named_modules()``, so the prefixes that FSDP1
    (``_fsdp_wrapped_module``) and PEFT (``base_model.model``) add do not matter.

    Args:
        model: the actor model (FSDP-wrapped or not).
        layer: ``"norm"``: the final norm beside the decoder stack; with ``index``, decoder
            layer ``index``; otherwise the module whose name is ``layer`` or ends with
            ``"." + layer``.
        index: the decoder-layer index (negative from the end), or None.

    Returns:
        The module. Raises ``RuntimeError`` when it cannot be found or is ambiguous.
    """
    names = dict(model.named_modules())
    if layer == "norm" or index is not None:
        stack = _decoder_stack(names)
        if stack is None:
            raise RuntimeError(
                "hidden_align: found no decoder stack (a '*.layers' ModuleList beside a 'norm') "
                "in the actor model; set HIDDEN_ALIGN_LAYER to the name of the module whose "
                "output is the hidden state to align"
            )
        name, layers = stack
        if index is None:
            parent = name.rpartition(".")[0]
            return names[f"{parent}.norm" if parent else "norm"]
        if not -len(layers) <= index < len(layers):
            raise RuntimeError(
                f"hidden_align: HIDDEN_ALIGN_LAYER={index} is out of range for a model with "
                f"{len(layers)} decoder layers"
            )
        return layers[index]
    found = [n for n in names if n == layer or n.endswith("." + layer)]
    if len(found) != 1:
        raise RuntimeError(
            f"hidden_align: HIDDEN_ALIGN_LAYER={layer!r} names {len(found)} modules of the actor "
            f"model ({found[:4]}); give a name that identifies one"
        )
    return names[found[0]]


def first_tensor(output) -> torch.Tensor:
    """The hidden state in a module's output (a tensor, or the first item of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]  # decoder layers of older transformers return (hidden, ...)
    raise RuntimeError(
        f"hidden_align: the hooked module returned {type(output).__name__}, not a tensor"
    )


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
