"""The fuzz harness (scripts/fuzz.py) on deterministic inputs: pseudo-random byte strings and
hand-picked edge inputs for every target. Any outcome the harness does not allow fails the
test; the defects it has found are each kept below as a regression test."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import hidden_align as ha
from hidden_align import _native

_SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "fuzz.py")
_spec = importlib.util.spec_from_file_location("hidden_align_fuzz", _SCRIPT)
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

SEEDS = 3000


def test_random_inputs_give_only_allowed_outcomes():
    fuzz.counts.clear()
    for seed in range(SEEDS):
        data = fuzz.seed_input(seed)
        try:
            fuzz.one_input(data)
        except fuzz.Finding as e:
            pytest.fail(f"seed {seed} ({data!r}): {e}")
    # The inputs must reach the ops, not only their first check: a harness that only ever
    # produced argument errors would pass vacuously.
    assert fuzz.counts["ok"] > SEEDS // 20, dict(fuzz.counts)
    assert fuzz.counts["skipped (arguments not built)"] < SEEDS // 50, dict(fuzz.counts)
    for label in ("ArgumentError", "ShapeError", "DtypeError", "DeviceError"):
        assert fuzz.counts[label] > 0, dict(fuzz.counts)


EDGE_FILLERS = [b"", b"\x00" * 96, b"\xff" * 96, b"\x80" * 96, bytes(range(256)), b"\x01\x00" * 48]


@pytest.mark.parametrize("target", fuzz.TARGETS, ids=lambda t: t.__name__)
def test_edge_inputs_of_every_target(target):
    """Exhausted input (every draw its minimum: empty tensors, first choices), all-ones bits
    (every draw its maximum) and other fillers, on each target."""
    for filler in EDGE_FILLERS:
        try:
            fuzz.one_input(filler, target=target)
        except fuzz.Finding as e:
            pytest.fail(f"{target.__name__} on {filler[:8]!r}...: {e}")


def test_every_target_returns_normally_on_some_input():
    """Each target is reached with arguments it accepts, so its success path (and the check
    of its buffers after the call) is fuzzed too."""
    ok = {t.__name__: 0 for t in fuzz.TARGETS}
    for seed in range(400):
        for target in fuzz.TARGETS:
            if ok[target.__name__] < 2 and fuzz.one_input(fuzz.seed_input(seed), target) == "ok":
                ok[target.__name__] += 1
        if all(ok.values()):
            break
    assert all(ok.values()), ok


def test_buffer_guard_sees_writes_outside_a_view_and_into_inputs():
    """The harness's memory check is not vacuous: a write past an output's view, or any write
    into an input, is reported."""
    buf = torch.zeros(10)
    view = buf.as_strided([3], [2], 1)
    out = fuzz.Guard("out", buf, view, outside_only=True)
    view.fill_(1.0)
    assert out.changed() is None
    buf[0] = 5.0
    assert "outside its view" in out.changed()
    inp = torch.arange(6, dtype=torch.int32)
    guard = fuzz.Guard("inp", inp, inp[::2], outside_only=False)
    inp[1] = 0  # not even an element the view addresses
    assert "an input" in guard.changed()


def test_classify_rejects_kernel_errors_and_foreign_exceptions():
    assert fuzz.classify(ha.ArgumentError("x"), native=False) == "ArgumentError"
    assert fuzz.classify(ha.KernelError("x"), native=False) is None
    try:
        torch.ones(2) + torch.ones(3)
    except RuntimeError as e:
        assert fuzz.classify(e, native=False) is None
    try:
        ha.dapo.group_advantages(torch.ones(2), group_size=1, eps="x")
    except ha.ArgumentError as e:
        assert fuzz.classify(e, native=False) == "ArgumentError"


# ---- defects found by the harness -------------------------------------------------------------
# A fixed one stays as a regression test; an open one is a strict xfail and an entry of
# KNOWN_DEFECTS in scripts/fuzz.py.


@pytest.mark.parametrize("op", ["group_advantages", "dynamic_sampling_mask", "loss"])
def test_group_size_beyond_int64_is_an_argument_error(op):
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0])
    with pytest.raises(ha.ArgumentError, match="group_size"):
        if op == "loss":
            ha.loss(torch.ones(4, 2, 3), torch.tensor([0, 1, 0, 1]), scores, group_size=2**64)
        else:
            getattr(ha.dapo, op)(scores, group_size=2**64)


def test_dp_size_beyond_int64_is_an_argument_error():
    logp = torch.zeros(2, 3)
    with pytest.raises(ha.ArgumentError, match="dp_size"):
        ha.dapo.policy_loss(logp, logp, torch.ones(2), torch.ones(2, 3), dp_size=2**64)


@pytest.mark.parametrize("uids", [None, 5, 1.5, True])
def test_uids_that_are_not_a_sequence_are_an_argument_error(uids):
    with pytest.raises(ha.ArgumentError, match="uids: expected a sequence of uid strings"):
        ha.dapo.group_ids_from_uids(uids)


def test_a_uid_without_utf8_form_is_an_argument_error_naming_the_item():
    with pytest.raises(ha.ArgumentError, match=r"uids\[2\]: expected a uid with a UTF-8"):
        ha.dapo.group_ids_from_uids(["a", b"\xff", "x\udc80y", "\ud800"])
    # Through an op taking uids, the error names that op's argument.
    with pytest.raises(ha.ArgumentError, match=r"group_ids\[0\]"):
        ha.dapo.group_advantages(torch.ones(2), group_ids=["\ud800", "a"])


def test_an_item_whose_str_raises_unicode_error_keeps_its_own_error():
    """The error path looks for the item without a UTF-8 form; when no item has one, the
    UnicodeEncodeError came from an item's ``__str__`` and is left as it is."""

    class Raises:
        def __str__(self):
            raise UnicodeEncodeError("utf-8", "x", 0, 1, "its own")

    with pytest.raises(UnicodeEncodeError, match="its own"):
        ha.dapo.group_ids_from_uids(["a", Raises()])


@pytest.mark.parametrize("value", ["False", "false", 1, 0, None, np.bool_(True), torch.ones(2)])
def test_norm_by_std_must_be_a_bool(value):
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0])
    with pytest.raises(ha.ArgumentError, match="norm_by_std: expected a bool"):
        ha.dapo.group_advantages(scores, group_size=2, norm_by_std=value)


@pytest.mark.parametrize("loss_type", [["cosine"], {"cosine"}, np.array(["cosine", "mse"])])
def test_rows_with_an_unhashable_loss_type_is_an_argument_error(loss_type):
    stats = ha.group_anchor_stats(
        torch.randn(4, 3, 2), torch.tensor([0, 1, 2, 0]), torch.ones(4), group_size=2
    )
    with pytest.raises(ha.ArgumentError, match="loss_type: expected None or one of"):
        stats.rows(stats.group_ids, loss_type=loss_type)


@pytest.mark.parametrize(
    "call",
    [
        lambda v: ha.loss(
            torch.ones(2, 3, 2), torch.tensor([0, 1]), torch.ones(2), group_size=2, loss_type=v
        ),
        lambda v: ha.find_anchors(
            torch.ones(1, 3, dtype=torch.int64), torch.ones(1, 3), [[1]], occurrence=v
        ),
        lambda v: ha.dapo.policy_loss(
            torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), loss_agg_mode=v
        ),
    ],
    ids=["loss_type", "occurrence", "loss_agg_mode"],
)
@pytest.mark.parametrize("value", [["x"], np.array(["a", "b"]), torch.ones(2)])
def test_options_of_a_wrong_type_are_an_argument_error(call, value):
    """A list, an array or a tensor as a string option: an error naming the option, not the
    TypeError of an unhashable value or the ValueError of an array's truth value."""
    with pytest.raises(ha.ArgumentError, match="expected one of"):
        call(value)


@pytest.mark.parametrize("value", ["no", torch.empty(0, device="meta")])
def test_return_stats_must_be_a_bool(value):
    with pytest.raises(ha.ArgumentError, match="return_stats"):
        ha.loss(
            torch.ones(2, 3, 2),
            torch.tensor([0, 1]),
            torch.ones(2),
            group_size=2,
            return_stats=value,
        )


def test_return_entropy_must_be_a_bool():
    with pytest.raises(ha.ArgumentError, match="return_entropy"):
        ha.token_logprobs(
            torch.ones(2, 3),
            torch.ones(4, 3),
            torch.zeros(2, dtype=torch.int64),
            return_entropy="no",
        )


def test_compiled_policy_backward_with_no_column():
    from hidden_align import _compiled

    z = torch.zeros(3, 0)
    scale, upstream = torch.ones(3), torch.ones(())
    grad = _compiled._policy_backward(z, z, z, z, None, 0.2, 0.28, 10.0, 20.0, scale, upstream)
    assert grad.shape == (3, 0)


def test_native_backward_with_mismatched_plan_lengths_is_a_shape_error():
    out = torch.empty(2, 3)
    with pytest.raises(ha.ShapeError):
        _native.align_backward(
            torch.ones(4, 3),
            torch.tensor([0, 1]),
            torch.tensor([0]),
            torch.tensor([True, True]),
            1,
            torch.ones(()),
            "cosine",
            "mean",
            1e-8,
            0.1,
            out,
        )


def test_native_backward_with_an_overflowing_group_count_is_an_argument_error():
    """2**63 - 1 groups overflow the size of the per-group buffer: a panic, which the guard
    turns into a KernelError."""
    with pytest.raises((ha.ArgumentError, ha.ShapeError)):
        _native.align_backward(
            torch.ones(4, 3),
            torch.tensor([0, 1]),
            torch.tensor([0, 0]),
            torch.tensor([True, True]),
            2**63 - 1,
            torch.ones(()),
            "cosine",
            "mean",
            1e-8,
            0.1,
            torch.empty(2, 3),
        )


def test_native_backward_with_a_huge_group_count_does_not_abort():
    """In a subprocess: 2**36 groups make the CPU backward allocate num_groups x H floats, and
    the failed allocation aborts the process (Rust's allocation-error handler)."""
    code = (
        "import sys, torch\n"
        "import hidden_align as ha\n"
        "from hidden_align import _native\n"
        "try:\n"
        "    _native.align_backward(torch.ones(4, 3), torch.tensor([0, 1]), torch.tensor([0, 0]),"
        " torch.tensor([True, True]), 2**36, torch.ones(()), 'cosine', 'mean', 1e-8,"
        " 0.1, torch.empty(2, 3))\n"
        "except (ha.ArgumentError, ha.ShapeError):\n"
        "    sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-400:]


def test_known_defects_are_exactly_the_reproduced_ones():
    """Every entry of KNOWN_DEFECTS has its reproduction above; a fixed defect must leave the
    list (its xfail test then passes, which strict xfail reports)."""
    whats = {what for what, _, _ in fuzz.KNOWN_DEFECTS}
    assert whats == set()
