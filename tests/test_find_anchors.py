"""hidden_align.find_anchors against a plain-Python scan of every row, on the CPU backend and the
emulated CUDA kernel, plus the documented errors."""

import itertools

import pytest
import torch

import hidden_align as ha

from reference import find_anchors_loop, find_anchors_unfold

BACKENDS = ["cpu", "cuda-emulated"]


def needs(backend):
    if backend == "cuda-emulated" and not ha.cuda_status()["emulation_built"]:
        pytest.skip(
            "this build has no emulated CUDA backend: install with "
            'MATURIN_PEP517_ARGS="--features emulation" pip install -e . (as scripts/test.sh does)'
        )


def verl_like_batch(batch, prompt, response, vocab, seed):
    """Left-padded prompts and right-padded responses, as verl lays out input_ids: token ids
    from a small vocabulary so that markers also occur by chance, in the prompt too."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt + response), generator=g)
    mask = torch.zeros(batch, prompt + response, dtype=torch.bool)
    for b in range(batch):
        n = int(torch.randint(0, response + 1, (1,), generator=g))
        mask[b, prompt : prompt + n] = True
    return ids, mask


SPELLINGS = [[[1, 2]], [[1, 2], [0, 1, 2]], [[3], [1, 2, 3, 0]], [[2, 2, 2]]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("occurrence", ["last", "first"])
def test_matches_a_plain_scan(backend, occurrence):
    needs(backend)
    # T = 300 spans two tiles of the kernel's scan.
    ids, mask = verl_like_batch(9, 40, 260, vocab=4, seed=1)
    for markers, offset in itertools.product(SPELLINGS, [-1, 0, 2, -7]):
        want = find_anchors_loop(ids, mask, markers, occurrence, offset)
        with ha.backend(backend):
            got = ha.find_anchors(ids, mask, markers, occurrence=occurrence, offset=offset)
        assert got.dtype == torch.int64
        assert got.tolist() == want, (markers, offset)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_and_dtypes(backend):
    needs(backend)
    ids, mask = verl_like_batch(5, 7, 30, vocab=3, seed=2)
    markers = [[1, 2], torch.tensor([0, 1, 2])]
    want = find_anchors_loop(ids, mask, [[1, 2], [0, 1, 2]], "last", -1)
    variants = [
        (ids.int(), mask),
        (ids, mask.to(torch.uint8)),
        (ids, mask.float()),
        (ids, mask.to(torch.bfloat16)),
        (ids.t().contiguous().t(), mask.t().contiguous().t()),  # column-major
        (ids[:, ::1], mask.long()),
        (ids, mask.to(torch.int8)),
        (ids, mask.to(torch.int16)),
    ]
    for token_ids, response_mask in variants:
        with ha.backend(backend):
            got = ha.find_anchors(token_ids, response_mask, markers)
        assert got.tolist() == want
    wide_ids = torch.cat([ids, ids], dim=1)[:, ::2]  # strided columns
    wide_mask = torch.cat([mask, mask], dim=1)[:, ::2]
    with ha.backend(backend):
        got = ha.find_anchors(wide_ids, wide_mask, markers)
    assert got.tolist() == find_anchors_loop(wide_ids, wide_mask, [[1, 2], [0, 1, 2]], "last", -1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_spellings_and_matches_stay_in_the_response(backend):
    needs(backend)
    ids = torch.tensor(
        [
            [9, 5, 6, 7, 9, 9],  # "5 6" and "5 6 7" start together: one anchor
            [5, 6, 9, 9, 9, 9],  # the only match starts before the response
            [9, 9, 9, 9, 5, 6],  # a match ending at the last column
            [9, 9, 9, 9, 9, 5],  # a match cut by the end of the row
        ]
    )
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [1] * 6, [1] * 6])
    with ha.backend(backend):
        end = ha.find_anchors(ids, mask, [[5, 6], [5, 6, 7]], offset=3)
        before = ha.find_anchors(ids, mask, [[5, 6], [5, 6, 7]])
        first = ha.find_anchors(ids, mask, [[5, 6]], occurrence="first", offset=0)
    # offset 3 past "5 6 7" at 1 is column 4; past a 2-token match at 4 it is outside.
    assert end.tolist() == [4, -1, -1, -1]
    assert before.tolist() == [0, -1, 3, -1]
    assert first.tolist() == [1, -1, 4, -1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches(backend):
    needs(backend)
    with ha.backend(backend):
        assert ha.find_anchors(
            torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 5), [[1]]
        ).shape == (0,)
        got = ha.find_anchors(torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0), [[1]])
    assert got.tolist() == [-1, -1, -1]


def test_agrees_with_the_unfold_formulation():
    ids, mask = verl_like_batch(16, 10, 90, vocab=3, seed=3)
    markers = [[1, 2], [0, 1, 2]]
    assert (
        ha.find_anchors(ids, mask, markers).tolist()
        == find_anchors_unfold(ids, mask, markers).tolist()
    )


def test_anchors_feed_the_loss():
    ids, mask = verl_like_batch(8, 4, 20, vocab=3, seed=4)
    anchors = ha.find_anchors(ids, mask, [[1, 2]])
    hidden = torch.randn(8, 24, 6, dtype=torch.float64, requires_grad=True)
    rewards = torch.tensor([1.0, 1, 1, -1, 1, 1, 1, 1])
    value = ha.loss(hidden, anchors, rewards, group_size=4)
    manual = ha.loss(
        hidden,
        torch.tensor(find_anchors_loop(ids, mask, [[1, 2]], "last", -1)),
        rewards,
        group_size=4,
    )
    assert torch.equal(value, manual)


@pytest.mark.parametrize(
    "markers, message",
    [
        ([], "markers: expected at least one token-id sequence"),
        ([[1, 2], []], r"markers\[1\]: expected a non-empty token-id sequence"),
        ([1, 2], r"markers\[0\]: expected a sequence of token ids"),
        ([[1.5]], r"markers\[0\]: expected integer token ids, got float"),
        ([[True]], r"markers\[0\]: expected integer token ids, got bool"),
        ([torch.tensor([1.0])], r"markers\[0\]: expected a 1-D integer tensor"),
        ("Answer:", "markers: expected a list of token-id sequences"),
        ([[2**63]], r"markers\[0\]: expected ids that fit int64"),
    ],
)
def test_bad_markers(markers, message):
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ha.ArgumentError, match=message):
        ha.find_anchors(ids, torch.ones(2, 4), markers)


def test_bad_tensors_and_options():
    ids, mask = torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4)
    with pytest.raises(
        ha.DtypeError, match="token_ids: expected dtype int64 or int32, got torch.f"
    ):
        ha.find_anchors(ids.float(), mask, [[1]])
    with pytest.raises(
        ha.DtypeError, match="token_ids: expected dtype int64 or int32, got torch.int16"
    ):
        ha.find_anchors(ids.short(), mask, [[1]])
    with pytest.raises(ha.ShapeError, match="response_mask"):
        ha.find_anchors(ids, torch.ones(2, 5), [[1]])
    with pytest.raises(ha.ShapeError, match="token_ids"):
        ha.find_anchors(torch.zeros(8, dtype=torch.long), torch.ones(8), [[1]])
    with pytest.raises(ha.ArgumentError, match="occurrence"):
        ha.find_anchors(ids, mask, [[1]], occurrence="middle")
    with pytest.raises(ha.ArgumentError, match="offset: expected an int"):
        ha.find_anchors(ids, mask, [[1]], offset=True)
    with pytest.raises(ha.ArgumentError, match="token_ids: expected a torch.Tensor"):
        ha.find_anchors([[1, 2]], mask, [[1]])
