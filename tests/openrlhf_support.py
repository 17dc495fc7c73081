"""OpenRLHF on a CPU machine, for the tests: stand-ins for the GPU-only modules its model
package imports at the top (``flash_attn``, ``deepspeed``), present in ``sys.modules`` only
while OpenRLHF is imported (left there, ``transformers`` and ``accelerate`` would take
deepspeed for installed), and a loader that skips with the install command.

The test command runs the OpenRLHF tests twice: with OpenRLHF 0.11.1 in the main environment
and with 0.11.2 in a virtual environment over it (scripts/test.sh).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.metadata
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from hidden_align.integrations.openrlhf import SUPPORTED_OPENRLHF_VERSIONS

INSTALL = "pip install --no-deps openrlhf==0.11.2 (or 0.11.1)"

# --- stand-ins for flash_attn and deepspeed (the import only) -------------------------------


def _unpad_input(x, attention_mask):
    """flash_attn's ``unpad_input``: the kept rows of ``[B, S, ...]`` in row-major order."""
    indices = torch.nonzero(attention_mask.flatten()).flatten()
    lengths = attention_mask.sum(-1, dtype=torch.int32)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return x.flatten(0, 1)[indices], indices, cu_seqlens, int(lengths.max()), lengths


def _index_first_axis(x, indices):
    return x[indices]


def _rearrange(x, pattern):
    if pattern != "b s ... -> (b s) ...":
        raise NotImplementedError(pattern)
    return x.flatten(0, 1)


def _pad_input(x, indices, batch, seqlen):
    out = x.new_zeros(batch * seqlen, *x.shape[1:])
    out[indices] = x
    return out.view(batch, seqlen, *x.shape[1:])


def _all_gather(*_args, **_kwargs):
    raise NotImplementedError("ring attention is not exercised here")


STUBS = {
    "flash_attn": {},
    "flash_attn.bert_padding": {
        "index_first_axis": _index_first_axis,
        "pad_input": _pad_input,
        "rearrange": _rearrange,
        "unpad_input": _unpad_input,
    },
    "flash_attn.utils": {},
    "flash_attn.utils.distributed": {"all_gather": _all_gather},
    "deepspeed": {},
    # What the trainer, the experience maker and the launcher import besides (vLLM, DeepSpeed's
    # ZeRO types); nothing of them runs on the CPU path.
    "deepspeed.runtime": {},
    "deepspeed.runtime.zero": {},
    "deepspeed.runtime.zero.partition_parameters": {"ZeroParamStatus": object},
    "vllm": {"__version__": "0.0.0", "SamplingParams": object},
    "vllm.inputs": {"TokensPrompt": dict},
    "vllm.utils": {"random_uuid": lambda: "0"},
}


def install_stubs() -> None:
    """The stand-ins in ``sys.modules`` for good: for a fresh process that plays a Ray worker
    or runs the launcher on a machine without a GPU."""
    for name, attrs in STUBS.items():
        sys.modules[name] = _stub(name, attrs)


def _stub(name: str, attrs: dict) -> types.ModuleType:
    module = types.ModuleType(name)
    # importlib.util.find_spec reads __spec__ of a module already in sys.modules.
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    return module


@contextlib.contextmanager
def stub_modules():
    """The stand-ins in ``sys.modules`` while the block runs; whatever was there before (most
    likely nothing) is put back afterwards."""
    saved = {name: sys.modules.get(name) for name in STUBS}
    try:
        for name, attrs in STUBS.items():
            sys.modules[name] = _stub(name, attrs)
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _unavailable(reason: str):
    """A skip, or a failure where the test command installed OpenRLHF
    (``HIDDEN_ALIGN_REQUIRE_OPENRLHF=1``): there the tests must run, not skip."""
    if os.environ.get("HIDDEN_ALIGN_REQUIRE_OPENRLHF", "") == "1":
        pytest.fail(f"HIDDEN_ALIGN_REQUIRE_OPENRLHF=1: {reason}")
    pytest.skip(reason)


def load_openrlhf(*modules: str) -> types.SimpleNamespace:
    """OpenRLHF's version and the named modules (e.g. ``"openrlhf.models"``), imported with the
    stand-ins in place; a skip with the install command when OpenRLHF is missing, of another
    version or not importable (a failure under ``HIDDEN_ALIGN_REQUIRE_OPENRLHF=1``)."""
    try:
        version = importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        _unavailable(f"OpenRLHF is not installed: {INSTALL}")
    if version not in SUPPORTED_OPENRLHF_VERSIONS:
        _unavailable(f"tested against OpenRLHF {SUPPORTED_OPENRLHF_VERSIONS}, found {version}")
    loaded = {}
    with stub_modules():
        try:
            for name in modules:
                loaded[name] = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import failure means no oracle
            _unavailable(f"OpenRLHF is not importable ({type(exc).__name__}: {exc})")
    assert not any(name in sys.modules for name in STUBS)
    return types.SimpleNamespace(version=version, modules=loaded)
