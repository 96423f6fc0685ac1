"""RTN: error bounded by scale/2, codes in range, group-size errors."""
import pytest
import torch

from quantizer.errors import InputError
from quantizer.methods.rtn import rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_bound_and_code_range(bits, group_size, symmetric):
    g = torch.Generator().manual_seed(bits * 1000 + group_size + symmetric)
    w = torch.randn(24, 256, generator=g) * torch.rand(24, 1, generator=g) * 3
    w[0, :32] += 5.0  # a lopsided group: all positive
    q = rtn_quantize(w, bits, group_size, symmetric)
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= (1 << bits) - 1
    gs = 256 if group_size == -1 else group_size
    scale_per_elem = q.scales.repeat_interleave(gs, dim=1)
    err = (q.dequantize() - w).abs()
    assert bool((err <= scale_per_elem / 2 + 1e-6).all()), float((err - scale_per_elem / 2).max())


def test_group_size_must_divide():
    with pytest.raises(InputError, match="does not divide in_features=100"):
        rtn_quantize(torch.randn(8, 100), 4, 32, name="model.layers.0.mlp.down_proj")
