"""uid strings as group ids: the Rust hash against hashlib, and every op that takes
``group_ids`` accepting verl's uid array (and a list of str) with the same result as the ids."""

import hashlib
import uuid

import numpy as np
import pytest
import torch

import hidden_align as ha
from hidden_align import _native, dapo

from cases import make_case


def hashlib_id(uid) -> int:
    digest = hashlib.blake2b(str(uid).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def verl_uids(prompts, n, seed=0):
    """One uuid4 string per prompt repeated for its rollouts (numpy object array, as verl
    builds it with np.repeat), then shuffled as balance_batch reorders rows."""
    rng = np.random.default_rng(seed)
    base = np.array([str(uuid.UUID(int=int(rng.integers(2**62)))) for _ in range(prompts)], object)
    return np.repeat(base, n)[rng.permutation(prompts * n)]


def test_rust_hash_equals_hashlib_for_every_kind_of_input():
    uids = verl_uids(5, 3)
    want = [hashlib_id(u) for u in uids]
    assert dapo.group_ids_from_uids(uids).tolist() == want
    assert dapo.group_ids_from_uids(list(uids)).tolist() == want
    assert dapo.group_ids_from_uids(uids.astype(str)).tolist() == want  # fixed-width unicode
    assert dapo.group_ids_from_uids(u for u in uids).tolist() == want  # any iterable
    # Distinct objects with equal text, non-ASCII text, and non-str items (through str()).
    odd = ["".join(["a", "b"]), "".join(["a", "b"]), "ünï ✓", "", 17, 2.5, None]
    assert dapo.group_ids_from_uids(odd).tolist() == [hashlib_id(u) for u in odd]


def test_objects_freed_during_iteration_do_not_alias():
    """Straight into the native hash: a generator's items are freed after use and their
    addresses reused by the next item, so an id cached by address must not outlive its
    object; each uid still gets its own id."""
    out = torch.empty(2000, dtype=torch.int64)
    _native.uid_group_ids((f"uid-{i}" for i in range(2000)), out)
    assert out.tolist() == [hashlib_id(f"uid-{i}") for i in range(2000)]


def test_bytes_uids_hash_as_their_text():
    text = ["a", "ünï", "uid-7"]
    encoded = np.array([t.encode() for t in text])  # numpy kind "S"
    assert dapo.group_ids_from_uids(encoded).tolist() == [hashlib_id(t) for t in text]


def test_int32_ids_are_the_same_groups():
    case = make_case(batch=8, group=4, seq=5, hidden_size=6)
    ids = torch.tensor([3, 3, 9, 9, 3, 3, 9, 9])
    stats64 = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, group_ids=ids)
    stats32 = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, group_ids=ids.int())
    assert torch.equal(stats64.unit_sum, stats32.unit_sum)
    share = ha.loss(case.hidden, case.anchors, case.rewards, group_ids=ids.int(), reference=stats32)
    whole = ha.loss(case.hidden, case.anchors, case.rewards, group_ids=ids)
    torch.testing.assert_close(share, whole, rtol=1e-12, atol=0)
    assert torch.equal(stats64.rows(ids.int()).group_id, ids)


def test_bad_uids():
    with pytest.raises(ha.ArgumentError, match="uids: expected a sequence of uid strings"):
        dapo.group_ids_from_uids("abc")
    with pytest.raises(ha.ArgumentError, match="uids: expected uid strings, got a tensor"):
        dapo.group_ids_from_uids(torch.arange(3))
    with pytest.raises(ha.ArgumentError, match="uids: expected a 1-D sequence"):
        dapo.group_ids_from_uids(np.array([["a", "b"]], dtype=object))
    with pytest.raises(ha.ArgumentError, match="group_ids: expected a 1-D sequence"):
        dapo.group_advantages(torch.zeros(2), group_ids=np.array([["a", "b"]], dtype=object))


@pytest.mark.parametrize("form", ["numpy", "list"])
def test_every_op_takes_uids(form):
    uids = verl_uids(4, 3, seed=1)
    given = uids if form == "numpy" else list(uids)
    ids = torch.tensor([hashlib_id(u) for u in uids])
    scores = torch.randn(12)
    assert torch.equal(
        dapo.group_advantages(scores, group_ids=given), dapo.group_advantages(scores, group_ids=ids)
    )
    metric = torch.tensor([1.0, 1, 1, 0, 1, 0, 1, 1, 1, 0, 0, 1])
    assert torch.equal(
        dapo.dynamic_sampling_mask(metric, group_ids=given),
        dapo.dynamic_sampling_mask(metric, group_ids=ids),
    )
    case = make_case(batch=12, group=3, seq=5, hidden_size=6)
    by_ids = ha.loss(case.hidden, case.anchors, case.rewards, group_ids=ids, return_stats=True)
    by_uids = ha.loss(case.hidden, case.anchors, case.rewards, group_ids=given, return_stats=True)
    assert torch.equal(by_ids[0], by_uids[0])
    stats = ha.group_anchor_stats(case.hidden, case.anchors, case.rewards, group_ids=given)
    assert sorted(stats.group_ids.tolist()) == sorted(set(ids.tolist()))
    share = ha.loss(case.hidden, case.anchors, case.rewards, group_ids=given, reference=stats)
    torch.testing.assert_close(share, by_ids[0], rtol=1e-12, atol=0)
