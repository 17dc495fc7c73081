"""``capture_last_hidden``: the backbone's output recorded for one forward (OpenRLHF's
``Actor`` returns only logits), and the import stand-ins of ``openrlhf_support`` leaving
nothing behind."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from openrlhf_support import STUBS, load_openrlhf

import hidden_align as ha
from hidden_align.integrations.openrlhf import CapturedHidden, capture_last_hidden


def test_capture_last_hidden():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    x = torch.randn(2, 4)
    with capture_last_hidden(net[0]) as cap:
        assert isinstance(cap, CapturedHidden)
        with pytest.raises(ha.ArgumentError, match="did not run"):
            _ = cap.hidden
        net(x)
        net(2 * x)  # the latest call wins
    torch.testing.assert_close(cap.hidden, net[0](2 * x))
    assert cap.hidden.requires_grad
    net(x)  # the hook is gone
    torch.testing.assert_close(cap.hidden, net[0](2 * x))
    assert not net[0]._forward_hooks
    with pytest.raises(ha.ArgumentError, match="module"):
        with capture_last_hidden(lambda v: v):
            pass
    for kind, expected in (("tuple", x), ("output", 3 * x)):
        module = Returns(kind)
        with capture_last_hidden(module) as cap:
            module(x)
        torch.testing.assert_close(cap.hidden, expected)
    module = Returns("dict")
    with pytest.raises(ha.ArgumentError, match="returned dict"):
        with capture_last_hidden(module):
            module(x)
    assert not module._forward_hooks


class Returns(torch.nn.Module):
    """Outputs of the shapes modules return: a tuple led by the hidden state, a model output
    with ``last_hidden_state`` (and other fields), a plain dict (refused)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "tuple":
            return x, 2 * x
        if self.kind == "output":
            return types.SimpleNamespace(logits=2 * x, last_hidden_state=3 * x)
        return {"h": x}


def test_stubs_are_gone():
    load_openrlhf("openrlhf.models")
    for name in STUBS:
        assert name not in sys.modules
