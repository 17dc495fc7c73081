"""The alignment term inside verl 0.9.1's FSDP engine (``FSDPEngineWithLMHead``).

verl's loss contract (``loss_fn(config, model_output, data, dp_group)``) sees log-probs and
entropy only, so four engine methods are wrapped, on the class, by :func:`patch`:

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
* ``forward_backward_batch``: before an update mini-batch, checks that there are statistics
  and that they hold every group of the mini-batch's rows.

A condition found on one rank only (a micro-batch whose anchors or groups cannot be read, no
micro-batch, rows of groups the statistics lack) must not be raised there alone: the other
ranks would wait for it in their next collective until the process group times out. The
old-log-prob pass therefore keeps the first error of its micro-batches and raises it after the
pass, once the ranks have agreed in one small all-reduce (the one that also exchanges the
group counts, :func:`hidden_align._collectives.agree_on_failure`): the failing rank raises its own
error, every other rank one that names it. The update agrees the same way, in one small
all-reduce per mini-batch where verl itself all-reduces the token count, after reading
everything the term reads from the mini-batch's rows (anchors, groups, correctness) and
checking that the statistics hold every group: an error raised by one rank's loss mid-step
would leave the others in the FSDP collectives of their backward.

Mini-batches: each rank scales its share by ``dp_size * total rows / global_batch_size``
(:func:`_alignment`). Summed over the mini-batches of one batch (no optimiser step between),
the gradients are that ratio times the full-batch gradient of ``coef * loss``, however the
rows are split, a short last mini-batch included. Per step, a mini-batch with fewer rows than
``global_batch_size`` is weighted down: its term is its rows' share of the whole loss times
the same ratio (24 rows in mini-batches of 16 and 8: about the whole loss in the first step,
half of it in the second), and ``actor/ha_align_loss``, which verl averages over the
mini-batches, reads ratio / mini-batch count of the full-batch loss (0.75 there). verl 0.9.1's
trainers never split real rows so: ``TrainingWorker.train_mini_batch`` refuses rows that the
mini-batch size does not divide (``tensordict_utils.make_iterator``), and the V1 trainer pads
the batch to a multiple of ``ppo_mini_batch_size * rollout.n`` with no-op rows (one masked
response token: no anchor), which count as rows: the ratio is then the mini-batch count and
the logged loss exact, while a mini-batch holding padding is weighted by its real rows, as
verl's own ``seq-mean-*`` aggregations (divided by ``global_batch_size``) weight it.

The value engine (``FSDPEngineWithValueHead``) and forward-only engines pass straight through.
"""

from __future__ import annotations

import torch
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.workers.engine.fsdp import transformer_impl
from verl.workers.engine.fsdp.transformer_impl import (
    FSDPEngineWithLMHead,
    FSDPEngineWithValueHead,
)

import hidden_align as ha

from ._layers import first_tensor, hook_target
from ._statistics_pass import (
    Reference,
    _RankFailure,
    agree,
    all_reduced_parts,
    no_autocast,
    peer_failed,
)
from .verl_inputs import anchor_inputs, resolve_markers
from .verl_settings import Settings

__all__ = ["EngineState", "patch", "state_of"]

_STATE = "_hidden_align_state"
_ORIGINALS = "_hidden_align_originals"
_INACTIVE = object()

# What the other ranks are told when one rank fails (codes of _RankFailure; any other error of
# a rank's own inputs is _COLLECT_ERROR in the old-log-prob pass, _UPDATE_ERROR in the update).
_COLLECT_ERROR, _NO_HOOK, _NO_MICRO_BATCH, _UPDATE_ERROR, _NO_REFERENCE, _UNSEEN = range(1, 7)
_REASONS = {
    _COLLECT_ERROR: "its micro-batches' anchors, groups or correctness could not be read",
    _NO_HOOK: "the hook did not fire in its forward",
    _NO_MICRO_BATCH: "its old-log-prob pass ran no micro-batch",
    _UPDATE_ERROR: "its mini-batch's anchors, groups or correctness could not be read",
    _NO_REFERENCE: "it has no group statistics",
    _UNSEEN: "its mini-batch holds groups the statistics lack",
}


def _agree(engine, failure, where: str) -> None:
    """Every rank of the data-parallel group raises, or none does (:func:`agree`)."""
    agree(
        engine.get_data_parallel_group(),
        transformer_impl.get_device_id,
        failure,
        _UPDATE_ERROR,
        peer_failed(where, _REASONS),
    )


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
        self.failure = None  # the first error of a collecting pass, raised after the pass
        self.source = None
        self.markers = None
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


def _markers(engine, state: EngineState):
    if state.markers is None:
        tokenizer = getattr(getattr(engine, "model_config", None), "tokenizer", None)
        state.markers = resolve_markers(state.settings.markers, tokenizer)
    return state.markers


def _anchor_inputs(engine, state: EngineState, data, hidden: torch.Tensor) -> dict:
    inputs = anchor_inputs(data, _markers(engine, state), state.settings, state.packed, hidden)
    if state.source is None:
        state.source = inputs["source"]
    return inputs


# ---- the two passes ------------------------------------------------------------------------


def _collect(engine, state: EngineState, data, hidden: torch.Tensor) -> None:
    if state.failure is not None:
        return  # the pass reports its first error; later micro-batches would repeat it
    try:
        inputs = _anchor_inputs(engine, state, data, hidden)
        with torch.no_grad(), no_autocast(hidden.device):
            part = ha.group_anchor_stats(
                hidden,
                inputs["rows"],
                inputs["correct"],
                group_ids=inputs["gid"],
                threshold=state.settings.threshold,
                cu_seqlens=inputs["cu"],
            )
    except Exception as exc:  # noqa: BLE001 - every error is raised after the pass (_reference)
        # Raised here, the other ranks would wait for this one in their next collective.
        state.failure = exc
        return
    state.parts.append(part)


def _reference(engine, state: EngineState, parts: list, failure, local_rows: int) -> Reference:
    """The statistics of the pass, merged and all-reduced (:func:`all_reduced_parts`); or,
    where any rank failed (``failure`` on this one), an error on every rank."""
    stats, rows = all_reduced_parts(
        parts,
        failure,
        local_rows,
        process_group=engine.get_data_parallel_group(),
        device=transformer_impl.get_device_id,
        empty=_RankFailure(
            _NO_MICRO_BATCH, "hidden_align: the old-log-prob pass ran no micro-batch on this rank"
        ),
        code=_COLLECT_ERROR,
        on_peer=peer_failed("old-log-prob pass", _REASONS),
    )
    return Reference(stats, rows, state.source)


def _hook_missed(settings) -> str:
    return (
        f"hidden_align: the hook on HIDDEN_ALIGN_LAYER={settings.layer!r} did not fire in "
        "this forward"
    )


def _require_reference(state: EngineState) -> Reference:
    if state.reference is None:
        raise _RankFailure(
            _NO_REFERENCE,
            "hidden_align: no group statistics for this batch: they come from the actor's "
            "old-log-prob pass (compute_log_prob with calculate_entropy), which did not run "
            "(algorithm.rollout_correction.bypass_mode uses rollout log-probs instead)",
        )
    return state.reference


def _require_seen(ref: Reference, gid) -> None:
    _, found = ref.stats.lookup(gid)
    if not bool(found.all()):
        raise _RankFailure(
            _UNSEEN,
            "hidden_align: rollouts of groups the last old-log-prob pass did not see: the "
            "statistics belong to another batch",
        )


def _check_update(engine, state: EngineState, data) -> None:
    """Before an update mini-batch runs any collective: statistics exist, the rows' anchors,
    groups and correctness can be read, and the statistics hold the group of every row; on
    every rank together. Raised by the loss of one rank's micro-batch instead, the error would
    leave the other ranks waiting in the FSDP collectives of their backward."""
    failure = None
    try:
        ref = _require_reference(state)
        # What _alignment reads from each micro-batch, read once for the whole mini-batch
        # (its anchors through the packed offsets; only their validity matters here).
        where = torch.empty(0, device=data["input_ids"].device)
        inputs = anchor_inputs(data, _markers(engine, state), state.settings, True, where)
        _require_seen(ref, inputs["gid"])
    except Exception as exc:  # noqa: BLE001 - agreed with the other ranks in _agree
        failure = exc
    _agree(engine, failure, "update")


def _alignment(engine, state: EngineState, data) -> tuple:
    """``(coef * scaled share, metrics)`` of one training micro-batch."""
    hidden, state.hidden = state.hidden, None
    settings = state.settings
    # The model and the settings are the same on every rank, so these raise on all at once.
    if hidden is None:
        raise RuntimeError(_hook_missed(settings))
    if not hidden.requires_grad:
        raise RuntimeError(
            "hidden_align: the hooked hidden state has no gradient (a module inside a "
            "reentrant activation checkpoint?); hook the final norm or another module"
        )
    # Checked for the whole mini-batch on every rank together (_check_update); again here for
    # a forward_step driven without forward_backward_batch.
    ref = _require_reference(state)
    inputs = _anchor_inputs(engine, state, data, hidden)
    # Every rank's share of a batch has the same keys: this too raises on all ranks at once.
    if inputs["source"] != ref.source:
        raise RuntimeError(
            f"hidden_align: correctness read from {inputs['source']!r} in the update but from "
            f"{ref.source!r} in the old-log-prob pass; set HIDDEN_ALIGN_CORRECT to a key both have"
        )
    _require_seen(ref, inputs["gid"])
    with no_autocast(hidden.device):
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
    if state is None or state.mode is None:
        return model_output
    if state.raw is None:
        if state.mode == "collect" and state.failure is None:
            # A micro-batch left out of the statistics would make every share wrong.
            state.failure = _RankFailure(_NO_HOOK, _hook_missed(state.settings))
        return model_output  # in training, _alignment raises
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
    state.parts, state.source, state.failure = [], None, None
    state.reference = None  # a failed pass leaves no statistics of another batch behind
    try:
        output = original(self, data, loss_function=loss_function)
        parts, failure = state.parts, state.failure
    finally:
        state.parts, state.failure = None, None
    state.reference = _reference(self, state, parts, failure, data.batch_size[0])
    return output


def _forward_backward_batch(self, data, loss_function, forward_only=False):
    original = _originals()["forward_backward_batch"]
    state = state_of(self)
    if state is not None and not forward_only and loss_function is not None:
        _check_update(self, state, data)
    return original(self, data, loss_function, forward_only=forward_only)


_WRAPPERS = {
    "prepare_model_outputs": _prepare_model_outputs,
    "forward_step": _forward_step,
    "infer_batch": _infer_batch,
    "forward_backward_batch": _forward_backward_batch,
}


def patch() -> bool:
    """Wraps ``prepare_model_outputs``, ``forward_step``, ``infer_batch`` and
    ``forward_backward_batch`` of ``FSDPEngineWithLMHead`` (idempotent: a second call changes
    nothing).

    Returns:
        True when this call applied the patch, False when it was already applied.
    """
    cls = FSDPEngineWithLMHead
    if _ORIGINALS in cls.__dict__:
        return False
    missing = [n for n in (*_WRAPPERS, "_gather_and_unpad_packed") if not hasattr(cls, n)]
    if missing:
        raise RuntimeError(f"hidden_align: this verl's FSDPEngineWithLMHead lacks {missing}")
    # getattr, not __dict__: infer_batch and forward_backward_batch are inherited.
    setattr(cls, _ORIGINALS, {name: getattr(cls, name) for name in _WRAPPERS})
    for name, wrapper in _WRAPPERS.items():
        setattr(cls, name, wrapper)
    return True
