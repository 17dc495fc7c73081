"""The alignment term inside OpenRLHF's own classes, patched in place (OpenRLHF's files are not
edited). :mod:`hidden_align.integrations.openrlhf.worker` applies these patches in every Ray
worker as OpenRLHF's modules are imported.

What each patch does, in the order a training step meets them:

* ``RemoteExperienceMaker.make_experience`` (the PPO trainer's process): gives each rollout
  its group, OpenRLHF's own ``index // n_samples_per_prompt`` (the grouping OpenRLHF's
  advantages use) numbered on from the previous rollout batches' (an actor that skips
  ``fit``, ``--critic.freezing_steps``, keeps earlier batches in its replay buffer), and its
  score, as two entries of ``Experience.info``; they travel with each row through the replay
  buffer's split, shuffle and re-batching, where ``index`` is dropped. With the rollout scope
  it also hands the actor group's no-grad ``forward`` (the one that computes
  ``action_log_probs``) the groups and scores of its micro-batches.
* ``BaseModelActor.execute_batch`` (each actor rank): runs that forward with the hook armed
  and collects the micro-batch's :func:`hidden_align.group_anchor_stats`.
* ``ActorPPOTrainer.__init__``: installs the forward hook on the hidden state to align. (The
  fused :class:`PolicyLoss` replaces OpenRLHF's in ``ppo_actor`` when that module is
  imported, whatever ``coef``; OpenRLHF's own class stays for GSPO.)
* ``ActorPPOTrainer.ppo_train``: merges the statistics of the rank's micro-batches and
  all-reduces them over the data-parallel group (every rank runs ``fit`` together), with the
  count of non-empty rows, after the ranks agree that none failed.
* ``ActorPPOTrainer.training_step``: adds ``coef x`` the micro-batch's share of the
  rollout batch's loss (``hidden_align.loss(..., reference=statistics)``) to the loss that
  OpenRLHF backpropagates, scaled by OpenRLHF's own normalisers so that every optimizer step
  sees the whole loss, and logs three metrics.

Scaling: OpenRLHF gives each micro-batch ``dp_size`` and ``global_batch_size`` (the non-empty
rows of its optimizer step, divided by DeepSpeed's gradient-accumulation steps), and DeepSpeed
divides each backward by the accumulation steps and averages over ranks. The share times
``dp_size x rows / global_batch_size`` (``rows``: the rollout batch's non-empty rows) makes
one optimizer step's gradient that of ``(rows / step rows) x`` its shares: the whole
rollout batch's loss when one step covers the batch. With several steps, each sees its rows'
shares scaled up to the batch, and the steps' shares add up to the batch's loss; that is an
unbiased estimate per step where the replay buffer shuffles rows, not where it keeps an order
(dynamic batching sorts rows by length; tensor parallelism does not shuffle). Under dynamic
batching ``global_batch_size`` is the step's row count and DeepSpeed accumulates over one
micro-batch, so the same product holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import hidden_align as ha

from .._layers import first_tensor, hook_target
from .._markers import resolve_markers
from .._statistics_pass import (
    Reference,
    _RankFailure,
    agree,
    all_reduced_parts,
    no_autocast,
    peer_failed,
)
from .settings import Settings
from .versions import policy_loss_class

__all__ = [
    "GROUP_KEY",
    "METRIC_COSINE",
    "METRIC_GROUPS",
    "METRIC_LOSS",
    "ROWS_ARGUMENT",
    "SCORE_KEY",
    "TrainerState",
    "patch_actor_trainer",
    "patch_experience_maker",
    "patch_model_actor",
    "patch_policy_loss",
    "settings",
    "state_of",
    "unpatch_policy_loss",
    "unwrap",
]

# Experience.info entries: one value per rollout, split and re-batched with it.
GROUP_KEY = "hidden_align_group"
SCORE_KEY = "hidden_align_score"
# The keyword the actor group's forward dispatch carries (rows of each micro-batch).
ROWS_ARGUMENT = "hidden_align_rows"
# Metrics in the status OpenRLHF logs (per-sample weighted means over micro-batches).
METRIC_LOSS = "hidden_align/loss"
METRIC_COSINE = "hidden_align/anchor_cosine"
METRIC_GROUPS = "hidden_align/valid_groups"

_STATE = "_hidden_align_state"
_GROUPS_MADE = "_hidden_align_groups_made"
_ORIGINALS = "_hidden_align_originals"
_INACTIVE = object()

# What the other ranks are told when one rank fails before a collective.
_COLLECT_ERROR, _NO_MICRO_BATCH, _UNSEEN = 1, 2, 3
_REASONS = {
    _COLLECT_ERROR: "its micro-batches' anchors, groups or scores could not be read",
    _NO_MICRO_BATCH: "it received no micro-batch in the experience maker's forward",
    _UNSEEN: "its replay buffer holds groups the statistics lack",
}


def settings() -> Settings:
    """The settings in this process's ``HIDDEN_ALIGN_*`` variables (read when a trainer is
    built and when a rollout batch is made)."""
    return Settings.from_env()


_on_peer = peer_failed("statistics pass", _REASONS)


class TrainerState:
    """Per-``ActorPPOTrainer`` state: settings, hook, markers, statistics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hook = None
        self.armed = False
        self.raw = None
        self.markers = None
        self.parts = []
        self.failure = None
        self.reference = None


def state_of(trainer) -> TrainerState | None:
    """The trainer's :class:`TrainerState`, or None where the term is off (``coef`` 0) or the
    object is not a patched ``ActorPPOTrainer``."""
    state = getattr(trainer, "__dict__", {}).get(_STATE)
    return None if state is None or state is _INACTIVE else state


# ---- inputs of one micro-batch ---------------------------------------------------------------


def _markers(trainer, state: TrainerState):
    if state.markers is None:
        state.markers = resolve_markers(
            state.settings.markers, getattr(trainer, "tokenizer", None), "--align.markers"
        )
    return state.markers


def _anchor_rows(trainer, state, sequences, action_mask, attention_mask, hidden) -> tuple:
    """``(hidden rows, anchors)``: the captured states as ``hidden_align.loss`` reads them and
    each rollout's anchor there (-1: none).

    ``action_mask`` covers the last ``A`` shifted positions (position j: token j + 1 is an
    action); padded left to ``T`` it marks the response tokens of ``sequences``. With
    ``packing_samples`` the model ran on the ``[1, N]`` unpadded tokens in row-major order."""
    device = hidden.device
    sequences = sequences.to(device)
    action_mask = action_mask.to(device).bool()
    in_response = F.pad(action_mask, (sequences.shape[1] - action_mask.shape[1], 0))
    settings = state.settings
    anchors = ha.find_anchors(
        sequences,
        in_response,
        _markers(trainer, state),
        occurrence=settings.occurrence,
        offset=settings.offset,
    )
    if getattr(trainer.actor, "packing_samples", False):
        return hidden[0], ha.unpadded_rows(anchors, attention_mask.to(device))
    return hidden, anchors


def _as_tensor(values) -> torch.Tensor:
    """An ``info`` entry as one tensor: re-batched rows hold a list of 0-d tensors."""
    if isinstance(values, torch.Tensor):
        return values.reshape(-1)
    return torch.stack([torch.as_tensor(v).reshape(()) for v in values])


# ---- the experience maker (the PPO trainer's process) ----------------------------------------


def _rollout_rows(maker, samples_list, correct: str) -> list:
    """Group and score of each micro-batch's rows; also stored in their ``info``."""
    n = int(maker.args.rollout.n_samples_per_prompt)
    if n < 2:
        raise RuntimeError(
            "hidden_align: --rollout.n_samples_per_prompt is 1: every prompt's group has one "
            "rollout and there is nothing to align; sample several per prompt or set "
            "--align.coef 0"
        )
    first_group = maker.__dict__.get(_GROUPS_MADE, 0)
    rows = []
    for samples in samples_list:
        if samples.index is None:
            raise RuntimeError(
                "hidden_align: the experience maker's samples carry no 'index' (OpenRLHF sets it "
                "in split_rollout_samples); this OpenRLHF is not supported"
            )
        score = getattr(samples, correct)
        if score is None:
            raise RuntimeError(
                f"hidden_align: the rollouts have no '{correct}' when the experience maker "
                "runs: the alignment term needs the verifier's score of each rollout (a remote "
                "reward function, --reward.remote_url or --train.agent_func_path, that returns "
                f"'{correct}'), not a reward model; or set --align.correct to the other field"
            )
        group = first_group + torch.tensor(samples.index, dtype=torch.int64) // n
        # A copy: OpenRLHF's length penalties later change rewards in place, and the
        # update must read the scores the statistics were made from.
        score = score.detach().reshape(-1).float().cpu().clone()
        samples.info[GROUP_KEY] = group
        samples.info[SCORE_KEY] = score
        rows.append({"group": group, "score": score})
    maker.__dict__[_GROUPS_MADE] = first_group + max(
        (int(r["group"].max()) + 1 - first_group for r in rows if len(r["group"])), default=0
    )
    return rows


def _make_experience(self, samples_list):
    original = _originals(type(self), "make_experience")
    current = settings()
    if current.coef == 0:
        return original(self, samples_list)
    rows = _rollout_rows(self, samples_list, current.correct)
    if current.scope != "rollout":
        return original(self, samples_list)
    group = self.actor_model_group
    dispatch = group.async_run_method_batch

    def with_rows(method_name, **kwargs):
        # The actor group's forward over these samples: the no-grad pass that computes
        # action_log_probs, where the statistics are collected.
        if method_name == "forward" and len(kwargs.get("sequences", ())) == len(rows):
            kwargs[ROWS_ARGUMENT] = rows
        return dispatch(method_name=method_name, **kwargs)

    group.async_run_method_batch = with_rows
    try:
        return original(self, samples_list)
    finally:
        del group.async_run_method_batch


# ---- the actor's experience forward (each actor rank) ----------------------------------------


def _collect(trainer, state: TrainerState, kwargs: dict, rows: dict, hidden) -> None:
    if state.failure is not None:
        return  # the pass reports its first error; later micro-batches would repeat it
    try:
        if hidden is None:
            raise RuntimeError(_hook_missed(state.settings))
        with torch.no_grad(), no_autocast(hidden.device):
            states, anchors = _anchor_rows(
                trainer,
                state,
                kwargs["sequences"],
                kwargs["action_mask"],
                kwargs["attention_mask"],
                hidden,
            )
            part = ha.group_anchor_stats(
                states,
                anchors,
                rows["score"].to(hidden.device),
                group_ids=rows["group"].to(hidden.device),
                threshold=state.settings.threshold,
            )
    except Exception as exc:  # noqa: BLE001 - raised on every rank after the pass (_reference)
        state.failure = _RankFailure(_COLLECT_ERROR, f"hidden_align: {exc}")
        state.failure.__cause__ = exc
        return
    state.parts.append(part)


def _execute_batch(self, method_name, all_data, start_idx, end_idx):
    original = _originals(type(self), "execute_batch")
    if method_name != "forward" or ROWS_ARGUMENT not in all_data:
        return original(self, method_name, all_data, start_idx, end_idx)
    data = dict(all_data)
    rows = iter(data.pop(ROWS_ARGUMENT)[start_idx:end_idx])
    trainer = getattr(self, "trainer", None)
    state = state_of(trainer)
    if state is None:
        return original(self, method_name, data, start_idx, end_idx)
    forward = self.forward

    def forward_collecting(**kwargs):
        state.armed, state.raw = True, None
        try:
            out = forward(**kwargs)
            hidden = state.raw
        finally:
            state.armed, state.raw = False, None
        _collect(trainer, state, kwargs, next(rows), hidden)
        return out

    # execute_batch looks the method up by name on the instance for each item.
    self.forward = forward_collecting
    try:
        return original(self, method_name, data, start_idx, end_idx)
    finally:
        del self.forward


# ---- the actor trainer -----------------------------------------------------------------------


def _hook_missed(current: Settings) -> str:
    return (
        f"hidden_align: the hook on --align.layer={current.layer!r} did not fire in the actor's "
        "forward"
    )


def _dp_group(strategy):
    mesh = getattr(strategy, "ds_device_mesh", None)
    return mesh["dp"].get_group() if mesh is not None else None


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _init(self, strategy, actor, *args, **kwargs):
    _originals(type(self), "__init__")(self, strategy, actor, *args, **kwargs)
    current = settings()
    if current.coef == 0:
        self.__dict__[_STATE] = _INACTIVE
        return
    if getattr(strategy, "ring_attn_group", None) is not None:
        raise RuntimeError(
            "hidden_align: ring attention (--ds.ring_attn_size > 1) splits each sequence over "
            "ranks; the alignment term reads whole sequences and does not support it"
        )
    state = TrainerState(current)
    target = hook_target(actor.model, current.layer, current.layer_index)

    def capture(module, args, output):
        # The first call of an armed forward only: an activation-checkpoint recompute during
        # backward runs the module again and must not replace what the loss used.
        if state.armed:
            state.raw = first_tensor(output)
            state.armed = False

    state.hook = target.register_forward_hook(capture)
    self.__dict__[_STATE] = state


def _reference(trainer, state: TrainerState) -> Reference:
    """The statistics of the rollout batch's experience forward, merged and all-reduced
    (:func:`all_reduced_parts`); or, where any rank failed, an error on every rank."""
    parts, failure = state.parts, state.failure
    state.parts, state.failure = [], None
    items = trainer.replay_buffer.items
    local_rows = sum(int(bool(item.action_mask.any())) for item in items)
    stats, total = all_reduced_parts(
        parts,
        failure,
        local_rows,
        process_group=_dp_group(trainer.strategy),
        device=_device,
        empty=_RankFailure(
            _NO_MICRO_BATCH,
            "hidden_align: no statistics for this rollout batch: this rank received no "
            "micro-batch in the experience maker's forward (make the rollout's micro-batch "
            "count a multiple of the actor ranks: --rollout.batch_size x "
            "--rollout.n_samples_per_prompt / --rollout.micro_batch_size), or the experience "
            "maker ran unpatched (start training with python -m "
            "hidden_align.integrations.openrlhf.train_ppo_ray)",
        ),
        code=_COLLECT_ERROR,
        on_peer=_on_peer,
    )
    reference = Reference(stats, total)
    _check_seen(trainer, reference, items)
    return reference


def _check_seen(trainer, reference: Reference, items) -> None:
    """Every group of the rank's replay buffer is in the statistics, on every rank together
    (a training step would otherwise raise on one rank mid-step)."""
    failure = None
    try:
        groups = [_as_tensor(item.info[GROUP_KEY]) for item in items if GROUP_KEY in item.info]
        if len(groups) != len(items):
            raise RuntimeError(
                "hidden_align: replay-buffer rows without a group: they were not made by the "
                "patched experience maker"
            )
        if groups:
            gid = torch.cat(groups).to(reference.stats.device)
            _, found = reference.stats.lookup(gid)
            if not bool(found.all()):
                raise _RankFailure(
                    _UNSEEN,
                    "hidden_align: the replay buffer holds rollouts of groups the experience "
                    "maker's forward did not see: the statistics belong to another batch",
                )
    except Exception as exc:  # noqa: BLE001 - agreed with the other ranks below
        failure = exc
    agree(_dp_group(trainer.strategy), _device, failure, _UNSEEN, _on_peer)


def _ppo_train(self, *args, **kwargs):
    original = _originals(type(self), "ppo_train")
    state = state_of(self)
    if state is None or state.settings.scope != "rollout":
        return original(self, *args, **kwargs)
    state.reference = _reference(self, state)
    try:
        return original(self, *args, **kwargs)
    finally:
        state.reference = None


def _alignment(trainer, state: TrainerState, experience, rows: dict, norms: dict, step):
    """``coef x`` the scaled term of one micro-batch; its metrics go to ``experience.info``."""
    hidden, state.raw = state.raw, None
    current = state.settings
    if hidden is None:
        raise RuntimeError(_hook_missed(current))
    if not hidden.requires_grad:
        raise RuntimeError(
            "hidden_align: the hooked hidden state has no gradient (a module inside a "
            "reentrant activation checkpoint?); choose another --align.layer"
        )
    states, anchors = _anchor_rows(
        trainer,
        state,
        experience.sequences,
        experience.action_mask,
        experience.attention_mask,
        hidden,
    )
    device = hidden.device
    score, group = rows["score"].to(device), rows["group"].to(device)
    info = experience.info
    options = {"group_ids": group, "loss_type": current.loss_type, "threshold": current.threshold}
    with no_autocast(device):
        if current.scope == "rollout":
            reference = state.reference
            if reference is None:
                raise RuntimeError(
                    "hidden_align: no statistics for this micro-batch: training_step ran "
                    "outside ppo_train"
                )
            share = ha.loss(states, anchors, score, reference=reference.stats, **options)
            step_rows = norms.get("global_batch_size")
            if step_rows is None:
                raise RuntimeError(
                    "hidden_align: OpenRLHF gave its policy loss no global_batch_size: this "
                    "OpenRLHF's normalisers are not supported"
                )
            value = share * (norms.get("dp_size", 1) * reference.total_rows / step_rows)
            # OpenRLHF averages per-sample metrics weighted by each micro-batch's rows: these
            # then average to the rollout batch's loss (exactly where no response is empty).
            # (A device tensor: no host read per micro-batch.)
            nonempty = experience.action_mask.reshape(len(score), -1).any(-1).sum().clamp(min=1)
            logged = share.detach() * (reference.total_rows / nonempty.to(device))
            valid_groups, cosine = reference.valid_groups, reference.mean_cosine
        else:
            value, stats = ha.loss(states, anchors, score, return_stats=True, **options)
            logged = value.detach()
            if trainer.args.train.dynamic_batch_enable:  # as OpenRLHF scales its aux loss
                value = value * trainer.replay_buffer.dynamic_sample_loss_scale[step]
            valid_groups, cosine = stats["valid_groups"], None  # 0-d: no host read
    info[METRIC_LOSS] = logged.float().reshape(1)
    info[METRIC_GROUPS] = torch.as_tensor(valid_groups, dtype=torch.float32, device=device)[None]
    if cosine is not None and valid_groups:  # the same on every rank and micro-batch
        info[METRIC_COSINE] = torch.tensor([cosine], device=device)
    return current.coef * value


def _pop_rows(experience) -> dict:
    info = experience.info
    if GROUP_KEY not in info or SCORE_KEY not in info:
        raise RuntimeError(
            "hidden_align: the micro-batch has no groups and scores: its rows were not made by "
            "the patched experience maker (start training with python -m "
            "hidden_align.integrations.openrlhf.train_ppo_ray)"
        )
    return {"group": _as_tensor(info.pop(GROUP_KEY)), "score": _as_tensor(info.pop(SCORE_KEY))}


def _training_step(self, experience, *args, **kwargs):
    original = _originals(type(self), "training_step")
    state = state_of(self)
    if state is None:
        return original(self, experience, *args, **kwargs)
    rows = _pop_rows(experience)
    step = args[1] if len(args) > 1 else kwargs.get("step")
    loss_fn, strategy = self.actor_loss_fn, self.strategy
    norms = {}
    policy_forward = loss_fn.forward
    backward = strategy.backward

    def recording_forward(*f_args, **f_kwargs):
        # The normalisers OpenRLHF gives its policy loss, whichever path computed them.
        norms.update(f_kwargs)
        return policy_forward(*f_args, **f_kwargs)

    def backward_with_term(loss, *b_args, **b_kwargs):
        term = _alignment(self, state, experience, rows, norms, step)
        return backward(loss + term, *b_args, **b_kwargs)

    loss_fn.forward, strategy.backward = recording_forward, backward_with_term
    state.armed, state.raw = True, None
    try:
        return original(self, experience, *args, **kwargs)
    finally:
        del loss_fn.forward, strategy.backward
        state.armed, state.raw = False, None


# ---- applying the patches --------------------------------------------------------------------


def _originals(cls, name: str):
    """The unpatched ``name`` of the patched class in ``cls``'s MRO (``cls`` may be a
    subclass of it, or Ray's actor subclass)."""
    for klass in cls.__mro__:
        originals = klass.__dict__.get(_ORIGINALS)
        if originals is not None and name in originals:
            return originals[name]
    raise RuntimeError(f"hidden_align: {cls.__name__}.{name} is not patched")


def _wrap(cls, wrappers: dict) -> bool:
    if _ORIGINALS in cls.__dict__:
        return False
    missing = [name for name in wrappers if not hasattr(cls, name)]
    if missing:
        raise RuntimeError(f"hidden_align: OpenRLHF's {cls.__name__} lacks {missing}")
    setattr(cls, _ORIGINALS, {name: getattr(cls, name) for name in wrappers})
    for name, wrapper in wrappers.items():
        setattr(cls, name, wrapper)
    return True


def unwrap(cls) -> None:
    """Puts back the methods a ``patch_*`` function wrapped (nothing if it did not)."""
    originals = cls.__dict__.get(_ORIGINALS)
    if originals is None:
        return
    for name, method in originals.items():
        setattr(cls, name, method)
    delattr(cls, _ORIGINALS)


def patch_actor_trainer(cls) -> bool:
    """Wraps ``__init__``, ``ppo_train`` and ``training_step`` of OpenRLHF's
    ``ActorPPOTrainer`` (idempotent). Returns True when this call patched."""
    return _wrap(cls, {"__init__": _init, "ppo_train": _ppo_train, "training_step": _training_step})


def patch_model_actor(cls) -> bool:
    """Wraps ``execute_batch`` of OpenRLHF's ``BaseModelActor`` (idempotent)."""
    return _wrap(cls, {"execute_batch": _execute_batch})


def patch_experience_maker(cls) -> bool:
    """Wraps ``make_experience`` of OpenRLHF's ``RemoteExperienceMaker`` (idempotent)."""
    return _wrap(cls, {"make_experience": _make_experience})


def patch_policy_loss(ppo_actor_module) -> bool:
    """Makes ``ActorPPOTrainer`` build the fused :class:`PolicyLoss` (OpenRLHF's own class
    where ours refuses the loss type: GSPO). Idempotent."""
    theirs = ppo_actor_module.PolicyLoss
    if getattr(theirs, "_hidden_align_fused", False):
        return False
    ours = policy_loss_class()

    def build(*args, **kwargs):
        if kwargs.get("policy_loss_type", "ppo") == "gspo":
            return theirs(*args, **kwargs)
        return ours(*args, **kwargs)

    build._hidden_align_fused = True
    build.openrlhf_policy_loss = theirs
    ppo_actor_module.PolicyLoss = build
    return True


def unpatch_policy_loss(ppo_actor_module) -> None:
    """Puts OpenRLHF's ``PolicyLoss`` back."""
    build = ppo_actor_module.PolicyLoss
    if getattr(build, "_hidden_align_fused", False):
        ppo_actor_module.PolicyLoss = build.openrlhf_policy_loss
