"""The alignment term inside verl 0.9.1's FSDP engine (``FSDPEngineWithLMHead``).

verl's loss contract (``loss_fn(config, model_output, data, dp_group)``) sees log-probs and
entropy only, so three engine methods are wrapped, on the class, by :func:`patch`:

* ``infer_batch``: in the actor's old-log-prob pass (no loss function, ``calculate_entropy``;
  the reference-policy pass has it off) each micro-batch's group statistics are collected,
  then merged and all-reduced over the data-parallel group. Every rank keeps the whole
  table (``[G, H]``) on the engine: verl's driver keeps only the log-probs and entropy of
  that pass, so nothing per row could travel back with the batch, and a table of every group
  serves any row on any rank however rows are rebalanced later.
* ``forward_step``: arms a forward hook on the chosen layer for the one model forward (a
  recompute under activation checkpointing does not overwrite it) and, in training, wraps
  the loss function so that it adds ``coef * share`` of the alignment loss.
* ``prepare_model_outputs``: turns the hooked output into the packed ``[N, H]`` rows (through
  the engine's own Ulysses gather and unpad, as the log-probs) or the padded ``[b, T, H]``
  states, kept on the engine, never in ``model_output`` (verl concatenates that over
  micro-batches).

The value engine (``FSDPEngineWithValueHead``) and forward-only engines pass straight through.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.workers.engine.fsdp.transformer_impl import (
    FSDPEngineWithLMHead,
    FSDPEngineWithValueHead,
)

import hidden_align as ha

from .verl_inputs import anchor_inputs, first_tensor, hook_target, marker_ids
from .verl_settings import Settings

__all__ = ["EngineState", "patch", "state_of"]

_STATE = "_hidden_align_state"
_ORIGINALS = "_hidden_align_originals"
_INACTIVE = object()


class _Reference:
    """The all-reduced statistics of one old-log-prob pass and what the update needs of it."""

    def __init__(self, stats, total_rows: int, source: str) -> None:
        self.stats = stats
        self.total_rows = total_rows
        self.source = source
        # Host copies, read once per pass: they become metrics of every micro-batch.
        self.valid_groups = int(stats.valid_groups)
        self.mean_cosine = float(stats.mean_cosine) if self.valid_groups else math.nan


class EngineState:
    """Per-engine state: settings, the hook, the captured states and the reference."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hook = None
        self.armed = False
        self.raw = None
        self.hidden = None
        self.packed = True
        self.mode = None  # "collect" or "train" while a forward step runs
        self.parts = None  # GroupAnchorStats of each micro-batch of a collecting pass
        self.source = None
        self.marker_ids = None
        self.reference = None


def state_of(engine) -> EngineState | None:
    """The engine's :class:`EngineState`, created on first use; None where the term is off
    (``HIDDEN_ALIGN_COEF=0``, a value engine, a forward-only engine).

    Args:
        engine: an ``FSDPEngineWithLMHead``.

    Returns:
        The state or None.
    """
    state = engine.__dict__.get(_STATE)
    if state is None:
        config = getattr(engine, "engine_config", None)
        settings = Settings.from_env()
        off = (
            settings.coef == 0
            or isinstance(engine, FSDPEngineWithValueHead)
            or bool(getattr(config, "forward_only", False))
        )
        state = _INACTIVE if off else EngineState(settings)
        engine.__dict__[_STATE] = state
    return None if state is _INACTIVE else state


# ---- the hook and the inputs ----------------------------------------------------------------


def _ensure_hook(engine, state: EngineState) -> None:
    if state.hook is not None:
        return
    target = hook_target(engine.module, state.settings.layer, state.settings.layer_index)

    def capture(module, args, output):
        # Only the forward of the step: an activation-checkpoint recompute during backward
        # runs the module again and must not replace what the loss already used.
        if state.armed:
            state.raw = first_tensor(output)
            state.armed = False

    state.hook = target.register_forward_hook(capture)


def _marker_ids(engine, state: EngineState) -> list:
    if state.marker_ids is None:
        tokenizer = getattr(getattr(engine, "model_config", None), "tokenizer", None)
        state.marker_ids = marker_ids(state.settings.markers, tokenizer)
    return state.marker_ids


def _anchor_inputs(engine, state: EngineState, data, hidden: torch.Tensor) -> dict:
    inputs = anchor_inputs(data, _marker_ids(engine, state), state.settings, state.packed, hidden)
    if state.source is None:
        state.source = inputs["source"]
    return inputs


def _no_autocast(device: torch.device):
    # forward_step runs the loss under the engine's autocast; our ops pick their own precision.
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


# ---- the two passes ------------------------------------------------------------------------


def _collect(engine, state: EngineState, data, hidden: torch.Tensor) -> None:
    inputs = _anchor_inputs(engine, state, data, hidden)
    with torch.no_grad(), _no_autocast(hidden.device):
        part = ha.group_anchor_stats(
            hidden,
            inputs["rows"],
            inputs["correct"],
            group_ids=inputs["gid"],
            threshold=state.settings.threshold,
            cu_seqlens=inputs["cu"],
        )
    state.parts.append(part)


def _reference(engine, state: EngineState, parts: list, local_rows: int) -> _Reference:
    if not parts:
        raise RuntimeError("hidden_align: the old-log-prob pass ran no micro-batch on this rank")
    stats = parts[0].merge(*parts[1:])
    rows = torch.tensor([local_rows], dtype=torch.int64, device=stats.device)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        group = engine.get_data_parallel_group()
        stats = stats.all_reduce(group)
        dist.all_reduce(rows, op=dist.ReduceOp.SUM, group=group)
    return _Reference(stats, int(rows), state.source)


def _alignment(engine, state: EngineState, data) -> tuple:
    """``(coef * scaled share, metrics)`` of one training micro-batch."""
    hidden, state.hidden = state.hidden, None
    settings = state.settings
    if hidden is None:
        raise RuntimeError(
            f"hidden_align: the hook on HIDDEN_ALIGN_LAYER={settings.layer!r} did not fire in "
            "this forward"
        )
    if not hidden.requires_grad:
        raise RuntimeError(
            "hidden_align: the hooked hidden state has no gradient (a module inside a "
            "reentrant activation checkpoint?); hook the final norm or another module"
        )
    ref = state.reference
    if ref is None:
        raise RuntimeError(
            "hidden_align: no group statistics for this batch: they come from the actor's "
            "old-log-prob pass (compute_log_prob with calculate_entropy), which did not run "
            "(algorithm.rollout_correction.bypass_mode uses rollout log-probs instead)"
        )
    inputs = _anchor_inputs(engine, state, data, hidden)
    if inputs["source"] != ref.source:
        raise RuntimeError(
            f"hidden_align: correctness read from {inputs['source']!r} in the update but from "
            f"{ref.source!r} in the old-log-prob pass; set HIDDEN_ALIGN_CORRECT to a key both have"
        )
    _, found = ref.stats.lookup(inputs["gid"])
    if not bool(found.all()):
        raise RuntimeError(
            "hidden_align: rollouts of groups the last old-log-prob pass did not see: the "
            "statistics belong to another batch"
        )
    with _no_autocast(hidden.device):
        share = ha.loss(
            hidden,
            inputs["rows"],
            inputs["correct"],
            group_ids=inputs["gid"],
            loss_type=settings.loss_type,
            threshold=settings.threshold,
            cu_seqlens=inputs["cu"],
            reference=ref.stats,
        )
    # The shares of all micro-batches of all ranks sum to the full-batch loss. FSDP averages
    # gradients over data-parallel ranks (hence dp_size, as verl's own normalisers do), and a
    # mini-batch holds global_batch_size of the total_rows rows: scaling by their ratio makes
    # each optimiser step see an estimate of the whole loss whatever the mini-batch count.
    dp_size = int(tu.get_non_tensor_data(data, "dp_size", 1) or 1)
    batch_rows = tu.get_non_tensor_data(data, "global_batch_size", None)
    mini_batches = ref.total_rows / batch_rows if batch_rows else 1.0
    value = share * (dp_size * mini_batches)
    metrics = {
        "actor/ha_align_loss": Metric(AggregationType.SUM, value.detach()),
        "actor/ha_valid_groups": Metric(AggregationType.MEAN, ref.valid_groups),
    }
    if ref.valid_groups:  # the same on every rank and micro-batch: skipped consistently
        metrics["actor/ha_anchor_cosine"] = Metric(AggregationType.MEAN, ref.mean_cosine)
    return settings.coef * value, metrics


# ---- the wrapped methods -------------------------------------------------------------------


def _originals() -> dict:
    return FSDPEngineWithLMHead.__dict__[_ORIGINALS]


def _prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
    model_output = _originals()["prepare_model_outputs"](
        self, output, output_args, micro_batch, logits_processor_func
    )
    state = state_of(self)
    if state is None or state.mode is None or state.raw is None:
        return model_output
    raw, state.raw = state.raw, None
    state.packed = bool(tu.get_non_tensor_data(micro_batch, "use_remove_padding", True))
    if state.packed:
        # [1, n, H] -> [N, H]: the Ulysses gather and the tail pad removed, as for log-probs.
        hidden = self._gather_and_unpad_packed(raw.squeeze(0), output_args.get("pad_size", 0))
    else:
        hidden = raw  # [b, T, H], each sequence left-aligned
    if state.mode == "collect":
        _collect(self, state, micro_batch, hidden)
    else:
        state.hidden = hidden
    return model_output


def _forward_step(self, micro_batch, loss_function, forward_only):
    original = _originals()["forward_step"]
    state = state_of(self)
    if state is None:
        return original(self, micro_batch, loss_function, forward_only)
    if forward_only:
        mode = "collect" if state.parts is not None and loss_function is None else None
    else:
        mode = "train" if loss_function is not None else None
    if mode is None:
        return original(self, micro_batch, loss_function, forward_only)
    _ensure_hook(self, state)
    if mode == "train":
        inner = loss_function

        def loss_function(*args, **kwargs):
            # verl also hands the loss function to prepare_model_outputs as a logits
            # processor (top-k distillation): only the call with model_output is the loss.
            if "model_output" not in kwargs:
                return inner(*args, **kwargs)
            loss, metrics = inner(*args, **kwargs)
            term, extra = _alignment(self, state, kwargs["data"])
            return loss + term, {**metrics, **extra}

    state.mode, state.armed, state.raw, state.hidden = mode, True, None, None
    try:
        return original(self, micro_batch, loss_function, forward_only)
    finally:
        state.mode, state.armed, state.raw, state.hidden = None, False, None, None


def _infer_batch(self, data, loss_function=None):
    original = _originals()["infer_batch"]
    state = state_of(self)
    collect = (
        state is not None
        and loss_function is None
        and bool(tu.get_non_tensor_data(data, "calculate_entropy", False))
    )
    if not collect:
        return original(self, data, loss_function=loss_function)
    state.parts, state.source = [], None
    try:
        output = original(self, data, loss_function=loss_function)
        parts = state.parts
    finally:
        state.parts = None
    state.reference = _reference(self, state, parts, data.batch_size[0])
    return output


_WRAPPERS = {
    "prepare_model_outputs": _prepare_model_outputs,
    "forward_step": _forward_step,
    "infer_batch": _infer_batch,
}


def patch() -> bool:
    """Wraps ``prepare_model_outputs``, ``forward_step`` and ``infer_batch`` of
    ``FSDPEngineWithLMHead`` (idempotent: a second call changes nothing).

    Returns:
        True when this call applied the patch, False when it was already applied.
    """
    cls = FSDPEngineWithLMHead
    if _ORIGINALS in cls.__dict__:
        return False
    missing = [n for n in (*_WRAPPERS, "_gather_and_unpad_packed") if not hasattr(cls, n)]
    if missing:
        raise RuntimeError(f"hidden_align: this verl's FSDPEngineWithLMHead lacks {missing}")
    # getattr, not __dict__: infer_batch is inherited from BaseEngine.
    setattr(cls, _ORIGINALS, {name: getattr(cls, name) for name in _WRAPPERS})
    for name, wrapper in _WRAPPERS.items():
        setattr(cls, name, wrapper)
    return True
