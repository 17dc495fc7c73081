"""verl 0.9.1's fused log-prob path (``use_fused_kernels=True``, torch backend) on
``hidden_align.token_logprobs``: a Qwen2 model built from a config, patched by verl's own
``patch_forward_with_backends`` (the last step of its ``apply_monkey_patch``, whose other
steps need packages this test does not use), gives the same log-probs, entropies and parameter
gradients with our forward as with verl's ``FusedLinearForPPO``."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import hidden_align as ha

_INSTALL = "pip install verl==0.9.1"

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import verl
        from verl.models.transformers.monkey_patch import patch_forward_with_backends
        from verl.utils.experimental import torch_functional
    except Exception as exc:  # noqa: BLE001 - any import failure means no verl to test against
        pytest.skip(f"verl is not importable ({exc}); {_INSTALL}", allow_module_level=True)
    if getattr(verl, "__version__", None) != "0.9.1":
        pytest.skip(f"written against verl 0.9.1; {_INSTALL}", allow_module_level=True)
    from hidden_align.integrations import verl_logprobs

from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

VOCAB = 211  # not a multiple of any block size of the kernels


@pytest.fixture
def fused_model():
    """A Qwen2 model whose class forward verl patched for its fused torch backend; the class
    is restored afterwards (the patch is global)."""
    original = Qwen2ForCausalLM.forward
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Qwen2ForCausalLM(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    yield model
    Qwen2ForCausalLM.forward = original
    verl_logprobs.unpatch()


def _step(model, ids, temperature):
    model.zero_grad()
    out = model(input_ids=ids, return_dict=True, temperature=temperature)
    (out.log_probs.sum() + 0.1 * out.entropy.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.log_probs.detach(), out.entropy.detach(), grads


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_patched_forward_matches_verls(fused_model, temperature):
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    lp_v, ent_v, g_v = _step(fused_model, ids, temperature)
    verl_logprobs.patch()
    assert torch_functional.FusedLinearForPPO.forward is verl_logprobs.fused_forward
    lp_o, ent_o, g_o = _step(fused_model, ids, temperature)
    assert lp_o.dtype == torch.float32 and lp_o.shape == ids.shape == ent_o.shape
    torch.testing.assert_close(lp_o, lp_v, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent_o, ent_v.float(), rtol=0, atol=2e-5)
    assert g_o.keys() == g_v.keys() and "lm_head.weight" in g_o
    for name in g_v:
        torch.testing.assert_close(g_o[name], g_v[name], rtol=1e-4, atol=1e-5, msg=name)


def test_liger_backend_is_left_alone(fused_model):
    verl_logprobs.patch()
    module = torch_functional.FusedLinearForPPO(impl_backend="liger")
    h = torch.randn(5, 32)
    w = torch.randn(VOCAB, 32)
    ids = torch.randint(0, VOCAB, (5,))
    calls = []
    original = torch_functional.FusedLinearForPPO.__dict__["_hidden_align_original_forward"]

    def spy(self, *args):
        calls.append(self.impl_backend)
        return original(self, *args)

    torch_functional.FusedLinearForPPO._hidden_align_original_forward = spy
    lp, ent = module.forward(h, w, ids)
    assert calls == ["liger"]
    expected = torch.log_softmax(h @ w.T, -1).gather(-1, ids[:, None]).squeeze(-1)
    torch.testing.assert_close(lp, expected, rtol=0, atol=1e-5)


def test_install_patches_only_when_asked():
    """``HIDDEN_ALIGN_FUSED_LOGPROBS=1`` makes importing the integration (what verl's
    ``external_lib`` does in every worker) route the fused path through us; unset, it does
    not. Fresh interpreters: the import registers verl hooks once per process."""
    code = (
        "import hidden_align.integrations.verl\n"
        "from verl.utils.experimental import torch_functional as tf\n"
        "from hidden_align.integrations import verl_logprobs as v\n"
        "print(tf.FusedLinearForPPO.forward is v.fused_forward)\n"
    )
    for flag, expected in [("1", "True"), ("0", "False")]:
        env = dict(os.environ, HIDDEN_ALIGN_FUSED_LOGPROBS=flag, HIDDEN_ALIGN_COEF="0")
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == expected


def test_bad_flag_is_refused():
    from hidden_align.integrations.verl_settings import Settings

    with pytest.raises(ValueError, match="HIDDEN_ALIGN_FUSED_LOGPROBS"):
        Settings.from_env({"HIDDEN_ALIGN_FUSED_LOGPROBS": "maybe"})
    assert Settings.from_env({"HIDDEN_ALIGN_FUSED_LOGPROBS": "1"}).fused_logprobs
    assert not Settings.from_env({}).fused_logprobs
    assert ha.token_logprobs is verl_logprobs.ha.token_logprobs
