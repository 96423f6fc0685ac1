"""Host <-> device movement of calibration chunks: pinned host copies and the copy-ahead feed
(its CUDA side-stream path runs only where a GPU is visible)."""
import pytest
import torch

from quantizer.stream.hidden_store import Singles, host_copy, to_device_ahead


def _chunks(device="cpu", n=5):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(3, 7, 16, generator=gen, dtype=torch.float32).to(torch.bfloat16)
             .to(device), torch.arange(k, k + 4).to(device)) for k in range(n)]


def test_host_copy_is_a_copy_on_the_host_and_keeps_host_tensors():
    x = torch.randn(4, 4)
    assert host_copy(x, pinned=False) is x
    y = host_copy(x.t(), pinned=False)
    assert torch.equal(y, x.t())


def test_to_device_ahead_on_cpu_passes_values_and_casts_floats_only():
    items = _chunks()
    out = list(to_device_ahead(items, torch.device("cpu"), torch.float32))
    assert len(out) == len(items)
    for (x, i), (xo, io) in zip(items, out):
        assert xo.dtype == torch.float32 and io.dtype == i.dtype
        assert torch.equal(xo, x.float()) and torch.equal(io, i)
    assert list(to_device_ahead([], torch.device("cpu"))) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("index", sorted({0, torch.cuda.device_count() - 1}) if
                         torch.cuda.is_available() else [0])
def test_to_device_ahead_from_pinned_host_equals_plain_copies(index):
    dev = torch.device("cuda", index)
    src = [(host_copy(x, pinned=True, non_blocking=True), i.cpu()) for x, i in
           _chunks(dev, n=9)]  # asynchronous device-to-host copies still in flight
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for (x, i), (xd, idev) in zip(src, to_device_ahead(src, dev)):
        assert xd.device == dev and idev.device == dev
        total += xd.double().sum() + idev.sum()  # work on the compute stream meanwhile
        assert torch.equal(xd.cpu(), x) and torch.equal(idev.cpu(), i)
    want = sum(x.double().sum() + i.sum() for x, i in _chunks("cpu", n=9))
    assert float(total) == float(want)


def test_singles_index_and_slice():
    chunks = [torch.full((2,), float(i)) for i in range(4)]
    singles = Singles(chunks)
    assert len(singles) == 4 and singles[1][0] is chunks[1]
    part = singles[1:3]
    assert len(part) == 2 and part[0][0] is chunks[1] and part[1][0] is chunks[2]
    assert [id(t[0]) for t in singles] == [id(c) for c in chunks]  # stops at IndexError
    with pytest.raises(IndexError):
        singles[4]
