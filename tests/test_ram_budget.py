"""Host RAM held to --ram-budget: the planner counts what the host holds (the process, the
skeleton's head, the layer as stored, hidden states, the export and its serialised copy),
moves hidden states to disk when they do not fit, and a run's measured peak RSS stays under
the budget."""
import json

import psutil
import pytest
import torch

from quantizer.stream.hidden_store import HiddenStore, Singles, to_device_ahead
from quantizer.plan.sizes import GIB, MIB
from quantizer.plan.planner import ModelShapes, make_plan
from quantizer.plan.memory import host_facts

from helpers import peak_rss_cli, planned_host_peaks

WIDTHS = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8,
              num_key_value_heads=8, vocab_size=1024)
CALIB = ["--calib-samples", "64", "--calib-seqlen", "256"]


def test_a_pass_over_disk_chunks_keeps_one_resident(tmp_path):
    store = HiddenStore(torch.device("cpu"), tmp_path / "h")
    chunks = store.new("disk")
    for k in range(8):
        store.append(chunks, torch.full((4, 1024, 1024), float(k)))  # 16 MiB each
    proc = psutil.Process()
    before = proc.memory_info().rss
    grew = 0
    total = 0.0
    for (x,) in to_device_ahead(Singles(chunks), torch.device("cpu")):
        total += float(x[0, 0, 0]) + float(x.sum()) * 0
        grew = max(grew, proc.memory_info().rss - before)
    assert total == sum(range(8))
    # a list of mapped tensors would end holding all 128 MiB; a pass holds one or two chunks
    assert grew < 48 * MIB, grew / MIB
    store.release(chunks)


def _host_plan(budget, hidden="auto", samples=96, seqlen=128, layers=6):
    shapes = ModelShapes.from_config(dict(WIDTHS, model_type="llama", num_hidden_layers=layers))
    host = host_facts(shapes, 4, True, {"torch_dtype": "float16"}, 4, 128, 8 * MIB,
                      base=400 * MIB)
    return make_plan(shapes, "rtn", samples, seqlen, [], {}, budget, 4, hidden_device=hidden,
                     host=host)


def test_host_plan_moves_hidden_states_to_disk_when_they_do_not_fit():
    ram = _host_plan(4 * GIB, hidden="cpu")
    disk = _host_plan(4 * GIB, hidden="disk")
    assert ram.predicted_peak[-1] - disk.predicted_peak[-1] > 16 * MIB  # in+out, fp32
    auto = _host_plan((ram.predicted_peak[-1] + disk.predicted_peak[-1]) // 2)
    dec = auto.decisions_for(0)
    assert dec.hidden == "disk" and auto.predicted_peak[-1] <= auto.ram_budget
    with pytest.raises(Exception, match="host RAM"):
        _host_plan(300 * MIB)  # less than the process itself: refused before any work
    text = auto.format()
    assert "disk beside the checkpoint" in text and "hidden states (inputs" in text


@pytest.mark.slow
def test_peak_rss_stays_under_the_ram_budget(tmp_path, prose_file):
    """A budget between what the run needs with hidden states on disk and in RAM: the plan
    sends them to disk and the measured peak RSS of the whole run (the kernel's high-water
    mark, export assembly included) stays under the budget. (A model several times larger
    than its budget: tests/test_streaming_memory.py, slow.)"""
    from quantizer.demo.synthetic import write_checkpoint

    model = write_checkpoint(tmp_path / "m", preset="tiny-llama", num_hidden_layers=4,
                             max_shard_bytes=16 << 20, dtype=torch.float16, **WIDTHS)
    need = planned_host_peaks(model, prose_file, 64, 256, 8 << 20, hidden=("cpu", "disk"))
    assert need["cpu"] - need["disk"] > 16 * MIB, need
    budget = (need["cpu"] + need["disk"]) // 2
    run = peak_rss_cli([model, "-o", tmp_path / "q", "--method", "rtn", "--calib-data",
                        prose_file, *CALIB, "--no-progress", "--json", "--ram-budget", budget,
                        "--group-size", "128", "--max-shard-size", "8M"])
    assert run.returncode == 0, run.stderr[-2000:]
    peak = run.peak_rss
    report = json.loads(run.stdout)
    assert {r["decisions"]["hidden"] for r in report["layers"]} == {"disk"}
    layers = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    hidden = 64 * 256 * WIDTHS["hidden_size"] * 4
    print(f"budget {budget / MIB:.0f} MiB (plan: {need['disk'] / MIB:.0f} MiB with hidden "
          f"states on disk, {need['cpu'] / MIB:.0f} MiB in RAM); peak RSS {peak / MIB:.0f} "
          f"MiB; model {layers / MIB:.0f} MiB, hidden states 3 x {hidden / MIB:.0f} MiB")
    assert peak <= budget, (peak / MIB, budget / MIB)
