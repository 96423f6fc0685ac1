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
