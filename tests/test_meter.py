"""MemoryMeter on a CUDA device, with torch.cuda and NVML faked: the per-layer peak record
every GPU run writes (it once imported NVML helpers from a module that no longer had them)."""
import torch

from quantizer.run import meter
from quantizer.run.meter import MemoryMeter


def test_peak_on_cuda_reads_allocator_and_nvml(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 200)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 150)
    monkeypatch.setattr(meter, "gpu_memory", lambda indices=None: [(0, "fake", 1000, 400)])
    monkeypatch.setattr(meter, "process_gpu_bytes", lambda index: 180)
    peak = MemoryMeter(torch.device("cuda", 0)).peak()
    assert peak["allocated"] == 100 and peak["reserved"] == 200
    assert peak["nvml_used"] == 600
    assert peak["nvml_process"] == 180 and peak["outside_allocator"] == 30
    assert peak["rss"] > 0
