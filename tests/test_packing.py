"""``ha.unpadded_rows`` against an explicit unpad of verl's layout (left-padded prompts,
right-padded responses: ``[pad..., prompt, response, pad...]``), and ``ha.loss`` on the packed
hidden states with those rows equal to ``ha.loss`` on the padded ones, value and gradient."""

import pytest
import torch

import hidden_align as ha

PROMPT, RESPONSE, HIDDEN, GROUP = 5, 7, 6, 4


def verl_batch(batch=12):
    """``attention_mask [B, P + R]`` (int64, as verl has it) and the prompt and response lengths;
    the first rows have no left pad, no right pad, and an empty response."""
    prompt = torch.randint(1, PROMPT + 1, (batch,))
    response = torch.randint(1, RESPONSE + 1, (batch,))
    prompt[0], response[1], response[2] = PROMPT, RESPONSE, 0
    t = torch.arange(PROMPT + RESPONSE)
    left = PROMPT - prompt[:, None]
    mask = ((t >= left) & (t < PROMPT + response[:, None])).long()
    return mask, prompt, response


def explicit_rows(mask):
    """``[B, T]`` table: the row of each kept token in ``hidden[mask.bool()]``, -1 at pads."""
    table = torch.full(mask.shape, -1, dtype=torch.long)
    row = 0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                table[b, t] = row
                row += 1
    return table


def cu_seqlens_of(mask):
    return torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)])


def test_every_position_matches_explicit_unpad():
    mask, _, _ = verl_batch()
    batch, seq = mask.shape
    every = torch.arange(seq).expand(batch, seq).contiguous()
    table = explicit_rows(mask)
    rows = ha.unpadded_rows(every, mask)
    assert rows.dtype == torch.int64 and rows.shape == (batch, seq)
    assert torch.equal(rows, table)
    assert (rows[mask == 0] == -1).all()  # pad positions, left and right
    # each kept row holds the state of its padded position
    hidden = torch.randn(batch, seq, HIDDEN, dtype=torch.float64)
    packed = hidden[mask.bool()]
    kept = rows >= 0
    assert torch.equal(packed[rows[kept]], hidden[kept])
    # one column at a time, as [B] positions
    for t in range(seq):
        assert torch.equal(ha.unpadded_rows(every[:, t].contiguous(), mask), table[:, t])


def test_response_rows_follow_cu_seqlens():
    # docs/design.md section 2: response token j of sequence b (length r_b) is row
    # cu_seqlens[b + 1] - r_b + j.
    mask, _, response = verl_batch()
    cu = cu_seqlens_of(mask)
    for b in range(mask.shape[0]):
        for j in range(int(response[b])):
            got = ha.unpadded_rows(torch.full((mask.shape[0],), PROMPT + j), mask)[b]
            assert int(got) == int(cu[b + 1] - response[b] + j)


def test_none_pad_and_out_of_range_give_minus_one():
    mask, prompt, response = verl_batch()
    batch, seq = mask.shape
    positions = torch.stack(
        [
            torch.full((batch,), -1),
            PROMPT - prompt - 1,  # the last left pad (or -1 with no left pad)
            PROMPT + response,  # the first right pad (or T with no right pad)
            torch.full((batch,), seq),
            torch.full((batch,), seq + 3),
            torch.full((batch,), -7),
        ],
        1,
    )
    before = positions.clone()
    assert torch.equal(ha.unpadded_rows(positions, mask), torch.full_like(positions, -1))
    assert torch.equal(positions, before)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int32, torch.int64])
def test_mask_dtypes_and_strides(dtype):
    mask, _, _ = verl_batch()
    positions = torch.randint(-1, mask.shape[1], (mask.shape[0], 3))
    expected = ha.unpadded_rows(positions, mask)
    assert torch.equal(ha.unpadded_rows(positions, mask.to(dtype)), expected)
    strided = mask.t().contiguous().t().to(dtype)  # column-major storage, same values
    assert not strided.is_contiguous()
    assert torch.equal(ha.unpadded_rows(positions[:, ::2], strided), expected[:, ::2])


def test_empty_shapes():
    mask = torch.ones(3, 0, dtype=torch.bool)
    positions = torch.tensor([0, -1, 2])
    assert torch.equal(ha.unpadded_rows(positions, mask), torch.full((3,), -1))
    empty = ha.unpadded_rows(
        torch.zeros(0, 2, dtype=torch.long), torch.ones(0, 4, dtype=torch.bool)
    )
    assert empty.shape == (0, 2)


def test_no_data_read_on_the_host():
    # On the meta device tensors have no data: any read of it (.item(), bool(), nonzero)
    # fails, so passing here means no synchronisation with a device would be needed.
    mask = torch.ones(4, 9, dtype=torch.int64, device="meta")
    out = ha.unpadded_rows(torch.zeros(4, 2, dtype=torch.int64, device="meta"), mask)
    assert out.device.type == "meta" and out.shape == (4, 2) and out.dtype == torch.int64


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_without_sync():
    mask, _, _ = verl_batch()
    positions = torch.randint(-1, mask.shape[1], (mask.shape[0],))
    expected = ha.unpadded_rows(positions, mask)
    mask_d, positions_d = mask.cuda(), positions.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows = ha.unpadded_rows(positions_d, mask_d)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(rows.cpu(), expected)


def test_argument_errors():
    mask = torch.ones(3, 5, dtype=torch.int64)
    pos = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ha.ArgumentError, match="positions: expected a torch.Tensor"):
        ha.unpadded_rows([0, 1, 2], mask)
    with pytest.raises(ha.DtypeError, match="positions: expected int64, got torch.int32"):
        ha.unpadded_rows(pos.int(), mask)
    with pytest.raises(ha.DtypeError, match="attention_mask: expected bool or integer"):
        ha.unpadded_rows(pos, mask.float())
    with pytest.raises(ha.ShapeError, match=r"attention_mask: expected a \[B, T\]"):
        ha.unpadded_rows(pos, mask[0])
    with pytest.raises(ha.ShapeError, match=r"positions: expected \[B\] or \[B, K\] with B = 3"):
        ha.unpadded_rows(pos[:2], mask)
    with pytest.raises(ha.ShapeError, match="positions"):
        ha.unpadded_rows(pos[:, None, None], mask)
    with pytest.raises(ha.DeviceError, match="positions: expected a tensor on cpu"):
        ha.unpadded_rows(pos.to("meta"), mask)


# ---- ha.loss: packed with unpadded_rows == padded ---------------------------------------------


def anchored_batch(grouping="ids"):
    """verl layout, anchors in the response region (the last prompt token at the earliest);
    groups by shuffled labels or contiguous blocks, each with three correct rollouts and one
    incorrect, all anchored but for one correct rollout."""
    mask, _, response = verl_batch()
    batch, seq = mask.shape
    hidden = torch.randn(batch, seq, HIDDEN, dtype=torch.float64)
    positions = PROMPT - 1 + (torch.rand(batch) * response.clamp_min(1)).long()
    labels = (torch.arange(batch) // GROUP) * 7 + 3
    if grouping == "ids":
        labels = labels[torch.randperm(batch)]
    correct = torch.ones(batch, dtype=torch.bool)
    for g in labels.unique():
        members = (labels == g).nonzero().flatten()
        correct[members[2]] = False
    positions[(labels == labels[0]).nonzero().flatten()[0]] = -1
    rewards = torch.where(correct, 1.0, -1.0)
    return hidden, mask, positions, rewards, labels


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss_type", ["cosine", "centroid", "mse", "contrastive"])
@pytest.mark.parametrize("grouping", ["ids", "size"])
def test_loss_on_packed_rows_equals_padded(loss_type, reduction, grouping):
    hidden, mask, positions, rewards, labels = anchored_batch(grouping)
    if grouping == "ids":
        groups = dict(group_ids=labels)
    else:
        groups = dict(group_size=GROUP)
    opts = dict(loss_type=loss_type, reduction=reduction, **groups)

    padded = hidden.clone().requires_grad_()
    value_p = ha.loss(padded, positions, rewards, **opts)

    keep = mask.bool()
    rows = ha.unpadded_rows(positions, mask)
    assert torch.equal(rows >= 0, positions >= 0)
    packed = hidden[keep].clone().requires_grad_()
    cu = cu_seqlens_of(mask)
    value_k = ha.loss(packed, rows, rewards, cu_seqlens=cu, **opts)
    # the same anchors as a packed bool mask [N]
    anchor_mask = torch.zeros(packed.shape[0], dtype=torch.bool)
    anchor_mask[rows[rows >= 0]] = True
    value_m = ha.loss(packed, anchor_mask, rewards, cu_seqlens=cu.int(), **opts)

    if reduction == "none":
        (value_p, valid_p), (value_k, valid_k), (value_m, _) = value_p, value_k, value_m
        assert torch.equal(valid_p, valid_k) and bool(valid_p.all())
        value_p, value_k, value_m = value_p.sum(), value_k.sum(), value_m.sum()
    assert value_p.dtype == torch.float64 and float(value_p.detach()) > 0
    torch.testing.assert_close(value_k, value_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(value_m, value_p, rtol=1e-12, atol=1e-12)

    (grad_p,) = torch.autograd.grad(value_p, padded)
    (grad_k,) = torch.autograd.grad(value_k, packed)
    back = torch.zeros_like(hidden)
    back[keep] = grad_k  # the packed gradient on the padded grid
    assert grad_p.abs().sum() > 0
    torch.testing.assert_close(back, grad_p, rtol=1e-12, atol=1e-13)
    # nonzero exactly at the anchor rows
    touched = grad_p.abs().sum(-1) > 0
    expected = torch.zeros_like(touched)
    anchored = positions >= 0
    expected[torch.arange(len(positions))[anchored], positions[anchored]] = True
    assert not (touched & ~expected).any()


def test_loss_through_the_unpad_op():
    # hidden[mask.bool()] in the graph: the padded leaf gets the same gradient either way.
    hidden, mask, positions, rewards, labels = anchored_batch()
    leaf = hidden.clone().requires_grad_()
    rows = ha.unpadded_rows(positions, mask)
    value = ha.loss(
        leaf[mask.bool()], rows, rewards, group_ids=labels, cu_seqlens=cu_seqlens_of(mask)
    )
    (grad,) = torch.autograd.grad(value, leaf)
    leaf2 = hidden.clone().requires_grad_()
    (grad2,) = torch.autograd.grad(ha.loss(leaf2, positions, rewards, group_ids=labels), leaf2)
    torch.testing.assert_close(grad, grad2, rtol=1e-12, atol=1e-13)
