"""Which device mismatches the ops accept: group ids on the host for CUDA data are copied to
the device (``_args.group_ids_on``, checked on a GPU by ``tests/test_cuda_device.py``); every
other mismatch is a ``DeviceError``. Without a GPU the decision itself is tested here, and the
"meta" device stands in for a second device that is not CUDA."""

import pytest
import torch

import hidden_align as ha
from hidden_align import _args, dapo

CPU, META = torch.device("cpu"), torch.device("meta")


@pytest.mark.parametrize(
    "source,target,moved",
    [
        ("cpu", "cuda", True),
        ("cpu", "cuda:1", True),
        ("cuda", "cpu", False),  # device ids with host data: an error
        ("cuda:0", "cuda:1", False),  # another GPU: an error, as for any tensor
        ("cpu", "cpu", False),
        ("cpu", "meta", False),
        ("meta", "cpu", False),
    ],
)
def test_only_host_ids_for_cuda_data_are_moved(source, target, moved):
    assert _args.moves_to(torch.device(source), torch.device(target)) is moved


def test_ids_already_in_place_are_passed_through():
    ids = torch.arange(4)
    assert _args.group_ids_on(ids, torch.zeros(4)) is ids
    assert _args.group_ids_on(None, torch.zeros(4)) is None


def test_the_move_is_a_non_blocking_copy(monkeypatch):
    calls = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        calls.append((args, kwargs))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(_args, "moves_to", lambda source, target: target.type == "meta")
    monkeypatch.setattr(torch.Tensor, "to", spy)
    moved = _args.group_ids_on(torch.arange(4), torch.zeros(4, device="meta"))
    assert moved.device == META and moved.dtype == torch.int64 and moved.shape == (4,)
    assert calls == [((META,), {"non_blocking": True})]


def test_other_mismatches_stay_device_errors():
    meta_ids = torch.arange(4, device="meta")
    with pytest.raises(ha.DeviceError, match="group_ids"):
        dapo.group_advantages(torch.zeros(4), group_ids=meta_ids)
    with pytest.raises(ha.DeviceError, match="group_ids"):
        dapo.dynamic_sampling_mask(torch.zeros(4), group_ids=meta_ids)
    with pytest.raises(ha.DeviceError, match="group_ids"):
        ha.loss(torch.zeros(4, 3, 2), torch.zeros(4).long(), torch.ones(4), group_ids=meta_ids)
    host_ids = torch.arange(4)  # host ids with data that is not on a CUDA device
    with pytest.raises(ha.DeviceError, match="group_ids"):
        dapo.group_advantages(torch.zeros(4, device="meta"), group_ids=host_ids)


def test_group_ids_from_uids_device():
    uids = ["a", "b", "a", "c"]
    ids = dapo.group_ids_from_uids(uids)
    assert ids.device == CPU and ids.dtype == torch.int64
    assert ids[0] == ids[2] and len(set(ids.tolist())) == 3
    assert torch.equal(dapo.group_ids_from_uids(uids, device="cpu"), ids)
    on_meta = dapo.group_ids_from_uids(uids, device="meta")
    assert on_meta.device == META and on_meta.dtype == torch.int64 and on_meta.shape == (4,)
