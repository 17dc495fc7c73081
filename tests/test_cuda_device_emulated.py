"""The device-parametrized bodies of ``tests/test_cuda_device.py`` on CPU tensors, through the
emulated CUDA kernels, so that the GPU tests' own logic (their inputs, the static-input replay
loop, the comparison with the CPU backend, the in-place delivery check) also runs on machines
without a GPU. Shapes are tiny: every CUDA thread is a CPU thread here."""

import pytest
import torch
from test_cuda_device import (
    TOL,
    align_inputs,
    align_step,
    check_lm_head_main_path,
    check_replay,
    policy_inputs,
    policy_step,
)

import hidden_align as ha

pytestmark = pytest.mark.skipif(
    not ha.cuda_status()["emulation_built"],
    reason="this build has no emulated CUDA backend (cargo feature `emulation`)",
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_lm_head_main_path_emulated(dtype):
    check_lm_head_main_path("cpu", dtype, batch=12, seq=4, hidden_size=40, vocab=16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_alignment_step_replay_emulated(dtype):
    check_replay(
        "cpu",
        lambda seed: align_inputs(seed, batch=12, seq=4, hidden_size=40, vocab=16),
        lambda *a: align_step(dtype, *a),
        TOL[dtype],
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_policy_loss_replay_emulated(dtype):
    check_replay(
        "cpu",
        lambda seed: policy_inputs(seed, dtype, batch=4, seq=40),
        policy_step,
        TOL[dtype],
    )
