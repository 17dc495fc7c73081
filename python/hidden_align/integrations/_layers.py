"""The module whose output is the hidden state to align, found by name in any wrapping of the
model (FSDP, DeepSpeed, PEFT), and the hidden state in that module's output."""

from __future__ import annotations

import torch

__all__ = ["first_tensor", "hook_target"]


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
