"""The CPU kernels' instruction-set levels: every level this CPU has gives the same values and
gradients bit for bit (the stated bound between levels is 0 ulp), a level repeats itself bit for
bit, and ``HIDDEN_ALIGN_SIMD`` selects a level or refuses one the CPU lacks. ``scripts/test.sh``
also runs the op test files once per lower level with the variable set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import hidden_align as ha
from hidden_align import dapo
from hidden_align.errors import ArgumentError

LEVELS = ha.simd_levels()["available"]


@pytest.fixture(autouse=True)
def _restore_level():
    before = ha.simd_levels()["level"]
    yield
    ha.set_simd_level(before)


def _policy(dtype, weighted):
    gen = torch.Generator().manual_seed(1)
    b, t = 6, 301  # columns over two blocks and a ragged tail
    logp = -torch.rand(b, t, generator=gen) * 3
    old = logp + (torch.rand(b, t, generator=gen) - 0.5) * 0.8
    old[0, 5] = logp[0, 5] + 30.0  # the log-ratio clamp
    adv = torch.randn(b, t, generator=gen)
    adv[1, :7] = 0.0
    mask = (torch.rand(b, t, generator=gen) > 0.2).float()
    logp[2, 9] = float("nan")  # NaN in one row only
    mask[2, 9] = 1.0
    mask[3, 11] = 0.0
    logp[3, 11] = float("inf")  # garbage under the mask
    weights = torch.rand(b, t, generator=gen) if weighted else None
    leaf = logp.to(dtype).requires_grad_()
    loss, metrics = dapo.policy_loss(
        leaf, old.to(dtype), adv.to(dtype), mask, rollout_is_weights=weights
    )
    loss.backward()
    return [loss.detach(), *metrics.values(), leaf.grad]


def _logprobs(dtype):
    gen = torch.Generator().manual_seed(2)
    n, h, v = 19, 16, 700
    hidden = torch.randn(n, h, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * 0.3).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    lp, ent = ha.token_logprobs(hidden, weight, targets, return_entropy=True)
    (lp.sum() + 0.3 * ent.sum()).backward()
    return [lp.detach(), ent.detach(), hidden.grad, weight.grad]


def _align(dtype, loss_type):
    gen = torch.Generator().manual_seed(3)
    b, t, h = 8, 12, 40
    hidden = torch.randn(b, t, h, generator=gen).to(dtype).requires_grad_()
    mask = torch.zeros(b, t)
    mask[:, 4:] = 1
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    index = torch.randint(4, t, (b,), generator=gen)
    loss = ha.loss(hidden, index, rewards, group_size=4, loss_type=loss_type)
    loss.backward()
    return [loss.detach(), hidden.grad]


def _advantages_and_anchors():
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(64, 37, generator=gen)
    ids = torch.arange(64) // 8
    adv = dapo.group_advantages(scores, group_ids=ids)
    tokens = torch.randint(0, 50, (16, 200), generator=gen)
    tokens[::3, 150:152] = torch.tensor([7, 9])
    anchors = ha.find_anchors(tokens, torch.ones(16, 200), [[7, 9]])
    return [adv, anchors]


CASES = {
    "policy float32": lambda: _policy(torch.float32, False),
    "policy float32 weighted": lambda: _policy(torch.float32, True),
    "policy bfloat16": lambda: _policy(torch.bfloat16, False),
    "policy float64": lambda: _policy(torch.float64, False),
    "token_logprobs float32": lambda: _logprobs(torch.float32),
    "token_logprobs bfloat16": lambda: _logprobs(torch.bfloat16),
    "loss cosine float32": lambda: _align(torch.float32, "cosine"),
    "loss mse bfloat16": lambda: _align(torch.bfloat16, "mse"),
    "loss contrastive float32": lambda: _align(torch.float32, "contrastive"),
    "advantages and anchors": _advantages_and_anchors,
}


def _bits(tensors):
    return [t.detach().contiguous().view(-1).view(torch.uint8).clone() for t in tensors]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_level_gives_the_same_bits(case):
    runs = {}
    for level in LEVELS:
        assert ha.set_simd_level(level) == level
        assert ha.simd_levels()["level"] == level
        first, again = _bits(CASES[case]()), _bits(CASES[case]())
        for a, b in zip(first, again):
            assert torch.equal(a, b), f"{case}: {level} is not reproducible"
        runs[level] = first
    base = runs[LEVELS[0]]
    for level, got in runs.items():
        for i, (a, b) in enumerate(zip(base, got)):
            assert torch.equal(a, b), f"{case}: output {i} differs between {LEVELS[0]} and {level}"


def test_the_cases_see_nan_and_nonzero_gradients():
    # The comparison above would pass on outputs that are all zero or all NaN.
    loss, *rest = _policy(torch.float32, False)
    grad = rest[-1]
    assert torch.isnan(loss)
    assert torch.isnan(grad[2]).any() and not torch.isnan(grad[[0, 1, 3, 4, 5]]).any()
    assert grad[[0, 1, 3, 4, 5]].abs().sum() > 0
    assert grad[3, 11] == 0


def test_levels_are_named_and_ordered():
    s = ha.simd_levels()
    assert s["available"][0] in ("baseline", "neon")
    assert s["best"] == s["available"][-1]
    assert set(s["available"]) <= {"baseline", "neon", "avx2", "avx512"}
    assert ha.set_simd_level() == s["best"]


def test_a_level_the_cpu_lacks_or_a_bad_name_is_refused():
    with pytest.raises(ArgumentError, match="HIDDEN_ALIGN_SIMD.*expected one of"):
        ha.set_simd_level("avx9")
    with pytest.raises(ArgumentError, match="level"):
        ha.set_simd_level(3)
    missing = [lvl for lvl in ("avx2", "avx512") if lvl not in LEVELS]
    for lvl in missing:
        with pytest.raises(ArgumentError, match="the levels this CPU has"):
            ha.set_simd_level(lvl)


def _run(env_value):
    env = dict(os.environ, HIDDEN_ALIGN_SIMD=env_value)
    code = "import hidden_align as ha; print(ha.simd_levels()['level'])"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_the_environment_variable_selects_the_level_at_import():
    r = _run(LEVELS[0])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == LEVELS[0]
    r = _run("no-such-level")
    assert r.returncode != 0
    assert "HIDDEN_ALIGN_SIMD" in r.stderr and "no-such-level" in r.stderr
