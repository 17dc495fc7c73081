"""The last hidden state of a model whose forward returns only logits (OpenRLHF's ``Actor``),
recorded by a forward hook on its backbone."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ...errors import ArgumentError

__all__ = ["CapturedHidden", "capture_last_hidden"]


class CapturedHidden:
    """The output recorded by :func:`capture_last_hidden`.

    ``hidden`` is the tensor of the module's latest call inside the ``with`` block (autograd
    history kept); reading it before the module ran is an :class:`ArgumentError`.
    """

    __slots__ = ("_hidden",)

    def __init__(self) -> None:
        self._hidden = None

    @property
    def hidden(self) -> torch.Tensor:
        if self._hidden is None:
            raise ArgumentError(
                "capture_last_hidden: the module did not run inside the with block; hook the "
                "submodule the model's forward actually calls"
            )
        return self._hidden


def _hidden_of(output) -> torch.Tensor:
    """The hidden-state tensor of a module's output: the tensor itself, a model output's
    ``last_hidden_state``, or the first element of a tuple or list."""
    if isinstance(output, torch.Tensor):
        return output
    state = getattr(output, "last_hidden_state", None)
    if isinstance(state, torch.Tensor):
        return state
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ArgumentError(
        f"capture_last_hidden: the module returned {type(output).__name__}, expected a tensor, "
        "a tuple starting with one, or an output with last_hidden_state"
    )


@contextlib.contextmanager
def capture_last_hidden(module: torch.nn.Module) -> Iterator[CapturedHidden]:
    """Record the output of ``module`` (e.g. a causal LM's backbone) while the block runs.

    A forward hook, removed on exit, so a model whose forward returns only logits (OpenRLHF's
    ``Actor``) still yields its last hidden state: the backbone's output, after the final norm,
    when ``module`` is a Hugging Face causal LM's ``get_decoder()`` (which sees through a PEFT
    wrapper too), without ``output_hidden_states=True`` keeping every layer's activations.

    Args:
        module: the submodule whose output to record.

    Returns:
        A context manager yielding a :class:`CapturedHidden`; its ``hidden`` is
        ``[B, T, H]`` for a padded batch, ``[1, N, H]`` for a packed one.

    Example:
        >>> layer = torch.nn.Linear(4, 3)
        >>> with capture_last_hidden(layer) as cap:
        ...     _ = torch.nn.Sequential(layer, torch.nn.ReLU())(torch.randn(2, 4))
        >>> cap.hidden.shape
        torch.Size([2, 3])
    """
    if not isinstance(module, torch.nn.Module):
        raise ArgumentError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    captured = CapturedHidden()

    def hook(_module, _args, output):
        captured._hidden = _hidden_of(output)

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
