"""measurement.json: written after every layer, read back exactly, refused with a clear message
when broken or made from other inputs, and reusable for several bpw targets."""
import json
import random

import numpy as np
import pytest

from quantizer.errors import InputError
from quantizer.measurements.atomic import WriteFailed, inject_write_failure
from quantizer.measurements.fingerprint import job_fingerprint
from quantizer.measurements.optimizer import choose
from quantizer.measurements.store import MeasurementStore

GROUPS = {"self_attn.qkv": 3 * 64 * 64, "self_attn.o_proj": 64 * 64, "mlp.gate_up": 2 * 64 * 176,
          "mlp.down_proj": 176 * 64}
SETTINGS = [(b, gs) for b in (2, 3, 4, 5, 6, 8) for gs in (32, 64)]


def fp(**over):
    s = {"method": "gptq", "candidates": [list(c) for c in SETTINGS], "damp": 0.01}
    s.update(over)
    return job_fingerprint("model-hash", "calib-hash", s)


def measure_layer(rng):
    """What the measurement pass would produce for one layer (random but plausible)."""
    out = {}
    for name, numel in GROUPS.items():
        sens = rng.lognormal(0, 0.5)
        cands = [{"label": f"{b}b g{gs}", "bits": b, "group_size": gs,
                  "bpw": b + (16 + b) / gs, "err": float(sens * 2.0 ** -b * rng.uniform(.9, 1.1))}
                 for b, gs in SETTINGS]
        cands.append({"label": "5/4 mix g64", "bits": 4.5, "group_size": 64,
                      "parts": [{"bits": 5, "group_size": 64, "fraction": 0.5},
                                {"bits": 4, "group_size": 64, "fraction": 0.5}],
                      "bpw": 4.5 + 20.5 / 64, "err": float(sens * 2 ** -4.5)})
        out[name] = {"numel": numel, "modules": [name], "candidates": cands}
    return out


def build(path, layers, seed):
    rng = np.random.default_rng(seed)
    store = MeasurementStore.create(path, fp())
    measured = []
    for i in range(layers):
        measured.append(measure_layer(rng))
        store.record_layer(i, measured[-1])
        # durable after every layer: a fresh reader sees exactly the layers so far
        assert MeasurementStore.load(path).layers_done() == i + 1
    return store, measured


def test_round_trip_readable_and_resumable(tmp_path):
    path = tmp_path / "measurement.json"
    store, measured = build(path, 4, random.randrange(10**6))
    text = path.read_text()
    assert text.count("\n") > 100 and '"schema_version": 1' in text  # indented, not one line
    again = MeasurementStore.open(path, fp())
    assert again.layers_done() == 4 and again.is_complete(4) and not again.is_complete(5)
    again.check_progress(4)
    with pytest.raises(InputError, match="holds 4 layers but the job state says 5"):
        again.check_progress(5)
    for i, layer in enumerate(again.layers):
        assert layer["index"] == i and layer["groups"] == measured[i]
    # a redo of layer 2 after a kill replaces it and drops what followed
    redo = measure_layer(np.random.default_rng(1))
    again.record_layer(2, redo)
    back = MeasurementStore.load(path)
    assert back.layers_done() == 3 and back.layers[2]["groups"] == redo
    with pytest.raises(ValueError):
        back.record_layer(5, redo)


def test_two_targets_from_one_measurement(tmp_path):
    path = tmp_path / "measurement.json"
    build(path, 6, random.randrange(10**6))
    store = MeasurementStore.load(path)
    groups = store.groups()
    assert [g.name for g in groups[:2]] == ["0.self_attn.qkv", "0.self_attn.o_proj"]
    picks = {}
    for target in (3.0, 4.25):
        ch = choose(groups, target)
        sel = store.selection(ch)
        assert sorted(sel) == list(range(6)) and set(sel[0]) == set(GROUPS)
        bits = sum(GROUPS[name] * cand["bpw"] for layer in sel.values()
                   for name, cand in layer.items())
        assert bits / (6 * sum(GROUPS.values())) == pytest.approx(ch.bpw)
        assert ch.bpw <= target
        picks[target] = [c["label"] for layer in sel.values() for c in layer.values()]
    assert picks[3.0] != picks[4.25]
    # a filter (say, what the export format can load) applies to both sides alike
    no_mix = lambda c: "parts" not in c  # noqa: E731
    ch = choose(store.groups(allowed=no_mix), 4.25)
    sel = store.selection(ch, allowed=no_mix)
    assert all("mix" not in c["label"] for layer in sel.values() for c in layer.values())
    with pytest.raises(InputError, match="no usable candidate"):
        store.groups(allowed=lambda c: False)
    # importance weights reach the optimiser
    weighted = store.groups(weight=lambda layer, name: 10.0 if layer == 0 else 1.0)
    assert [g.weight for g in weighted[:5]] == [10.0] * 4 + [1.0]


def test_mismatched_inputs_name_what_differs(tmp_path):
    path = tmp_path / "measurement.json"
    build(path, 1, random.randrange(10**6))
    with pytest.raises(InputError, match=r"setting damp: 0.01 -> 0.1"):
        MeasurementStore.open(path, fp(damp=0.1))
    other = job_fingerprint("another-model", "calib-hash", fp()["settings"])
    with pytest.raises(InputError, match="model files differ"):
        MeasurementStore.load(path).check_fingerprint(other)


def test_truncated_or_hand_broken_file(tmp_path):
    path = tmp_path / "measurement.json"
    build(path, 2, random.randrange(10**6))
    text = path.read_text()
    path.write_text(text[: random.randrange(10, len(text) - 5)])
    with pytest.raises(InputError, match=rf"{path} is not valid JSON: .* line \d+ column \d+"):
        MeasurementStore.load(path)
    doc = json.loads(text)
    doc["schema_version"] = 0
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="schema version 0, this layerquant reads version 1"):
        MeasurementStore.load(path)
    doc = json.loads(text)
    doc["layers"][1]["groups"]["mlp.down_proj"]["candidates"][3]["err"] = -1
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=r"layer entry 1, group mlp.down_proj, candidate 3"):
        MeasurementStore.load(path)
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(InputError, match="not a layerquant measurement"):
        MeasurementStore.load(path)
    with pytest.raises(InputError, match="does not exist"):
        MeasurementStore.load(tmp_path / "nope.json")


def test_bad_measurement_is_refused_before_writing(tmp_path):
    path = tmp_path / "measurement.json"
    store, _ = build(path, 1, random.randrange(10**6))
    before = path.read_bytes()
    layer = measure_layer(np.random.default_rng(0))
    layer["mlp.gate_up"]["candidates"][0]["err"] = float("nan")
    with pytest.raises(InputError, match="candidate 0"):
        store.record_layer(1, layer)
    assert path.read_bytes() == before and store.layers_done() == 1


def test_disk_full_while_recording_keeps_previous_layers(tmp_path):
    path = tmp_path / "measurement.json"
    store, measured = build(path, 3, random.randrange(10**6))
    before = path.read_bytes()
    with inject_write_failure(random.randrange(len(before))), pytest.raises(WriteFailed):
        store.record_layer(3, measure_layer(np.random.default_rng(9)))
    assert path.read_bytes() == before
    back = MeasurementStore.load(path)
    assert back.layers_done() == 3 and back.layers[2]["groups"] == measured[2]
