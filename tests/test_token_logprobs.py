"""``hidden_align.token_logprobs`` (hidden -> token log-prob and entropy, chunked) against a
float64 reference written from the definition, on the CPU backend and on the CUDA kernels run by
the emulation build (``backend="cuda-emulated"``), and against verl's and TRL's own functions.

The reference sees the inputs after rounding to the test dtype. For bfloat16 and float16 it
sees the logits as the op's matmul rounds them (an eager ``hidden @ weight.T`` in that dtype),
so only the float32 arithmetic of our pass remains. Adversarial logits go through an identity
LM head (``weight = I``, ``hidden`` = the logits), a matmul that is exact, so the reference sees
exactly the logits our pass reads.
"""

from __future__ import annotations

import math

import pytest
import torch

import hidden_align as ha

EMULATED = ha.cuda_status()["emulation_built"]
needs_emulation = pytest.mark.skipif(
    not EMULATED,
    reason="this build has no emulated CUDA backend: install with "
    'MATURIN_PEP517_ARGS="--features emulation" pip install -e . (as scripts/test.sh does)',
)

# float32 results against the float64 reference, relative to max(1, the largest magnitude).
TOL = 1e-5
F64_TOL = 1e-12


# ---------------------------------------------------------------------------------------------
# References and helpers


def reference(logits, targets, temperature=1.0, ignore_index=-100):
    """float64 ``(log-prob, entropy)`` of ``targets`` under ``softmax(logits / temperature)``;
    ignored positions give 0. Differentiable (also through ``-inf`` logits)."""
    z = logits.double() / temperature
    lp = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    logprob = lp.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    p = lp.exp()
    # p log p = 0 where p = 0 (a -inf logit): the where keeps both the value and the gradient
    # free of 0 * -inf.
    entropy = -(p * torch.where(p > 0, lp, 0.0)).sum(-1)
    zero = torch.zeros((), dtype=torch.float64)
    return torch.where(valid, logprob, zero), torch.where(valid, entropy, zero)


def exact_logits(hidden, weight, bias=None):
    """The logits in float64 from the (already rounded) inputs."""
    z = hidden.double() @ weight.double().T
    return z if bias is None else z + bias.double()


def eager_logits(hidden, weight, bias=None):
    """The logits as the op's matmul rounds them: one matmul in the dtype of the inputs."""
    h = hidden.reshape(-1, hidden.shape[-1])
    z = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
    return z.reshape(*hidden.shape[:-1], weight.shape[0])


def assert_near(actual, expected, tol=TOL, what=""):
    """``|actual - expected| <= tol * max(1, max |expected|)`` elementwise, equal infinities
    and NaNs in the same places."""
    expected = expected.detach().double()
    actual = actual.detach().double()
    assert actual.shape == expected.shape, what
    finite = expected[expected.isfinite()]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, rtol=0, atol=tol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def on_backend(name, fn, *args, **kwargs):
    with ha.backend(name):
        return fn(*args, **kwargs)


def make_case(shape, width, vocab, dtype=torch.float32, bias=False, ignored=0):
    """Random hidden ``[*shape, H]``, weight ``[V, H]`` scaled for logits of a few units, int64
    targets that include 0 and V - 1, ``ignored`` of them set to -100."""
    hidden = torch.randn(*shape, width).to(dtype)
    weight = (torch.randn(vocab, width) * (2.0 / math.sqrt(width))).to(dtype)
    b = (torch.randn(vocab) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, vocab, shape)
    flat = targets.view(-1)
    if flat.numel() >= 2:
        flat[0], flat[-1] = vocab - 1, 0
    if ignored:
        flat[torch.randperm(flat.numel())[:ignored]] = -100
    return hidden, weight, b, targets


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors if t is not None]


def grads_of(outputs, inputs, upstream):
    """The gradients of ``sum(upstream_i * outputs_i)`` w.r.t. ``inputs``."""
    return torch.autograd.grad(outputs, inputs, upstream)


def check_against_reference(
    hidden,
    weight,
    targets,
    *,
    bias=None,
    temperature=1.0,
    ignore_index=-100,
    chunk_size=None,
    tol=TOL,
    backend="cpu",
    check_grads=True,
):
    """Values and gradients (w.r.t. every input that requires grad, for random upstream
    gradients of both outputs) of the op against the reference on the exact logits."""
    lp, ent = on_backend(
        backend,
        ha.token_logprobs,
        hidden,
        weight,
        targets,
        bias=bias,
        temperature=temperature,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        return_entropy=True,
    )
    expect_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    assert lp.dtype == ent.dtype == expect_dtype
    assert lp.shape == ent.shape == targets.shape
    inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    by_id = {id(t): r for t, r in zip(inputs, ref_inputs)}
    rh, rw = (by_id.get(id(t), t) for t in (hidden, weight))
    rb = by_id.get(id(bias), bias)
    ref_lp, ref_ent = reference(exact_logits(rh, rw, rb), targets, temperature, ignore_index)
    assert_near(lp, ref_lp, tol, "log-prob")
    assert_near(ent, ref_ent, tol, "entropy")
    if not (inputs and check_grads):
        return lp, ent
    g_lp, g_ent = torch.randn(2, *lp.shape, dtype=torch.float64)
    ours = on_backend(backend, grads_of, (lp, ent), inputs, (g_lp.to(lp.dtype), g_ent.to(lp.dtype)))
    theirs = grads_of((ref_lp, ref_ent), ref_inputs, (g_lp, g_ent))
    for k, (t, a, b) in enumerate(zip(inputs, ours, theirs)):
        assert a.dtype == t.dtype and a.shape == t.shape
        assert_near(a, b, tol, f"gradient of input {k}")
    return lp, ent


# ---------------------------------------------------------------------------------------------
# Values and gradients against the reference


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("vocab", [1, 2, 63, 65, 257, 1000])
def test_random_matches_reference(vocab, temperature, bias):
    # V around the 8-lane, 64-column-block and 256-thread boundaries of the kernels.
    hidden, weight, b, targets = make_case((12,), 16, vocab, bias=bias, ignored=2)
    hidden.requires_grad_()
    weight.requires_grad_()
    if b is not None:
        b.requires_grad_()
    lp, ent = check_against_reference(
        hidden, weight, targets, bias=b, temperature=temperature, chunk_size=5
    )
    if vocab == 1:
        # One token: probability 1, log-prob 0, entropy 0, exactly.
        assert torch.equal(lp, torch.zeros_like(lp)) and torch.equal(ent, torch.zeros_like(ent))


@pytest.mark.parametrize("chunk", [1, 3, "N-1", "N", "N+5", None])
def test_chunk_sizes(chunk):
    hidden, weight, b, targets = make_case((2, 5), 8, 37, bias=True, ignored=2)
    n = targets.numel()
    chunk = {"N-1": n - 1, "N": n, "N+5": n + 5}.get(chunk, chunk)
    hidden, weight, b = leaves(hidden, weight, b)
    check_against_reference(hidden, weight, targets, bias=b, temperature=0.6, chunk_size=chunk)


def layout(name):
    """``(hidden, weight, bias, targets)`` in the named memory layout, requiring grad (the
    gradient is taken w.r.t. the view itself)."""
    n, width, vocab = 12, 6, 19
    if name == "[N, H]":
        hidden, weight, b, targets = make_case((n,), width, vocab, bias=True, ignored=1)
        return (*leaves(hidden, weight, b), targets)
    if name == "[B, T, H]":
        hidden, weight, b, targets = make_case((3, 4), width, vocab, bias=True, ignored=1)
        return (*leaves(hidden, weight, b), targets)
    if name == "transposed [N, H]":
        base = torch.randn(width, n, requires_grad=True)
        hidden = base.t()
        assert not hidden.is_contiguous()
    elif name == "permuted [B, T, H]":
        base = torch.randn(4, 3, width, requires_grad=True)
        hidden = base.transpose(0, 1)
        assert not hidden.is_contiguous()
    elif name == "rows of a wider tensor":
        base = torch.randn(n, width + 5, requires_grad=True)
        hidden = base[:, 2 : 2 + width]
    else:
        raise AssertionError(name)
    weight = (torch.randn(width, vocab) * 0.8).requires_grad_().t()  # a tied embedding's view
    b = torch.randn(2 * vocab).requires_grad_()[::2]
    targets = torch.randint(0, vocab, hidden.shape[:-1])
    targets.view(-1)[3] = -100
    return hidden, weight, b, targets


@pytest.mark.parametrize(
    "name",
    ["[N, H]", "[B, T, H]", "transposed [N, H]", "permuted [B, T, H]", "rows of a wider tensor"],
)
def test_layouts(name):
    hidden, weight, b, targets = layout(name)
    check_against_reference(hidden, weight, targets, bias=b, temperature=1.7, chunk_size=5)


def test_batched_equals_flat():
    hidden, weight, b, targets = make_case((3, 7), 8, 50, bias=True, ignored=3)
    lp3, ent3 = ha.token_logprobs(hidden, weight, targets, bias=b, return_entropy=True)
    lp2, ent2 = ha.token_logprobs(
        hidden.reshape(21, 8), weight, targets.reshape(21), bias=b, return_entropy=True
    )
    assert lp3.shape == (3, 7)
    assert torch.equal(lp3.reshape(21), lp2) and torch.equal(ent3.reshape(21), ent2)


@pytest.mark.parametrize("shape", [(9,), (3, 3)])
def test_expanded_targets_and_upstream_gradients(shape):
    # Stride-0 targets (one token everywhere) and stride-0 upstream gradients (lp.sum()).
    hidden, weight, b, _ = make_case(shape, 8, 30, bias=True)
    targets = torch.tensor(29).expand(shape)
    assert all(s == 0 for s in targets.stride())
    hidden, weight, b = leaves(hidden, weight, b)
    lp = ha.token_logprobs(hidden, weight, targets, bias=b, chunk_size=4)
    lp.sum().backward()
    rh, rw, rb = leaves(hidden, weight, b)
    ref_lp, _ = reference(exact_logits(rh.double(), rw.double(), rb.double()), targets)
    ref_lp.sum().backward()
    assert_near(lp, ref_lp)
    for ours, theirs in ((hidden, rh), (weight, rw), (b, rb)):
        assert_near(ours.grad, theirs.grad)


# Adversarial logits, given directly through an identity LM head. Temperatures are powers of
# two so that z / T is exact in float32 too: with |z| ~ 1e4 any other temperature rounds x by
# ~1e-3 in float32, the same as an eager `logits / T` would.
VOCAB = 70


def adversarial(name):
    """``(logits [N, V], bias [V] or None, targets [N])``."""
    n = 4
    targets = torch.randint(0, VOCAB, (n,))
    targets[0] = VOCAB - 1
    bias = None
    if name == "all strongly negative":
        logits = -1e4 + torch.randn(n, VOCAB)
    elif name == "one huge logit":
        logits = torch.zeros(n, VOCAB)
        logits[:, 5] = 1e4
        targets[1] = 5
    elif name == "one logit of 1e30":
        logits = torch.randn(n, VOCAB)
        logits[:, 7] = 1e30
        targets[1] = 7
    elif name == "exact ties":
        logits = torch.full((n, VOCAB), 3.25)
    elif name == "spread beyond exp range":
        logits = torch.linspace(-300, 300, VOCAB).repeat(n, 1)
        logits[1] = logits[1].flip(0)
    elif name == "-inf bias masks half":
        logits = torch.randn(n, VOCAB) * 3
        masked = torch.randperm(VOCAB)[: VOCAB // 2]
        bias = torch.zeros(VOCAB)
        bias[masked] = -math.inf
        keep = torch.tensor([j for j in range(VOCAB) if j not in set(masked.tolist())])
        targets = keep[torch.randint(0, len(keep), (n,))]
    elif name == "target on a -inf entry":
        logits = torch.randn(n, VOCAB) * 3
        bias = torch.zeros(VOCAB)
        bias[:10] = -math.inf
        targets[1:3] = torch.tensor([0, 9])
    else:
        raise AssertionError(name)
    return logits, bias, targets


ADVERSARIAL = [
    "all strongly negative",
    "one huge logit",
    "one logit of 1e30",
    "exact ties",
    "spread beyond exp range",
    "-inf bias masks half",
    "target on a -inf entry",
]
FAR_FROM_ZERO = ["all strongly negative", "spread beyond exp range"]


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_logits(name, temperature):
    logits, bias, targets = adversarial(name)
    weight = torch.eye(VOCAB)
    assert torch.equal(eager_logits(logits, weight), logits)  # the identity head is exact
    hidden = logits.clone().requires_grad_()
    lp, ent = check_against_reference(
        hidden,
        weight,
        targets,
        bias=bias,
        temperature=temperature,
        chunk_size=3,
        # The gradient at |logits| >> 10: test_backward_precision_far_from_zero.
        check_grads=name not in FAR_FROM_ZERO,
    )
    assert ent.isfinite().all() and (ent >= -TOL).all()
    if name == "exact ties":
        assert_near(lp, torch.full((4,), -math.log(VOCAB), dtype=torch.float64), 1e-6)
        assert_near(ent, torch.full((4,), math.log(VOCAB), dtype=torch.float64), 1e-6)
    if name in ("one huge logit", "one logit of 1e30"):
        assert lp[1] == 0 and (ent == 0).all()
    if name == "target on a -inf entry":
        # A target the bias masks out has probability 0: log-prob -inf (not NaN), on the CPU.
        assert lp[1] == -math.inf and lp[2] == -math.inf
        assert lp[[0, 3]].isfinite().all()


@pytest.mark.parametrize("name", FAR_FROM_ZERO)
def test_backward_precision_far_from_zero(name):
    logits, _, targets = adversarial(name)
    check_against_reference(logits.clone().requires_grad_(), torch.eye(VOCAB), targets)


# ---------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype, bias):
    hidden, weight, b, targets = make_case((2, 9), 32, 300, dtype=dtype, bias=bias, ignored=2)
    lp, ent = ha.token_logprobs(
        hidden, weight, targets, bias=b, temperature=0.6, chunk_size=4, return_entropy=True
    )
    assert lp.dtype == ent.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if dtype in (torch.bfloat16, torch.float16):
        # The op's logits are rounded to the dtype by the matmul, as an eager one's are.
        logits = eager_logits(hidden, weight, b)
    else:
        logits = exact_logits(hidden, weight, b)
    ref_lp, ref_ent = reference(logits, targets, 0.6)
    tol = F64_TOL if dtype == torch.float64 else TOL
    assert_near(lp, ref_lp, tol, "log-prob")
    assert_near(ent, ref_ent, tol, "entropy")


# ---------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("which", ["log-prob", "entropy", "both"])
def test_gradcheck_float64(which):
    hidden, weight, b, targets = make_case((2, 4), 3, 5, dtype=torch.float64, bias=True, ignored=2)
    inputs = leaves(hidden, weight, b)

    def fn(h, w, bias):
        lp, ent = ha.token_logprobs(
            h, w, targets, bias=bias, temperature=1.7, chunk_size=3, return_entropy=True
        )
        return {"log-prob": lp, "entropy": ent, "both": (lp, ent)}[which]

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_float64_logprob_only_output():
    # return_entropy=False: the backward receives no entropy gradient at all.
    hidden, weight, b, targets = make_case((6,), 3, 5, dtype=torch.float64, bias=True, ignored=1)
    inputs = leaves(hidden, weight, b)
    assert torch.autograd.gradcheck(
        lambda h, w, bias: ha.token_logprobs(h, w, targets, bias=bias, temperature=0.6), inputs
    )


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_float32_gradients_match_float64_reference(temperature):
    hidden, weight, b, targets = make_case((3, 5), 24, 200, bias=True, ignored=3)
    hidden, weight, b = leaves(hidden, weight, b)
    check_against_reference(hidden, weight, targets, bias=b, temperature=temperature, chunk_size=4)


def test_gradient_only_where_asked():
    # Only hidden requires grad: weight and bias get nothing, hidden's gradient is right.
    hidden, weight, b, targets = make_case((7,), 8, 40, bias=True)
    hidden.requires_grad_()
    lp, ent = ha.token_logprobs(hidden, weight, targets, bias=b, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert weight.grad is None and b.grad is None
    rh = hidden.detach().double().requires_grad_()
    ref_lp, ref_ent = reference(exact_logits(rh, weight, b), targets)
    (ref_lp.sum() + ref_ent.sum()).backward()
    assert_near(hidden.grad, rh.grad)


def test_double_backward_is_right_or_refused():
    hidden, weight, _, targets = make_case((4,), 3, 5, dtype=torch.float64)
    hidden, weight = leaves(hidden, weight)
    try:
        (g,) = torch.autograd.grad(
            ha.token_logprobs(hidden, weight, targets).sum(), hidden, create_graph=True
        )
        # A gradient penalty plus a first-order term, as a training loop would write it.
        (ours,) = torch.autograd.grad(g.pow(2).sum() + hidden.sum(), weight, allow_unused=True)
    except RuntimeError:
        return  # refusing double backward is fine
    rh, rw = leaves(hidden, weight)
    ref_lp, _ = reference(exact_logits(rh, rw), targets)
    (rg,) = torch.autograd.grad(ref_lp.sum(), rh, create_graph=True)
    (theirs,) = torch.autograd.grad(rg.pow(2).sum() + rh.sum(), rw)
    assert ours is not None
    assert_near(ours, theirs, F64_TOL)


# ---------------------------------------------------------------------------------------------
# ignore_index and out-of-range targets


def test_ignored_rows_are_zero_with_zero_gradient():
    hidden, weight, b, targets = make_case((3, 4), 8, 33, bias=True)
    targets[0, 1] = targets[2, 3] = -100
    hidden, weight, b = leaves(hidden, weight, b)
    lp, ent = ha.token_logprobs(hidden, weight, targets, bias=b, return_entropy=True, chunk_size=5)
    ignored = targets == -100
    assert torch.equal(lp[ignored], torch.zeros(2)) and torch.equal(ent[ignored], torch.zeros(2))
    assert (lp[~ignored] < 0).all() and (ent[~ignored] > 0).all()
    (lp.sum() + 0.5 * ent.sum()).backward()
    assert torch.equal(hidden.grad[ignored], torch.zeros(2, 8))
    assert (hidden.grad[~ignored].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("ignore_index", [-1, 3, 10**12])
def test_custom_ignore_index(ignore_index):
    hidden, weight, b, targets = make_case((10,), 8, 20, bias=True)
    targets[targets == 3] = 4
    targets[[2, 6]] = ignore_index  # 3 is a real token id: it is still the one skipped
    hidden, weight, b = leaves(hidden, weight, b)
    lp, ent = check_against_reference(
        hidden, weight, targets, bias=b, ignore_index=ignore_index, chunk_size=4
    )
    assert lp[2] == 0 and lp[6] == 0 and ent[2] == 0 and ent[6] == 0
    assert (lp[[0, 1, 3, 4, 5, 7, 8, 9]] < 0).all()
    # -100 is just an out-of-range id once another ignore index is chosen.
    targets[5] = -100
    with pytest.raises(ha.ArgumentError, match="^targets"):
        ha.token_logprobs(hidden, weight, targets, ignore_index=ignore_index)


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("bad", ["V", -5, "V+1000", -(2**62)])
def test_out_of_range_target_raises_on_cpu(bad, chunk):
    vocab = 20
    hidden, weight, _, targets = make_case((2, 3), 8, vocab)
    targets[1, 1] = {"V": vocab, "V+1000": vocab + 1000}.get(bad, bad)
    with pytest.raises(ha.ArgumentError, match=r"^targets.*\[0, 20\)"):
        ha.token_logprobs(hidden, weight, targets, chunk_size=chunk, return_entropy=True)


# ---------------------------------------------------------------------------------------------
# NaN, inf and empty inputs


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_non_finite_hidden_poisons_only_its_token(poison):
    hidden, weight, b, targets = make_case((6,), 8, 40, bias=True)
    hidden[2, 3] = poison
    hidden, weight, b = leaves(hidden, weight, b)
    lp, ent = ha.token_logprobs(hidden, weight, targets, bias=b, return_entropy=True, chunk_size=4)
    assert lp[2].isnan() and ent[2].isnan()
    others = [0, 1, 3, 4, 5]
    ref_lp, ref_ent = reference(exact_logits(hidden, weight, b)[others], targets[others])
    assert_near(lp[others], ref_lp)
    assert_near(ent[others], ref_ent)
    (lp[others].sum() + ent[others].sum()).backward()
    # The poisoned token's own gradient is NaN; every other hidden row's stays finite.
    assert hidden.grad[others].isfinite().all()


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4)])
@pytest.mark.parametrize("return_entropy", [False, True])
def test_empty(shape, return_entropy):
    hidden = torch.randn(*shape, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.zeros(shape, dtype=torch.long)
    out = ha.token_logprobs(hidden, weight, targets, return_entropy=return_entropy)
    outs = out if return_entropy else (out,)
    for o in outs:
        assert o.shape == shape and o.dtype == torch.float32
    sum(o.sum() for o in outs).backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_empty_bias_gradient():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    bias = torch.randn(11, requires_grad=True)
    lp = ha.token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), bias=bias)
    grads = torch.autograd.grad(lp.sum(), [hidden, weight, bias])
    assert torch.equal(grads[2], torch.zeros(11))


def test_tiny_temperature():
    """The inverse temperature scales the logits in float32: down to 1e-30 the results are
    right; below, where 1/temperature would overflow float32, the temperature is refused."""
    hidden = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    weight = torch.eye(2)
    targets = torch.tensor([0, 0])
    lp, ent = ha.token_logprobs(hidden, weight, targets, temperature=1e-30, return_entropy=True)
    ref_lp, ref_ent = reference(hidden, targets, 1e-30)
    assert_near(lp, ref_lp)
    assert_near(ent, ref_ent)
    with pytest.raises(ha.ArgumentError, match="^temperature: expected a finite number >= 1e-30"):
        ha.token_logprobs(hidden, weight, targets, temperature=1e-39)


# ---------------------------------------------------------------------------------------------
# Argument errors


def _args():
    hidden = torch.randn(2, 3, 4)
    weight = torch.randn(5, 4)
    targets = torch.randint(0, 5, (2, 3))
    return {"hidden": hidden, "weight": weight, "targets": targets, "bias": torch.randn(5)}


ERRORS = [
    # (argument, replacement or a function of the valid arguments, error class)
    ("hidden", lambda a: a["hidden"].long(), ha.DtypeError),
    ("hidden", lambda a: a["hidden"].bool(), ha.DtypeError),
    ("weight", lambda a: a["weight"].double(), ha.DtypeError),
    ("weight", lambda a: a["weight"].bfloat16(), ha.DtypeError),
    ("bias", lambda a: a["bias"].half(), ha.DtypeError),
    ("targets", lambda a: a["targets"].int(), ha.DtypeError),
    ("targets", lambda a: a["targets"].float(), ha.DtypeError),
    ("hidden", lambda a: torch.randn(4), ha.ShapeError),
    ("hidden", lambda a: torch.randn(1, 2, 3, 4), ha.ShapeError),
    ("weight", lambda a: torch.randn(5, 3), ha.ShapeError),
    ("weight", lambda a: torch.randn(0, 4), ha.ShapeError),
    ("weight", lambda a: torch.randn(4), ha.ShapeError),
    ("targets", lambda a: a["targets"].t(), ha.ShapeError),
    ("targets", lambda a: a["targets"].reshape(6), ha.ShapeError),
    ("bias", lambda a: torch.randn(4), ha.ShapeError),
    ("bias", lambda a: torch.randn(1, 5), ha.ShapeError),
    ("hidden", lambda a: a["hidden"].tolist(), ha.ArgumentError),
    ("hidden", lambda a: a["hidden"].numpy(), ha.ArgumentError),
    ("weight", lambda a: None, ha.ArgumentError),
    ("targets", lambda a: a["targets"].tolist(), ha.ArgumentError),
    ("bias", lambda a: [0.0] * 5, ha.ArgumentError),
    ("weight", lambda a: a["weight"].to("meta"), ha.DeviceError),
    ("bias", lambda a: a["bias"].to("meta"), ha.DeviceError),
    ("temperature", 0, ha.ArgumentError),
    ("temperature", -1.0, ha.ArgumentError),
    ("temperature", math.nan, ha.ArgumentError),
    ("temperature", math.inf, ha.ArgumentError),
    ("temperature", "1", ha.ArgumentError),
    ("temperature", True, ha.ArgumentError),
    ("temperature", None, ha.ArgumentError),
    ("chunk_size", 0, ha.ArgumentError),
    ("chunk_size", -1, ha.ArgumentError),
    ("chunk_size", 1.5, ha.ArgumentError),
    ("chunk_size", True, ha.ArgumentError),
    ("ignore_index", 1.5, ha.ArgumentError),
    ("ignore_index", None, ha.ArgumentError),
    ("ignore_index", 2**63, ha.ArgumentError),
]


@pytest.mark.parametrize(
    "name, value, error",
    ERRORS,
    ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(ERRORS)],
)
def test_argument_errors(name, value, error):
    args = _args()
    args[name] = value(args) if callable(value) else value
    hidden, weight, targets = args.pop("hidden"), args.pop("weight"), args.pop("targets")
    with pytest.raises(error, match=f"^{name}: expected"):
        ha.token_logprobs(hidden, weight, targets, **args)


def test_all_on_meta():
    args = {k: v.to("meta") for k, v in _args().items()}
    with pytest.raises(ha.DeviceError, match="^hidden: expected a tensor on cpu or cuda"):
        ha.token_logprobs(args["hidden"], args["weight"], args["targets"], bias=args["bias"])


def test_hidden_on_meta_names_hidden():
    args = _args()
    with pytest.raises(ha.DeviceError, match="^hidden:"):
        ha.token_logprobs(args["hidden"].to("meta"), args["weight"], args["targets"])


# ---------------------------------------------------------------------------------------------
# Parity with verl and TRL, on the same float32 logits


def framework_functions(name):
    """``(logprobs(logits, targets, temperature), entropy(logits, temperature))`` of the
    framework, or a skip naming the install command."""
    if name == "verl":
        pytest.importorskip("verl", reason="pip install verl==0.9.1")
        from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

        # verl divides the logits by the rollout temperature in place before both calls.
        return (
            lambda z, t, temp: logprobs_from_logits(z / temp, t),
            lambda z, temp: entropy_from_logits(z / temp),
        )
    pytest.importorskip("trl", reason="pip install trl==1.16.0")
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    return (
        lambda z, t, temp: selective_log_softmax(z, t, temperature=temp),
        lambda z, temp: entropy_from_logits(z / temp),
    )


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("framework", ["verl", "trl"])
def test_framework_parity(framework, temperature):
    logprobs_fn, entropy_fn = framework_functions(framework)
    hidden, weight, _, targets = make_case((4, 16), 64, 2000)
    weight *= 2  # logits of a few units up to ~20
    logits = hidden @ weight.T
    lp, ent = ha.token_logprobs(
        hidden, weight, targets, temperature=temperature, return_entropy=True
    )
    their_lp = logprobs_fn(logits, targets, temperature)
    their_ent = entropy_fn(logits, temperature)
    assert their_lp.shape == lp.shape and their_ent.shape == ent.shape
    assert (lp - their_lp).abs().max().item() <= 2e-5
    assert (ent - their_ent).abs().max().item() <= 2e-5


# ---------------------------------------------------------------------------------------------
# Many rows, determinism


@pytest.mark.parametrize("chunk", [4096, None])
def test_more_than_65535_rows(chunk):
    hidden, weight, b, targets = make_case((70_000,), 4, 5, bias=True, ignored=100)
    hidden, weight, b = leaves(hidden, weight, b)
    check_against_reference(hidden, weight, targets, bias=b, temperature=0.6, chunk_size=chunk)


def test_deterministic_on_cpu():
    hidden, weight, b, targets = make_case((64,), 32, 1000, bias=True, ignored=4)

    def run():
        h, w, bb = leaves(hidden, weight, b)
        lp, ent = ha.token_logprobs(
            h, w, targets, bias=bb, return_entropy=True, chunk_size=16, temperature=0.6
        )
        (lp * torch.linspace(-1, 1, 64)).sum().add(ent.sum()).backward()
        return lp, ent, h.grad, w.grad, bb.grad

    for a, b2 in zip(run(), run()):
        assert torch.equal(a, b2)


# ---------------------------------------------------------------------------------------------
# The CUDA kernels (kernels/logprobs.cu) on the emulated backend. Each emulated block costs tens
# of milliseconds here, so shapes stay small.


def both_backends(hidden, weight, targets, **kwargs):
    """``{backend: (outputs, gradients w.r.t. hidden, weight, bias)}`` for the same inputs and
    upstream gradients."""
    bias = kwargs.pop("bias", None)
    entropy = kwargs.get("return_entropy", False)
    upstream = torch.randn(2, *targets.shape)
    out = {}
    for backend in ("cpu", "cuda-emulated"):
        h, w, b = leaves(hidden, weight, bias)
        with ha.backend(backend):
            res = ha.token_logprobs(h, w, targets, bias=b, **kwargs)
            outs = res if entropy else (res,)
            grads = torch.autograd.grad(outs, [h, w, b], tuple(upstream[: len(outs)]))
        out[backend] = (outs, grads)
    return out


@needs_emulation
@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_emulated_matches_cpu(dtype, return_entropy):
    hidden, weight, b, targets = make_case((2, 3), 16, 300, dtype=dtype, bias=True, ignored=1)
    res = both_backends(
        hidden,
        weight,
        targets,
        bias=b,
        temperature=0.6,
        chunk_size=4,
        return_entropy=return_entropy,
    )
    (cpu_out, cpu_grads), (emu_out, emu_grads) = res["cpu"], res["cuda-emulated"]
    for a, e in zip(emu_out, cpu_out):
        assert a.dtype == torch.float32
        assert_near(a, e)
    ignored = targets == -100
    assert all(torch.equal(o[ignored], torch.zeros(1)) for o in emu_out)
    for name, a, e in zip(("hidden", "weight", "bias"), emu_grads, cpu_grads):
        assert a.dtype == dtype
        assert_near(a, e, what=f"gradient of {name}")
    assert torch.equal(emu_grads[0][ignored], torch.zeros(1, 16, dtype=dtype))


@needs_emulation
def test_emulated_adversarial_logits():
    # Two rows of every adversarial case, one call each, against the float64 reference.
    cases = [adversarial(name) for name in ADVERSARIAL]
    logits = torch.cat([z[:2] for z, _, _ in cases])
    targets = torch.cat([t[:2] for _, _, t in cases])
    lp, ent = [], []
    with ha.backend("cuda-emulated"):
        for z, bias, t in cases:
            out = ha.token_logprobs(
                z[:2], torch.eye(VOCAB), t[:2], bias=bias, temperature=0.5, return_entropy=True
            )
            lp.append(out[0])
            ent.append(out[1])
    biases = [torch.zeros(VOCAB) if b is None else b for _, b, _ in cases]
    full = logits + torch.cat([b.expand(2, VOCAB) for b in biases])
    ref_lp, ref_ent = reference(full, targets, 0.5)
    assert_near(torch.cat(lp), ref_lp)
    assert_near(torch.cat(ent), ref_ent)
    assert torch.cat(lp)[-1] == -math.inf  # the target on a -inf entry


@needs_emulation
def test_emulated_expanded_targets():
    hidden, weight, b, _ = make_case((3,), 8, 70, bias=True)
    targets = torch.tensor(69).expand(3)
    res = both_backends(hidden, weight, targets, bias=b, return_entropy=True, chunk_size=2)
    for a, e in zip(
        res["cuda-emulated"][0] + res["cuda-emulated"][1], res["cpu"][0] + res["cpu"][1]
    ):
        assert_near(a, e)


@needs_emulation
@pytest.mark.parametrize("bad", [20, -5])
def test_emulated_out_of_range_target_is_nan(bad):
    hidden, weight, _, targets = make_case((3,), 8, 20)
    targets[1] = bad
    hidden, weight = leaves(hidden, weight)
    with ha.backend("cuda-emulated"):
        lp, ent = ha.token_logprobs(hidden, weight, targets, return_entropy=True)
        lp.sum().backward()
    assert lp[1].isnan()
    ref_lp, ref_ent = reference(exact_logits(hidden, weight), targets.clamp(0, 19))
    assert_near(lp[[0, 2]], ref_lp[[0, 2]])
    assert_near(ent[[0, 2]], ref_ent[[0, 2]])
    # The bad token's hidden gradient is NaN; the other tokens' rows are untouched by it.
    assert hidden.grad[1].isnan().all() and hidden.grad[[0, 2]].isfinite().all()


@needs_emulation
def test_emulated_out_of_range_target_entropy_is_nan():
    hidden, weight, _, targets = make_case((3,), 8, 20)
    targets[1] = 20
    with ha.backend("cuda-emulated"):
        _, ent = ha.token_logprobs(hidden, weight, targets, return_entropy=True)
    assert ent[1].isnan()


@needs_emulation
@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_emulated_non_finite_hidden_poisons_only_its_token(poison):
    hidden, weight, _, targets = make_case((3,), 8, 20)
    hidden[1, 0] = poison
    with ha.backend("cuda-emulated"):
        lp, ent = ha.token_logprobs(hidden, weight, targets, return_entropy=True)
    assert lp[1].isnan() and ent[1].isnan()
    ref_lp, ref_ent = reference(exact_logits(hidden, weight), targets)
    assert_near(lp[[0, 2]], ref_lp[[0, 2]])
    assert_near(ent[[0, 2]], ref_ent[[0, 2]])


@needs_emulation
def test_emulated_float64_names_hidden():
    hidden, weight, _, targets = make_case((3,), 8, 20, dtype=torch.float64)
    try:
        with ha.backend("cuda-emulated"):
            lp = ha.token_logprobs(hidden, weight, targets)
    except ha.DtypeError as err:
        assert str(err).startswith("hidden:")
        return
    ref_lp, _ = reference(exact_logits(hidden, weight), targets)
    assert_near(lp, ref_lp, F64_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weight_gradient_accumulation_matches_torch_add_bitwise(dtype):
    # The backward sums each chunk's weight-gradient product into a float32 accumulator with a
    # native add (torch's mixed-dtype add_ makes a float32 temporary of the product first).
    from hidden_align import _native

    gen = torch.Generator().manual_seed(5)
    acc = torch.randn(300, 70, generator=gen)
    x = torch.randn(300, 70, generator=gen).to(dtype)
    x[3, 4] = float("nan")
    want = acc.clone().add_(x)
    _native.accumulate_f32(acc, x)
    assert torch.equal(acc.view(torch.int32), want.view(torch.int32))


def test_weight_gradient_accumulation_refuses_mismatches():
    from hidden_align import _native
    from hidden_align.errors import DtypeError, HiddenAlignError, ShapeError

    with pytest.raises(ShapeError, match="partial"):
        _native.accumulate_f32(torch.zeros(4, 3), torch.zeros(3, 4))
    with pytest.raises(DtypeError, match="grad_weight"):
        _native.accumulate_f32(torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 3))
    with pytest.raises(DtypeError, match="partial"):
        _native.accumulate_f32(torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.int32))
    with pytest.raises(HiddenAlignError):
        _native.accumulate_f32(torch.zeros(4, 6)[:, ::2], torch.zeros(4, 3))
