"""The generation batch's group statistics for :class:`HiddenAlignGRPOTrainer`.

TRL generates once per generation batch (``per_device_train_batch_size x
steps_per_generation`` rows on each process), shuffles it and trains on it in
``steps_per_generation`` micro-steps, while the completions of one prompt are spread over
processes. The loss of a group depends on all of its correct completions, so each micro-step
adds its share of the generation batch's loss (``hidden_align.loss(..., reference=stats)``)
against statistics that cover the whole generation batch, all-reduced over TRL's processes.

Where the statistics come from (:data:`SOURCES`), cheapest first:

* ``"forward"``: when one micro-step holds the process's whole generation batch
  (``steps_per_generation == 1``, and every evaluation batch), the statistics come from the
  loss's own forward, detached, and cost one small all-reduce.
* ``"trl_pass"``: when TRL runs its own no-grad forward over the generation batch (the one
  that computes ``old_per_token_logps``: with vLLM importance-sampling correction, or when
  ``gradient_accumulation_steps`` is not a multiple of ``steps_per_generation x
  num_iterations``), the anchor rows are gathered during that pass, at no extra forward.
* ``"own_pass"``: otherwise a no-grad forward over the generation batch's micro-batches at the
  first micro-step that needs it, under TRL's autocast: of the backbone alone (no LM head)
  where the model is whole on each process and the inputs are text, else TRL's own forward.
  That costs one forward without backward per generation batch (about 5% of a step in
  ``benches/bench_trl_statistics_pass.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from ..stats import group_anchor_stats
from ._statistics_pass import _RankFailure, all_reduced_parts, peer_failed

__all__ = ["SOURCES", "AnchorRows", "collecting", "hidden_of", "reduce_over_processes"]

SOURCES = ("forward", "trl_pass", "own_pass")

# What the other processes are told when one of them fails before the all-reduce.
_COLLECT_ERROR, _NO_ROWS = 1, 2
_REASONS = {
    _COLLECT_ERROR: "its generation batch's anchors, rewards or groups could not be read",
    _NO_ROWS: "its no-grad pass gathered no anchor rows",
}
_on_peer = peer_failed("statistics pass over TRL's generation batch", _REASONS)


def hidden_of(output) -> torch.Tensor:
    """The hidden states in a module's output: a ``BaseModelOutput``, a tuple or a tensor."""
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is not None:
        return hidden
    return output[0] if isinstance(output, (tuple, list)) else output


class AnchorRows:
    """The anchor rows of one no-grad pass over ``B`` rows, run in chunks of ``chunk`` rows.

    The anchors are found from the token ids before the pass; each forward of the hooked
    module then keeps only its rows' anchor states (``[chunk, H]``), so the pass holds
    ``O(B H)`` beyond what TRL holds.
    """

    def __init__(self, anchors: torch.Tensor, chunk: int) -> None:
        self.anchors = anchors
        self.chunk = max(int(chunk), 1)
        self.rows: list = []
        self.failure: Exception | None = None

    @classmethod
    def found(cls, find: Callable, token_ids, in_completion, chunk: int | None = None):
        """The rows of a pass over ``token_ids`` whose anchors ``find(token_ids,
        in_completion)`` gives. An error there is kept, not raised: the pass still runs (its
        forwards may be collectives) and the error is raised on every process after it."""
        chunk = token_ids.shape[0] if chunk is None else chunk
        try:
            return cls(find(token_ids, in_completion), chunk)
        except Exception as exc:  # noqa: BLE001 - raised on every process in the all-reduce
            rows = cls(torch.full((token_ids.shape[0],), -1, dtype=torch.int64), chunk)
            rows.failure = exc
            return rows

    def hook(self, _module, _args, output) -> None:
        if self.failure is not None:
            return
        try:
            hidden = hidden_of(output)
            start = len(self.rows) * self.chunk
            anchors = self.anchors[start : start + self.chunk].to(hidden.device)
            if hidden.dim() != 3 or hidden.shape[0] != anchors.shape[0]:
                raise RuntimeError(
                    f"hidden_align: the hooked module's output has shape {list(hidden.shape)} in "
                    f"forward {len(self.rows)} of the no-grad pass; expected [{anchors.shape[0]}, "
                    "T, H] (one forward per chunk of rows, unpacked)"
                )
            picked = hidden.detach()[torch.arange(anchors.shape[0]), anchors.clamp(min=0)]
            self.rows.append(picked)
        except Exception as exc:  # noqa: BLE001 - agreed with the other processes later
            self.failure = exc

    def statistics(self, rewards, group_ids, threshold: float):
        """This process's part of the statistics (or raises what the pass met)."""
        if self.failure is not None:
            raise self.failure
        seen = sum(r.shape[0] for r in self.rows)
        if seen != self.anchors.shape[0]:
            raise _RankFailure(
                _NO_ROWS,
                f"hidden_align: the no-grad pass ran the hooked module on {seen} of its "
                f"{self.anchors.shape[0]} rows",
            )
        rows = torch.cat(self.rows)
        # The gathered rows as a [B, 1, H] batch whose anchor, where there is one, is at 0.
        at = torch.where(self.anchors.to(rows.device) >= 0, 0, -1)
        return group_anchor_stats(
            rows[:, None, :],
            at,
            rewards.to(rows.device),
            group_ids=group_ids.to(rows.device),
            threshold=threshold,
        )


@contextmanager
def collecting(module: torch.nn.Module, rows: AnchorRows):
    """``rows`` gathers the anchor states of every forward of ``module`` inside the block."""
    handle = module.register_forward_hook(rows.hook)
    try:
        yield rows
    finally:
        handle.remove()


def reduce_over_processes(part: Callable, device: torch.device):
    """The statistics of the whole generation batch: ``part()`` (this process's statistics)
    all-reduced over TRL's processes. A failure on one process raises on every process, in
    the all-reduce that would otherwise leave the others waiting."""
    parts, failure = [], None
    try:
        parts.append(part())
    except Exception as exc:  # noqa: BLE001 - raised on every process below
        failure = exc
    stats, _ = all_reduced_parts(
        parts,
        failure,
        0,
        process_group=None,
        device=lambda: device,
        empty=_RankFailure(_NO_ROWS, "hidden_align: no statistics"),
        code=_COLLECT_ERROR,
        on_peer=_on_peer,
    )
    return stats
