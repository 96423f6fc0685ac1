"""The GPU warm-up's kernel call must match the solver's real signature: it runs on a thread
whose errors are only logged, so a stale call would silently cost the first layer the compile
(found on an H100: the group-parameter callable was passed as a bool). Triton's interpreter
runs the same call on CPU tensors."""
import pytest
import torch

from quantizer.methods import gptq_triton
from quantizer.run import warmup


@pytest.mark.skipif(not gptq_triton.available(), reason="triton is not installed")
def test_warm_gptq_kernel_runs_the_real_solver_call():
    if torch.cuda.is_available():
        device = torch.device("cuda", 0)
    elif gptq_triton.interpreting():
        device = torch.device("cpu")
    else:
        pytest.skip("neither a GPU nor Triton's interpreter")
    warmup._warm_gptq_kernel(device)  # raises on a signature mismatch


def test_no_thread_for_the_cpu(monkeypatch):
    monkeypatch.setitem(warmup._STATE, "thread", None)
    warmup.start(torch.device("cpu"))
    assert warmup._STATE["thread"] is None and warmup.wait() is None
