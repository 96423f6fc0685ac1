"""Packing layouts: round trips for every width, and the AWQ nibble order by hand."""
import pytest
import torch

from quantizer.kernels.packing import (AWQ_ORDER, SUPPORTED_BITS, QuantizedWeight, awq_pack_linear,
                                       awq_unpack_linear, pack_awq, pack_sequential, unpack_awq,
                                       unpack_sequential)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("dim", [0, 1])
def test_sequential_round_trip(bits, dim):
    g = torch.Generator().manual_seed(bits * 10 + dim)
    shape = [64, 96]
    codes = torch.randint(0, 1 << bits, shape, generator=g)
    packed = pack_sequential(codes, bits, dim)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] == shape[dim] * bits // 32
    assert torch.equal(unpack_sequential(packed, bits, dim, shape[dim]), codes.to(torch.int32))


def test_sequential_4bit_word_by_hand():
    codes = torch.arange(8).reshape(8, 1)  # values 0..7 down the input dim
    word = pack_sequential(codes, 4, 0)
    assert int(word[0, 0]) == 0x76543210


def test_awq_round_trip():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (40, 64), generator=g)
    packed = pack_awq(codes)
    assert packed.shape == (40, 8)
    assert torch.equal(unpack_awq(packed), codes.to(torch.int32))


def test_awq_nibble_order_by_hand():
    # Output columns 0..7 hold codes 1..8. AutoAWQ stores nibble k = column AWQ_ORDER[k]
    # = [0, 2, 4, 6, 1, 3, 5, 7], so nibbles (low to high) read 1,3,5,7,2,4,6,8.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    expected = 0x86427531
    got = int(pack_awq(codes)[0, 0]) & 0xFFFFFFFF
    assert got == expected, hex(got)


def test_awq_linear_round_trip_and_refusals():
    g = torch.Generator().manual_seed(2)
    out_f, in_f, gs = 16, 64, 32
    q = QuantizedWeight(codes=torch.randint(0, 16, (out_f, in_f), generator=g).to(torch.uint8),
                        scales=torch.rand(out_f, in_f // gs, generator=g) + 0.1,
                        zeros=torch.randint(0, 16, (out_f, in_f // gs), generator=g).int(),
                        bits=4, group_size=gs)
    t = awq_pack_linear(q)
    assert t["qweight"].shape == (in_f, out_f // 8) and t["qzeros"].shape == (in_f // gs, out_f // 8)
    assert t["scales"].shape == (in_f // gs, out_f) and t["scales"].dtype == torch.float16
    back = awq_unpack_linear(t["qweight"], t["qzeros"], t["scales"], gs)
    assert torch.equal(back.codes, q.codes.int()) and torch.equal(back.zeros, q.zeros)
    q3 = QuantizedWeight(q.codes.clamp(max=7), q.scales, q.zeros.clamp(max=7), bits=3, group_size=gs)
    with pytest.raises(ValueError, match="4-bit"):
        awq_pack_linear(q3)
    with pytest.raises(ValueError):
        pack_awq(torch.zeros(4, 12, dtype=torch.int32))  # not a multiple of 8 columns


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_packing_by_slices_equals_packing_whole(monkeypatch, bits):
    """Packing and unpacking run a slice at a time (bounded int64 temporaries on wide
    weights): the result must not depend on the slice size."""
    import quantizer.kernels.packing as P
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (64, 96), generator=g, dtype=torch.uint8)
    whole = [pack_sequential(codes, bits, 0), pack_sequential(codes, bits, 1)]
    awq = pack_awq(codes) if bits == 4 else None
    monkeypatch.setattr(P, "PACK_SLICE_ELEMENTS", 100)  # slices of one or two lines
    assert torch.equal(pack_sequential(codes, bits, 0), whole[0])
    assert torch.equal(pack_sequential(codes, bits, 1), whole[1])
    for dim, packed in enumerate(whole):
        out = unpack_sequential(packed, bits, dim, codes.shape[dim], dtype=torch.uint8)
        assert out.dtype == torch.uint8 and torch.equal(out, codes)
    if awq is not None:
        assert torch.equal(pack_awq(codes), awq)
        assert torch.equal(unpack_awq(awq, torch.uint8), codes)


@pytest.mark.parametrize("group_size,act_order", [(32, False), (-1, False), (32, True)])
def test_dequantize_by_rows_equals_the_gathered_formula(group_size, act_order):
    """dequantize broadcasts scales over groups in place, dequantize_to writes row slices
    into another dtype: both must equal (codes - zero[g]) * scale[g] exactly."""
    g = torch.Generator().manual_seed(7)
    out_f, in_f = 40, 128
    n_groups = 1 if group_size == -1 else in_f // group_size
    q = QuantizedWeight(torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8),
                        torch.rand(out_f, n_groups, generator=g),
                        torch.randint(0, 16, (out_f, n_groups), generator=g, dtype=torch.int32),
                        4, group_size,
                        (torch.randperm(in_f, generator=g) // 32).int() if act_order else None)
    gi = q.group_index()
    want = (q.codes.float() - q.zeros.float()[:, gi]) * q.scales[:, gi]
    assert torch.equal(q.dequantize(), want)
    dest = torch.empty(out_f, in_f, dtype=torch.bfloat16)
    steps = q.row_steps(3 * in_f)
    assert len(steps) == 14 and steps[-1] == (39, 40)
    assert torch.equal(q.dequantize_to(dest, elements=3 * in_f), want.to(torch.bfloat16))
    assert torch.equal(q.codes, q.rows(0, out_f).codes)  # dequantize left the codes alone
