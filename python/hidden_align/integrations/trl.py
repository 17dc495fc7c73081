"""Hidden-Align for TRL's ``GRPOTrainer`` (tested with TRL 1.16).

:class:`HiddenAlignGRPOTrainer` is ``GRPOTrainer`` plus the alignment term: the hidden state
of each completion's anchor (the token before its answer marker) is pulled towards those of
the other correct completions of the same prompt. Use it where you would use ``GRPOTrainer``::

    from hidden_align.integrations.trl import HiddenAlignGRPOTrainer

    trainer = HiddenAlignGRPOTrainer(
        model="Qwen/Qwen2.5-0.5B-Instruct",
        reward_funcs=[accuracy, format_reward],
        args=GRPOConfig(...),
        train_dataset=dataset,
        align_coef=0.1,
        align_markers=["Answer:", "\\\\boxed{"],
        align_reward="accuracy",  # correct: this reward function's value > align_threshold
    )
    trainer.train()  # logs hidden_align/align_loss and hidden_align/anchor_cosine

The term is the loss of TRL's whole generation batch, however TRL splits it into micro-steps
and over processes (``align_scope="batch"``; see :class:`HiddenAlignGRPOTrainer`).

:class:`HiddenAlignGRPOMixin` carries the behaviour, for a ``GRPOTrainer`` subclass of your
own: ``class MyTrainer(HiddenAlignGRPOMixin, MyGRPOTrainer)``.

TRL is imported when ``HiddenAlignGRPOTrainer`` is first looked up, not with this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from .._args import as_float, check_choice, check_int
from ..align import loss as align_loss
from ..anchors import find_anchors
from ..errors import ArgumentError, HiddenAlignError, ShapeError
from ..stats import group_anchor_stats
from ._markers import resolve_markers
from ._statistics_pass import no_autocast
from .trl_statistics import AnchorRows, collecting, hidden_of, reduce_over_processes

# HiddenAlignGRPOTrainer comes from the module __getattr__ below.
__all__ = ["HiddenAlignGRPOMixin", "HiddenAlignGRPOTrainer"]  # noqa: F822

_LOSS_TYPES = ("cosine", "centroid", "mse", "contrastive")
_SCOPES = ("batch", "micro_batch")
# Per-completion columns added to TRL's batch: TRL shuffles and splits every [B] tensor of its
# batch in unison, so these stay attached to their rows.
REWARD_KEY = "hidden_align_reward"
GROUP_KEY = "hidden_align_group"
_METRICS = ("align_loss", "anchor_cosine", "anchored_fraction", "valid_groups")
_INSTALL = "pip install trl"
# The value of _align_pass_rows while TRL's no-grad pass is awaited.
_ARMED = object()
# The multimodal entries of a batch that TRL's forward takes, as _compute_loss passes them.
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def _check_coef(value) -> float:
    coef = as_float("align_coef", value)
    if not math.isfinite(coef) or coef < 0:
        raise ArgumentError(f"align_coef: expected a finite number >= 0, got {value!r}")
    return coef


def _check_markers_given(markers) -> None:
    example = "e.g. ['Answer:', '\\\\boxed{'], or lists of token ids"
    if markers is None:
        raise ArgumentError(
            f"align_markers: required: the answer marker(s) whose preceding token is the anchor, "
            f"{example}"
        )
    if isinstance(markers, str):
        return
    if isinstance(markers, (bytes, torch.Tensor)) or not isinstance(markers, Sequence):
        raise ArgumentError(
            "align_markers: expected a str or a non-empty list of str or token-id lists "
            f"({example}), got {type(markers).__name__}"
        )
    if not markers:
        raise ArgumentError(f"align_markers: expected at least one marker ({example}), got []")


def _resolve_markers(markers, processing_class):
    """The ``markers`` of ``find_anchors``: strings as text under the trainer's tokenizer, id
    lists as given."""
    items = [markers] if isinstance(markers, str) else list(markers)
    # A VLM processor carries its tokenizer; a tokenizer is its own.
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    return resolve_markers(items, tokenizer, "align_markers")


def _decoder_layers(backbone: nn.Module) -> nn.ModuleList | None:
    """The decoder blocks of a backbone: ``layers`` (Llama, Qwen, Mistral), ``h`` (GPT-2) or
    ``blocks``; else the shallowest ``ModuleList`` named ``layers`` (a VLM's language model)."""
    for name in ("layers", "h", "blocks"):
        found = getattr(backbone, name, None)
        if isinstance(found, nn.ModuleList):
            return found
    candidates = [
        (name.count("."), name, module)
        for name, module in backbone.named_modules()
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers"
    ]
    return min(candidates, key=lambda c: c[:2])[2] if candidates else None


class HiddenAlignGRPOMixin:
    """Adds the Hidden-Align term to a ``GRPOTrainer`` (see :class:`HiddenAlignGRPOTrainer`).

    Put it before the trainer class in the bases: ``class T(HiddenAlignGRPOMixin, GRPOTrainer)``.
    It overrides ``_calculate_rewards`` and ``_generate_and_score_completions`` (to carry each
    completion's reward and group with its row), ``_get_per_token_logps_and_entropies`` (to
    gather the statistics in TRL's own no-grad pass) and ``_compute_loss`` (to add the term).
    """

    def __init__(
        self,
        *args,
        align_coef: float = 0.1,
        align_markers=None,
        align_reward: str | None = None,
        align_threshold: float = 0.5,
        align_loss_type: str = "cosine",
        align_layer: int | None = None,
        align_offset: int = -1,
        align_scope: str = "batch",
        **kwargs,
    ):
        # What can be checked without the model is checked before TRL loads it.
        self.align_coef = _check_coef(align_coef)
        check_choice("align_scope", align_scope, _SCOPES)
        if align_scope == "batch" and align_loss_type == "contrastive":
            raise ArgumentError(
                "align_loss_type: 'contrastive' cannot be shared out over micro-steps and "
                "processes; use align_scope='micro_batch' with it, or another loss type"
            )
        self.align_scope = align_scope
        _check_markers_given(align_markers)
        if align_reward is not None and not isinstance(align_reward, str):
            raise ArgumentError(
                f"align_reward: expected the name of a reward function (a str) or None, "
                f"got {type(align_reward).__name__}"
            )
        self.align_threshold = as_float("align_threshold", align_threshold)
        if math.isnan(self.align_threshold):
            raise ArgumentError("align_threshold: expected a number, got nan")
        check_choice("align_loss_type", align_loss_type, _LOSS_TYPES)
        self.align_loss_type = align_loss_type
        check_int("align_layer", align_layer)
        check_int("align_offset", align_offset, optional=False)
        self.align_offset = align_offset
        self._align_rewards = None
        # The statistics of the current generation batch (align_scope="batch"), where they
        # came from, and the rows gathered while TRL's own no-grad pass runs.
        self._align_reference = None
        self.align_statistics_source = None
        self._align_pass_rows = None
        super().__init__(*args, **kwargs)

        names = list(self.reward_func_names)
        if align_reward is None:
            self.align_reward = names[0]
        elif names.count(align_reward) == 1:
            self.align_reward = align_reward
        else:
            problem = "is ambiguous among" if align_reward in names else "is not one of"
            raise ArgumentError(
                f"align_reward: {align_reward!r} {problem} the trainer's reward functions {names}"
            )
        self._align_reward_index = names.index(self.align_reward)
        self.align_markers = _resolve_markers(align_markers, self.processing_class)
        if align_layer is not None:
            layers = _decoder_layers(self._align_backbone(self.model))
            if layers is None:
                raise ArgumentError(
                    f"align_layer: found no decoder layers in {type(self.model).__name__}; "
                    "use align_layer=None (the backbone's output, after its final norm)"
                )
            if not -len(layers) <= align_layer < len(layers):
                raise ArgumentError(
                    f"align_layer: expected an index into the model's {len(layers)} decoder "
                    f"layers ({-len(layers)} to {len(layers) - 1}) or None, got {align_layer}"
                )
        self.align_layer = align_layer

    # ---- rewards and groups, attached to the rows ------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(
            inputs, prompts, completions, completion_ids_list
        )
        # [completions of every process, reward functions]; sliced to this process's rows below.
        self._align_rewards = rewards_per_func[:, self._align_reward_index]
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._align_rewards = None
        mode = "train" if self.model.training else "eval"
        if self.align_scope == "batch" and mode == "train":
            # A new generation batch: the statistics of the last one no longer apply.
            self._align_reference, self.align_statistics_source = None, None
            self._align_pass_rows = _ARMED if self._align_trl_runs_pass() else None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            pass_rows, self._align_pass_rows = self._align_pass_rows, None
        rewards, self._align_rewards = self._align_rewards, None
        if rewards is None:
            raise RuntimeError(
                "HiddenAlignGRPOTrainer: GRPOTrainer scored completions without "
                "_calculate_rewards; this TRL version is not supported (tested with 1.16)"
            )
        # TRL gathers every process's completions in process order and forms groups of
        # num_generations consecutive ones; this process holds the len(inputs) rows at `start`.
        local = len(inputs)
        start = self.accelerator.process_index * local
        if rewards.shape[0] != local * self.accelerator.num_processes:
            raise ShapeError(
                f"align_reward: expected {local * self.accelerator.num_processes} rewards "
                f"({local} completions on each of {self.accelerator.num_processes} processes), "
                f"got {rewards.shape[0]}"
            )
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        device = output["completion_ids"].device
        output[REWARD_KEY] = rewards[start : start + local].to(device)
        # Labels from the position before TRL shuffles the rows; the loss takes them in any order.
        output[GROUP_KEY] = torch.arange(start, start + local, device=device) // group_size
        # Only the pass whose log-probs TRL kept as old_per_token_logps (not a reference
        # model's pass with the adapter off). A tool mask (env_mask of a rollout_func) came
        # after the pass's anchors were found without it. Otherwise the statistics come from a
        # pass of their own; both conditions are the same on every process.
        kept = "old_per_token_logps" in output and "tool_mask" not in output
        if isinstance(pass_rows, AnchorRows) and kept:
            self._align_reference = reduce_over_processes(
                lambda: pass_rows.statistics(
                    output[REWARD_KEY], output[GROUP_KEY], self.align_threshold
                ),
                device,
            )
            self.align_statistics_source = "trl_pass"
        return output

    # ---- the statistics of the generation batch (align_scope="batch") ------------------------

    def _align_trl_runs_pass(self) -> bool:
        """Whether TRL computes ``old_per_token_logps`` in a no-grad pass over the generation
        batch (its own condition), where one micro-step does not hold the whole batch. Not
        with tools: that pass does not see which completion tokens are tool output."""
        if self.args.steps_per_generation == 1 or getattr(self, "tools", None):
            return False
        generate_every = self.args.steps_per_generation * self.num_iterations
        vllm_correction = getattr(self, "use_vllm", False) and getattr(
            self, "vllm_importance_sampling_correction", False
        )
        return self.args.gradient_accumulation_steps % generate_every != 0 or vllm_correction

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
    ):
        if (
            self._align_pass_rows is not _ARMED
            or model is not self.model
            or torch.is_grad_enabled()
        ):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        # The policy's first no-grad pass while a generation batch is scored: the one for
        # old_per_token_logps (the reference model's comes after it). TRL chunks it by
        # batch_size; each chunk's forward leaves its anchor rows.
        chunk = kwargs.get("batch_size", args[0] if args else None) or input_ids.shape[0]
        in_completion = attention_mask.clone()
        in_completion[:, : in_completion.shape[1] - logits_to_keep] = 0
        rows = AnchorRows.found(self._align_anchors, input_ids, in_completion, chunk)
        self._align_pass_rows = rows
        with collecting(self._align_capture_module(model), rows):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )

    def _align_own_pass(self):
        """The statistics of the buffered generation batch from a no-grad forward of its
        micro-batches (:meth:`_align_statistics_forward`), all-reduced over the processes."""
        batches = getattr(self, "_buffered_inputs", None)
        if not batches:
            raise HiddenAlignError(
                "HiddenAlignGRPOTrainer: no buffered generation batch to collect the alignment "
                "statistics from (TRL's _buffered_inputs is empty); this TRL version is not "
                "supported (tested with 1.16)"
            )
        module = self._align_capture_module(self.model)
        gathered = []
        with torch.no_grad(), self._align_checkpointing_off():
            for batch in batches:
                token_ids, in_completion = self._align_tokens(batch)
                rows = AnchorRows.found(self._align_anchors, token_ids, in_completion)
                with collecting(module, rows):
                    self._align_statistics_forward(batch, token_ids)
                gathered.append((rows, batch))

        def part():
            parts = [
                rows.statistics(batch[REWARD_KEY], batch[GROUP_KEY], self.align_threshold)
                for rows, batch in gathered
            ]
            return parts[0].merge(*parts[1:])

        return reduce_over_processes(part, self.accelerator.device)

    def _align_statistics_forward(self, batch: dict, token_ids: torch.Tensor) -> None:
        """One micro-batch's no-grad forward for the statistics. Text-only, and with the model
        whole on each process (no FSDP, no DeepSpeed): the backbone alone, which computes the
        same states without the LM head (its vocabulary projection and log-softmax). Otherwise
        TRL's own forward, which knows how to run a sharded model and multimodal inputs."""
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        inputs = {key: batch.get(key) for key in _FORWARD_KEYS}
        sharded = getattr(self, "is_fsdp_enabled", False) or getattr(
            self, "is_deepspeed_enabled", False
        )
        if sharded or any(value is not None for value in inputs.values()):
            super()._get_per_token_logps_and_entropies(
                self.model,
                token_ids,
                attention,
                batch["completion_ids"].shape[1],
                batch_size=len(token_ids),
                **inputs,
            )
            return
        with self.accelerator.autocast():
            self._align_backbone(self.model)(
                input_ids=token_ids, attention_mask=attention, use_cache=False
            )

    def _align_checkpointing_off(self):
        """Reentrant gradient checkpointing off for a no-grad pass, as TRL turns it off for
        its own (it warns there); non-reentrant checkpointing runs a no-grad forward as it is,
        and is left alone: turning it back on adds a hook to the input embeddings each time."""
        from trl.models.utils import disable_gradient_checkpointing

        kwargs = self.args.gradient_checkpointing_kwargs
        # transformers' default (kwargs None) is non-reentrant; torch's, without the key, not.
        reentrant = kwargs is not None and kwargs.get("use_reentrant", True)
        if not reentrant or not getattr(self.model, "is_gradient_checkpointing", False):
            return nullcontext()
        return disable_gradient_checkpointing(self.model, kwargs)

    def _align_reference_before_forward(self, mode: str):
        """The generation batch's statistics where they exist before this micro-step's forward:
        TRL's pass, or a pass of our own, run now at the generation batch's first micro-step
        whatever ``align_coef`` (the metrics of a baseline run with 0 then mean what they
        mean with the term). None where the forward gives them (:meth:`_align_from_forward`)
        and with ``align_scope="micro_batch"``."""
        if self.align_scope != "batch" or self._align_from_forward(mode):
            return None
        if self._align_reference is None:
            device = self.accelerator.device
            # Without drawing random numbers (dropout in train mode): with align_coef 0 the
            # run stays plain GRPOTrainer's, bit for bit.
            devices = [] if device.type == "cpu" else [device]
            with torch.random.fork_rng(devices=devices, device_type=device.type):
                self._align_reference = self._align_own_pass()
            self.align_statistics_source = "own_pass"
        return self._align_reference

    def _align_from_forward(self, mode: str) -> bool:
        """Whether one micro-step holds this process's whole generation batch."""
        return mode == "eval" or self.args.steps_per_generation == 1

    # ---- the loss --------------------------------------------------------------------------

    def _align_backbone(self, model: nn.Module) -> nn.Module:
        """The module whose ``last_hidden_state`` TRL's fused LM head reads."""
        unwrapped = self.accelerator.unwrap_model(model)
        get_base_model = getattr(unwrapped, "get_base_model", None)  # a PEFT model
        causal_lm = get_base_model() if callable(get_base_model) else unwrapped
        return getattr(causal_lm, "base_model", causal_lm)

    def _align_capture_module(self, model: nn.Module) -> nn.Module:
        backbone = self._align_backbone(model)
        if self.align_layer is None:
            return backbone
        layers = _decoder_layers(backbone)
        if layers is None:
            raise ArgumentError(
                f"align_layer: found no decoder layers in {type(backbone).__name__}"
            )
        return layers[self.align_layer]

    def _align_tokens(self, inputs: dict) -> tuple:
        """``(token_ids, in_completion)`` of a batch: prompt and completion tokens, and where
        the model's own completion tokens are (the markers are searched there)."""
        missing = [key for key in (REWARD_KEY, GROUP_KEY) if key not in inputs]
        if missing:
            raise ArgumentError(
                f"inputs: missing {missing}: the batch must come from this trainer's "
                "_generate_and_score_completions"
            )
        token_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        completion_mask = inputs["completion_mask"]
        if inputs.get("tool_mask") is not None:
            # Tool results and environment output (tool_mask 0) are not the model's own text,
            # and TRL leaves them out of its loss: a marker printed there is no anchor.
            completion_mask = completion_mask * inputs["tool_mask"]
        in_completion = torch.cat([torch.zeros_like(inputs["prompt_mask"]), completion_mask], dim=1)
        return token_ids, in_completion

    def _align_anchors(self, token_ids, in_completion) -> torch.Tensor:
        return find_anchors(token_ids, in_completion, self.align_markers, offset=self.align_offset)

    def _align_anchors_of(self, inputs: dict, hidden: torch.Tensor) -> torch.Tensor:
        """The anchors of a batch whose hidden states are ``hidden``."""
        token_ids, in_completion = self._align_tokens(inputs)
        if tuple(hidden.shape[:2]) != tuple(token_ids.shape):
            raise ShapeError(
                f"hidden: expected [B, P + C, H] with [B, P + C] = {list(token_ids.shape)} "
                f"(prompt and completion tokens), got shape {list(hidden.shape)}"
            )
        return self._align_anchors(token_ids, in_completion)

    def compute_align_loss(self, inputs: dict, hidden: torch.Tensor, reference=None) -> tuple:
        """The alignment loss of one batch of TRL's, before the coefficient and any scaling.

        Args:
            inputs: the batch ``_compute_loss`` receives (``prompt_ids``, ``completion_ids``,
                ``completion_mask``, ``tool_mask`` when TRL ran tools, and the reward and group
                columns this trainer adds). Markers are searched where ``completion_mask``
                (times ``tool_mask``) is nonzero: the model's own completion tokens.
            hidden: ``[B, P + C, H]`` hidden states over the prompt and completion tokens.
            reference: the generation batch's :class:`hidden_align.GroupAnchorStats`, or None.
                With them the loss is this batch's share of the generation batch's loss
                (:func:`hidden_align.loss` with ``reference=``) and the stats are the
                generation batch's.

        Returns:
            ``(loss, stats)``: the 0-d float32 loss of :func:`hidden_align.loss` and its stats
            (``mean_cosine``, ``valid_groups``, ``anchored_correct``) plus ``anchors``, the
            ``[B]`` anchor positions in ``P + C`` (-1: no marker in the completion).
        """
        anchors = self._align_anchors_of(inputs, hidden)
        return self._align_loss_at(inputs, hidden, anchors, reference)

    def _align_loss_at(self, inputs: dict, hidden, anchors, reference) -> tuple:
        options = {"reference": reference} if reference is not None else {}
        value, stats = align_loss(
            hidden,
            anchors,
            inputs[REWARD_KEY],
            group_ids=inputs[GROUP_KEY],
            loss_type=self.align_loss_type,
            threshold=self.align_threshold,
            return_stats=True,
            **options,
        )
        return value, {**stats, "anchors": anchors}

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        reference = self._align_reference_before_forward(mode)
        # TRL's forward returns log-probs only (its fused LM head), so the hidden states are
        # taken from the module that produces them while TRL runs its own forward.
        captured = []
        module = self._align_capture_module(model)
        handle = module.register_forward_hook(lambda _m, _a, out: captured.append(hidden_of(out)))
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            # Removed before backward: a checkpointed layer's recomputation must not append.
            handle.remove()
        if not captured:
            raise HiddenAlignError(
                f"HiddenAlignGRPOTrainer: {type(module).__name__} did not run during TRL's "
                "forward, so no hidden state was captured"
            )
        hidden = captured[0] if len(captured) == 1 else torch.cat(captured, dim=0)
        add = self.align_coef != 0
        if add and torch.is_grad_enabled() and not hidden.requires_grad:
            raise HiddenAlignError(
                f"align_layer={self.align_layer}: the captured hidden state carries no gradient "
                "(reentrant gradient checkpointing runs each layer without autograd); use "
                "gradient_checkpointing_kwargs={'use_reentrant': False} or align_layer=None"
            )
        anchors = self._align_anchors_of(inputs, hidden)
        with no_autocast(hidden.device):
            if self.align_scope == "batch" and self._align_from_forward(mode):
                # This forward holds the process's whole generation batch: its own states,
                # all-reduced over the processes, are the statistics.
                reference = reduce_over_processes(
                    lambda: group_anchor_stats(
                        hidden.detach(),
                        anchors,
                        inputs[REWARD_KEY],
                        group_ids=inputs[GROUP_KEY],
                        threshold=self.align_threshold,
                    ),
                    hidden.device,
                )
                if mode == "train":  # what evaluation used is not what training uses
                    self.align_statistics_source = "forward"
            # With a zero coefficient nothing is added (0 * NaN would still reach the loss),
            # but the diagnostics are still logged: a baseline run shows how aligned the
            # anchors are.
            with torch.set_grad_enabled(add and torch.is_grad_enabled()):
                value, stats = self._align_loss_at(
                    inputs, hidden if add else hidden.detach(), anchors, reference
                )
        if reference is not None:
            # The share scaled up to the generation batch: its mean over the micro-steps and
            # processes of a generation batch is the generation batch's loss.
            per_generation = self.args.steps_per_generation if mode == "train" else 1
            value = value * (per_generation * self.accelerator.num_processes)
        if add:
            # As TRL scales its own auxiliary loss: divided over the accumulated micro-steps
            # (processes are averaged by the gradient all-reduce).
            scale = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.align_coef * value / scale
        self._log_align_metrics(mode, value, stats)
        return loss

    def _log_align_metrics(self, mode: str, value: torch.Tensor, stats: dict) -> None:
        anchors = stats["anchors"]
        row = torch.stack(
            [
                value.detach().float(),
                stats["mean_cosine"].float(),
                (anchors >= 0).float().mean(),
                stats["valid_groups"].float(),
            ]
        ).to(anchors.device)
        # One collective and one host read for all four; NaN cosines (no valid group on a
        # process) are left out of the mean, and TRL's log drops an all-NaN value.
        gathered = self.accelerator.gather(row).view(-1, len(_METRICS))
        for name, mean in zip(_METRICS, gathered.nanmean(dim=0).tolist()):
            self._metrics[mode][f"hidden_align/{name}"].append(mean)


_TRAINER = None


def _trainer_class() -> type:
    global _TRAINER
    if _TRAINER is not None:
        return _TRAINER
    try:
        from trl import GRPOTrainer
    except ImportError as exc:
        raise ImportError(
            f"HiddenAlignGRPOTrainer needs TRL (tested with 1.16): {_INSTALL}"
        ) from exc
    needed = (
        "_calculate_rewards",
        "_generate_and_score_completions",
        "_get_per_token_logps_and_entropies",
        "_prepare_inputs",
        "_compute_loss",
    )
    absent = [name for name in needed if not hasattr(GRPOTrainer, name)]
    if absent:
        import trl

        raise ImportError(
            f"HiddenAlignGRPOTrainer: TRL {trl.__version__}'s GRPOTrainer lacks {absent}, which "
            "this integration overrides (tested with TRL 1.16)"
        )

    class HiddenAlignGRPOTrainer(HiddenAlignGRPOMixin, GRPOTrainer):
        """TRL's ``GRPOTrainer`` with the Hidden-Align alignment term added to its loss.

        Every ``GRPOTrainer`` argument is accepted as is; the ``align_*`` keywords configure the
        term ``align_coef * hidden_align.loss(hidden, anchors, rewards, group_ids=groups)``:

        * ``hidden``: the policy's last hidden state (the backbone's output, after its final
          norm) over prompt and completion, captured during TRL's own forward: no extra pass.
        * ``anchors``: per completion, the token before the last answer marker inside the
          completion (:func:`hidden_align.find_anchors`); -1 (no part in the loss) without one.
        * ``rewards``: the value of the reward function named ``align_reward``; a completion
          is correct when it is above ``align_threshold``.
        * ``groups``: TRL's groups of ``num_generations`` completions of one prompt
          (``num_generations_eval`` in evaluation).

        With ``align_scope="batch"`` (the default) the loss is that of TRL's whole generation
        batch (``per_device_train_batch_size x steps_per_generation`` rows on each process, all
        processes together): each micro-step adds ``align_coef * share * steps_per_generation *
        num_processes / gradient_accumulation_steps``, ``share`` being its rows' share of the
        generation batch's loss against statistics all-reduced over the processes
        (:mod:`hidden_align.integrations.trl_statistics` says where they come from and what they
        cost). TRL scales its own auxiliary losses by ``1 / gradient_accumulation_steps`` and the
        gradient all-reduce averages the processes, so each optimiser step's gradient is
        ``align_coef x steps_per_generation / gradient_accumulation_steps x`` that of the
        generation batch's loss: ``align_coef x`` it in TRL's usual schedules.
        With ``align_scope="micro_batch"`` each micro-step adds
        ``align_coef * loss / gradient_accumulation_steps`` with the loss of its own rows: with
        ``steps_per_generation > 1`` or several processes a group's correct completions are then
        aligned only with those that share their micro-step. With ``align_coef=0`` nothing is
        added (the run is plain ``GRPOTrainer``, bit for bit) and the metrics are still logged.

        Logged per step (averaged over micro-steps and processes): ``hidden_align/align_loss``
        (the loss before the coefficient: with ``"batch"`` each micro-step's share scaled up to
        the generation batch, averaging to its loss over the generation batch's micro-steps;
        0 when no group has two correct anchored completions), ``hidden_align/anchor_cosine``
        (mean pairwise cosine of correct anchors within groups, the generation batch's with
        ``"batch"``; absent when no group has two), ``hidden_align/anchored_fraction``
        (completions with a marker) and ``hidden_align/valid_groups``.

        Args:
            *args: ``GRPOTrainer``'s positional arguments (``model``, ``reward_funcs``, ...).
            align_coef: the coefficient of the term, a finite number >= 0 (default 0.1). It may
                be changed between steps (``trainer.align_coef = ...``).
            align_markers: the answer marker(s): a string, or a list of strings and token-id
                lists. Strings are matched as text over the tokenizer's vocabulary
                (:func:`hidden_align.text_markers`: found however the tokenizer merges the
                marker with its neighbours); id lists are matched token for token. Required.
            align_reward: the name of the reward function that decides correctness, as TRL
                names it (a function's ``__name__``; ``trainer.reward_func_names``). Default:
                the first reward function.
            align_threshold: correct means ``reward > align_threshold`` (default 0.5); a reward
                function's ``None`` (NaN) counts as incorrect.
            align_loss_type: ``"cosine"`` (default), ``"centroid"``, ``"mse"`` or
                ``"contrastive"`` (see :func:`hidden_align.loss`).
            align_layer: ``None`` (default): the backbone's output, after its final norm
                (``output_hidden_states=True``'s ``hidden_states[-1]``); an int ``i``: the
                output of decoder layer ``i`` (Python indexing, before the final norm; for
                ``i >= 0``, ``hidden_states[i + 1]``). With an int and
                gradient checkpointing, checkpointing must be non-reentrant (the default).
            align_offset: the anchor's position relative to the marker's first token (default
                -1, the token before it; see :func:`hidden_align.find_anchors`).
            align_scope: ``"batch"`` (default): the loss of the generation batch;
                ``"micro_batch"``: the loss of each micro-step's own rows (no statistics, no
                collective; the only scope for ``"contrastive"``).
            **kwargs: ``GRPOTrainer``'s keyword arguments (``args``, ``train_dataset``,
                ``processing_class``, ``peft_config``, ...).

        Raises:
            ArgumentError: an invalid ``align_*`` value, an ``align_reward`` that names no
                reward function (the message lists them), ``align_layer`` out of range, or
                ``"contrastive"`` with ``align_scope="batch"``.
        """

    # Named as the attribute it is reached by, so that pickle finds it.
    HiddenAlignGRPOTrainer.__module__ = __name__
    HiddenAlignGRPOTrainer.__qualname__ = "HiddenAlignGRPOTrainer"
    _TRAINER = HiddenAlignGRPOTrainer
    return _TRAINER


def __getattr__(name: str):
    # TRL's trainer module takes seconds to import: done on first use of the trainer only.
    if name == "HiddenAlignGRPOTrainer":
        return _trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | {"HiddenAlignGRPOTrainer"})
