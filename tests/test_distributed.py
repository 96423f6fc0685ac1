"""Multi-process quantization (quantizer/distributed.py, quantizer/shards.py): the shard layout is the same for any
number of processes, the shard fold is the single process's arithmetic, and a 2-process gloo
run writes files bit-identical to a 1-process run (GPTQ and AWQ). The CUDA tests at the end
run only where two GPUs are visible (the GPU box)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantizer.parallel import distributed as D
from quantizer.parallel import shards as S
from quantizer.errors import InputError
from quantizer.methods.gptq_hessian import HessianAccumulator
from quantizer.settings import OutputSettings, QuantSettings, parse_devices

from helpers import CALIB_FILE as CALIB, assert_same_files



def chunks_of(layout):
    return list(zip(layout.shard_of, layout.sample_start, layout.sample_end))


@pytest.mark.parametrize("n,chunk,shards", [(40, 8, 3), (8, 8, 8), (13, 4, 5), (128, 16, 8),
                                            (5, 8, 8)])
def test_every_world_size_holds_the_single_process_chunks(n, chunk, shards):
    single = S.CalibLayout.plan(n, chunk, shards)
    covered = [i for _, a, b in chunks_of(single) for i in range(a, b)]
    assert covered == list(range(n))  # every sample once, in order
    for s, a, b in chunks_of(single):  # a chunk never crosses its shard's end
        assert b - a <= chunk
        assert s * n // single.n_shards <= a < b <= (s + 1) * n // single.n_shards
    for size in range(1, single.n_shards + 1):
        parts = [S.CalibLayout.plan(n, chunk, shards, D.World(r, size)) for r in range(size)]
        assert all(p.shard_of for p in parts)  # no rank without work
        assert [c for p in parts for c in chunks_of(p)] == chunks_of(single)
    with pytest.raises(InputError, match="shards"):
        S.CalibLayout.plan(n, chunk, shards, D.World(0, single.n_shards + 1))


def test_shard_fold_is_the_left_fold_in_shard_order():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    layout = S.CalibLayout.plan(24, 3, 4)  # 4 shards of 6 samples, 2 chunks each
    xs = [torch.randn(b - a, 7, 16, generator=gen) for a, b in
          zip(layout.sample_start, layout.sample_end)]
    fold = S.ShardFold(layout, lambda: HessianAccumulator(16))
    for k, x in enumerate(xs):
        fold.part(layout.shard_of[k]).add(x)
    got = fold.result()
    # by hand: one accumulator per shard, merged left to right
    per_shard = {}
    for k, x in enumerate(xs):
        per_shard.setdefault(layout.shard_of[k], HessianAccumulator(16)).add(x)
    want = per_shard[0]
    for s in (1, 2, 3):
        want.merge(per_shard[s])
    assert got.n_tokens == 24 * 7
    assert torch.equal(got.H, want.H)
    flat = torch.cat([x.reshape(-1, 16) for x in xs]).double()
    assert torch.allclose(got.H.double(), 2 * flat.t() @ flat / len(flat), rtol=1e-5, atol=1e-6)


def test_devices_flag_parsing():
    assert parse_devices("0,1") == ("cuda:0", "cuda:1")
    assert parse_devices("cpu,cpu") == ("cpu", "cpu")
    assert parse_devices(None) is None
    for bad in ("0,0", "gpu1", "cpu,0"):
        with pytest.raises(InputError):
            parse_devices(bad)


def test_eval_placement_is_contiguous_runs_of_layers():
    from quantizer.validate.evaluation import layer_devices
    got = [str(d) for d in layer_devices(["cuda:0", "cuda:1"], 5)]
    assert got == ["cuda:0", "cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert [str(d) for d in layer_devices(["cuda:1"], 2)] == ["cuda:1", "cuda:1"]


def _jobs(model, root: Path, tag: str, devices=None, **extra):
    """(fn, args) of a GPTQ and an AWQ run with shards of uneven size and 2 chunks each, as
    a launch hands them to each process: the settings object, unchanged."""
    from quantizer.api import _quantize_worker
    common = dict(calib_data=str(CALIB), calib_samples=31, calib_seqlen=16, calib_shards=3,
                  group_size=32)
    if devices is None:
        common["device"] = "cpu"
    common.update(extra)

    def job(method, **options):
        settings = QuantSettings().replaced(method=method, **common, **options)
        out = OutputSettings(root / f"{tag}-{method}", overwrite=True)
        return _quantize_worker, (model, settings, out, False, None)
    return [job("gptq", act_order=True), job("awq", grid=3, clip_tokens=96)]


def _same_files(a: Path, b: Path) -> None:
    # layerquant.json holds the run's notes, which name its devices and memory plan on a GPU
    files = assert_same_files(a, b)
    assert any(n.endswith(".safetensors") for n in files)


@pytest.mark.slow
def test_two_gloo_processes_write_the_single_process_files(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("tiny-llama")
    single = D.run_sequence(_jobs(model, tmp_path, "one"))
    double = D.launch(["cpu", "cpu"], D.run_sequence, _jobs(model, tmp_path, "two", "cpu"))
    assert all(r.extra.get("processes") == 2 for r in double)
    assert all("processes" not in r.extra for r in single)
    for method in ("gptq", "awq"):
        _same_files(tmp_path / f"one-{method}", tmp_path / f"two-{method}")
    # the job directories are gone: rank 0 published and cleaned up, the others wrote nothing
    assert not list(tmp_path.glob("*.job"))


@pytest.mark.slow
def test_two_gloo_processes_moe_matches_single_process(tiny_checkpoint, tmp_path):
    """Experts fall back to RTN by the whole run's token counts, not by one rank's share."""
    model = tiny_checkpoint("tiny-mixtral")

    def jobs(tag, dev, threshold):
        return _jobs(model, tmp_path, tag, dev, min_expert_tokens=threshold)

    probe = D.run_sequence(jobs("probe", None, 1))[0].expert_coverage()
    # the least-routed expert's whole-run count: it is calibrated, while a rank that counted
    # only its own share (about half) would have rounded it to nearest instead
    threshold = min(min(c["tokens"]) for c in probe.values())
    single = D.run_sequence(jobs("one", None, threshold))
    D.launch(["cpu", "cpu"], D.run_sequence, jobs("two", "cpu", threshold))
    assert not any(c["fallback_rtn"] for c in single[0].expert_coverage().values())
    for method in ("gptq", "awq"):
        _same_files(tmp_path / f"one-{method}", tmp_path / f"two-{method}")


# ---- CUDA (GPU box only) ------------------------------------------------------------------
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


@two_gpus
def test_cuda1_quantize_and_eval_match_cuda0(tiny_checkpoint, tmp_path):
    from quantizer.api import quantize
    from quantizer.validate.evaluation import evaluate

    model = tiny_checkpoint("tiny-llama")
    torch.cuda.set_device(0)  # the current device stays cuda:0 throughout
    outs = {}
    for dev in ("cuda:0", "cuda:1"):
        outs[dev] = tmp_path / dev.replace(":", "")
        quantize(str(model), str(outs[dev]), method="gptq", device=dev, calib_data=str(CALIB),
                 calib_samples=16, calib_seqlen=32, progress=False)
    _same_files(outs["cuda:0"], outs["cuda:1"])
    kw = dict(data=str(CALIB), seqlen=32, max_windows=4, progress=False)
    ref = evaluate(outs["cuda:0"], device="cuda:0", **kw)
    for placement in (["cuda:1"], ["cuda:0", "cuda:1"], ["cuda:1", "cuda:0"]):
        got = evaluate(outs["cuda:0"], devices=placement, **kw)
        assert got.quant_ppl == ref.quant_ppl and got.kl == ref.kl, placement
    assert torch.cuda.current_device() == 0


@two_gpus
def test_two_nccl_processes_write_the_single_gpu_files(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("tiny-llama")
    D.run_sequence(_jobs(model, tmp_path, "one", "cuda", device="cuda:0"))
    D.launch(["cuda:0", "cuda:1"], D.run_sequence, _jobs(model, tmp_path, "two", "0,1"))
    for method in ("gptq", "awq"):
        _same_files(tmp_path / f"one-{method}", tmp_path / f"two-{method}")
