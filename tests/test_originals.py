"""Quantized originals (FP8 block / compressed-tensors FP8 and INT4 / MXFP4) read as float.

Each format is written from a known float model; an independent plain-torch dequantizer
written here from the formats' public descriptions (not quantizer/originals.py) turns it back
into a float checkpoint, and quantizing the quantized original must give the same export,
byte for byte, as quantizing that float checkpoint. Bad scales are refused in one line."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantizer.stream.source import CheckpointSource
from quantizer.demo.synthetic_originals import FORMATS, convert_checkpoint, mxfp4_blocks

from helpers import assert_refused, assert_same_tensors, load_tensors

BLOCK = 32  # several cells per tiny weight, and edge cells (kv_a_proj has 48 rows)
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


# ------------------------------------------------------------- the independent reference


def _ref_fp8(q: torch.Tensor, s: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Cell by cell: every (rows x cols) cell of the fp8 codes times its one scale."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            cell = (slice(i * rows, (i + 1) * rows), slice(j * cols, (j + 1) * cols))
            out[cell] = q[cell].to(torch.float32) * s[i, j].to(torch.float32)
    return out


def _ref_unpack(words: torch.Tensor, n: int, along_rows: bool) -> torch.Tensor:
    """compressed-tensors pack_to_int32: value k of each int32 word at bits 4k..4k+3."""
    w = words.t() if along_rows else words
    nibbles = [(w >> (4 * k)) & 0xF for k in range(8)]
    vals = torch.stack(nibbles, dim=-1).reshape(w.shape[0], -1)[:, :n]
    return vals.t() if along_rows else vals


def _ref_int4(t: dict, base: str) -> torch.Tensor:
    out_f, in_f = t[base + "weight_shape"].tolist()
    q = _ref_unpack(t[base + "weight_packed"], in_f, False).float() - 8
    scale = t[base + "weight_scale"].float()
    zp = t.get(base + "weight_zero_point")
    z = (_ref_unpack(zp, out_f, True).float() - 8) if zp is not None else torch.zeros_like(scale)
    g_idx = t.get(base + "weight_g_idx")
    group = g_idx.long() if g_idx is not None else torch.arange(in_f) // (in_f // scale.shape[1])
    w = torch.empty(out_f, in_f)
    for j in range(in_f):
        w[:, j] = (q[:, j] - z[:, group[j]]) * scale[:, group[j]]
    return w


def reference_float(quantized, out):
    """The quantized checkpoint `quantized` dequantized to a float32 checkpoint at `out`."""
    shutil.copytree(quantized, out)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    for shard in sorted(out.glob("*.safetensors")):
        t = load_file(shard)
        plain = {}
        for name, v in t.items():
            if name.endswith(".weight") and v.dtype == torch.float8_e4m3fn:
                base = name[:-len("weight")]
                s = t.get(base + "weight_scale_inv", t.get(base + "weight_scale"))
                if qc["quant_method"] == "fp8":
                    cell = qc["weight_block_size"]
                else:
                    w = qc["config_groups"]["group_0"]["weights"]
                    cell = {"tensor": v.shape, "channel": (1, v.shape[1]),
                            "block": w["block_structure"]}[w["strategy"]]
                    s = s.reshape(s.shape[0], -1) if s.dim() else s.reshape(1, 1)
                plain[name] = _ref_fp8(v, s.reshape(-(-v.shape[0] // cell[0]), -1), *cell)
            elif name.endswith(".weight_packed"):
                base = name[:-len("weight_packed")]
                plain[base + "weight"] = _ref_int4(t, base)
            elif not name.endswith(("_scale", "_scale_inv", "_shape", "_zero_point", "_g_idx")):
                plain[name] = v
        save_file(plain, str(shard), metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.is_file():
        index.unlink()  # the names changed; the source lists shards itself
    return out


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    from quantizer.demo.synthetic import write_checkpoint
    return write_checkpoint(tmp_path_factory.mktemp("float"), preset="tiny-deepseek",
                            dtype=torch.float32)


@pytest.fixture(scope="module")
def originals(float_model, tmp_path_factory):
    """fmt -> (quantized original, its float32 reference), written once per module."""
    cache = {}

    def make(fmt):
        if fmt not in cache:
            root = tmp_path_factory.mktemp(fmt)
            q = convert_checkpoint(float_model, root / "q", fmt, block=BLOCK)
            cache[fmt] = (q, reference_float(q, root / "ref"))
        return cache[fmt]

    return make


# ---------------------------------------------------------------------------- reading


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_equals_the_reference_and_stays_close_to_the_float_model(fmt, originals,
                                                                       float_model):
    q, ref = originals(fmt)
    src = CheckpointSource(q, originals=True)
    want = CheckpointSource(ref)
    orig = CheckpointSource(float_model)
    assert sorted(src.names()) == sorted(want.names())  # normal names, scales gone
    for i in range(src.num_layers):
        names = src.layer_names(i)
        got = src.load(names, dtype=torch.float32)
        exact = want.load(names)
        close = orig.load(names)
        for n in names:
            assert torch.equal(got[n], exact[n]), n
            assert src.shape(n) == list(exact[n].shape)
            if exact[n].dim() == 2:
                rel = (got[n] - close[n]).norm() / close[n].norm()
                assert rel < (0.12 if "int4" in fmt else 0.04), (n, float(rel))
    stored = src.load_stored(src.layer_names(1))
    quantized = [n for n, v in stored.items() if not isinstance(v, torch.Tensor)]
    assert quantized and all(n.endswith(".weight") for n in quantized)
    # the stored form stays compact: at most a byte per weight (plus scales) on the host
    assert all(stored[n].nbytes <= 1.2 * torch.Size(src.shape(n)).numel() for n in quantized)


def test_fp8_block_matches_transformers_dequantizer(originals):
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    deq = getattr(fp8, "_dequantize_fp8_weight", None)
    if deq is None:
        pytest.skip("this transformers has no _dequantize_fp8_weight")
    q, _ = originals("fp8-block")
    src = CheckpointSource(q, originals=True)
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # 48 rows: an edge cell
    stored = src.load_stored([name])[name]
    want = deq(stored.parts["weight"], stored.parts["scale"], [BLOCK, BLOCK], torch.float32)
    assert torch.equal(src.load([name], dtype=torch.float32)[name], want)


def _quantize(model, out, method, fmt="gptq"):
    from quantizer.api import quantize
    return quantize(model, out, bits=4, group_size=32, method=method, export_format=fmt,
                    calib_data="builtin", calib_samples=4, calib_seqlen=32,
                    progress=False, min_expert_tokens=1)


def _export(out):
    return load_tensors(out), json.loads((out / "config.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("fmt,method", [
    ("fp8-block", "gptq"), ("fp8-block", "awq"), ("ct-fp8-channel", "gptq"),
    ("ct-fp8-block", "rtn"), ("ct-fp8-tensor", "rtn"), ("ct-int4", "gptq"),
    ("ct-int4-asym", "rtn"), ("ct-int4-gidx", "rtn")])
def test_quantized_original_exports_like_its_dequantized_float(fmt, method, originals,
                                                               tmp_path):
    q, ref = originals(fmt)
    r = _quantize(q, tmp_path / "from_q", method, "awq" if method == "awq" else "gptq")
    _quantize(ref, tmp_path / "from_ref", method, "awq" if method == "awq" else "gptq")
    got, got_cfg = _export(tmp_path / "from_q")
    want, want_cfg = _export(tmp_path / "from_ref")
    assert_same_tensors(got, want)
    assert not any(k.endswith(("weight_scale_inv", "weight_packed_scale")) for k in got)
    assert got_cfg == want_cfg
    assert any(n.startswith("original weights:") for n in r.notes)


# ------------------------------------------------------------------------------ MXFP4


def _ref_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per byte: low nibble then high nibble, sign bit 3, e2m1 magnitude; times 2^(s-127);
    (E, rows, G, 16) -> (E, G*32, rows)."""
    e, rows, g, _ = blocks.shape
    out = torch.empty(e, rows, g * 32)
    for x in range(e):
        for r in range(rows):
            for k in range(g):
                for b in range(16):
                    byte = int(blocks[x, r, k, b])
                    for half, code in enumerate((byte & 15, byte >> 4)):
                        v = E2M1[code & 7] * (-1.0 if code & 8 else 1.0)
                        out[x, r, k * 32 + 2 * b + half] = v * 2.0 ** (int(scales[x, r, k]) - 127)
    return out.transpose(1, 2)


def _gpt_oss_like(path, experts=2, hidden=64, inter=32):
    """The expert tensors of a gpt-oss checkpoint (MXFP4) and one plain tensor."""
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(experts, hidden, 2 * inter, generator=gen) * 0.05
    down = torch.randn(experts, inter, hidden, generator=gen) * 0.05
    tensors = {"model.layers.0.input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    for name, w in (("gate_up_proj", gate_up), ("down_proj", down)):
        b, s = mxfp4_blocks(w)
        tensors[f"model.layers.0.mlp.experts.{name}_blocks"] = b
        tensors[f"model.layers.0.mlp.experts.{name}_scales"] = s
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    cfg = {"model_type": "gpt_oss", "num_hidden_layers": 1, "torch_dtype": "bfloat16",
           "quantization_config": {"quant_method": "mxfp4",
                                   "modules_to_not_convert": ["model.layers.*.self_attn"]}}
    (path / "config.json").write_text(json.dumps(cfg))
    return path, tensors, {"gate_up_proj": gate_up, "down_proj": down}


def test_mxfp4_reads_like_the_reference_and_transformers(tmp_path):
    from quantizer.stream.originals import original_format
    from quantizer.stream.source import read_header

    path, tensors, floats = _gpt_oss_like(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    fmt = original_format(cfg, read_header(path / "model.safetensors"))
    logical = fmt.logical(read_header(path / "model.safetensors"))
    for name, w in floats.items():
        full = f"model.layers.0.mlp.experts.{name}"
        assert logical[full].shape == tuple(w.shape)
        blocks, scales = tensors[full + "_blocks"], tensors[full + "_scales"]
        got = fmt.dequantize(logical[full], {"weight": blocks, "scale": scales},
                             torch.device("cpu"), torch.float32)
        assert torch.equal(got, _ref_mxfp4(blocks, scales))
        assert (got - w).norm() / w.norm() < 0.2  # 4-bit floats: coarse but the same matrix
        mx = pytest.importorskip("transformers.integrations.mxfp4")
        assert torch.equal(got, mx.convert_moe_packed_tensors(blocks, scales,
                                                              dtype=torch.float32))


def test_mxfp4_model_family_is_refused_until_supported(tmp_path, capsys):
    path, _, _ = _gpt_oss_like(tmp_path / "m")
    assert_refused([path, "-o", tmp_path / "out", "--method", "rtn", "--calib-samples", "0",
                    "--no-progress"], capsys, tmp_path, "gpt_oss")


# --------------------------------------------------------------------------- refusals


def _edit(q, tmp_path, fn, config=None):
    """A copy of `q` with tensors changed by fn(dict) (and config.json by config(dict))."""
    m = shutil.copytree(q, tmp_path / "bad")
    for shard in sorted(m.glob("*.safetensors")):
        t = load_file(shard)
        fn(t)
        save_file(t, str(shard), metadata={"format": "pt"})
    idx = m / "model.safetensors.index.json"
    if idx.is_file():
        idx.unlink()
    if config is not None:
        cfg = json.loads((m / "config.json").read_text())
        config(cfg)
        (m / "config.json").write_text(json.dumps(cfg))
    return m


def _refused(m, tmp_path, capsys, match, method="rtn", one_line=True):
    """One line, exit 2, nothing new under tmp_path (no out, no out.job)."""
    assert_refused([m, "-o", tmp_path / "out", "--method", method, "--no-progress",
                    "--calib-samples", "0" if method == "rtn" else "2", "--calib-seqlen", "16"],
                   capsys, tmp_path, match, one_line)


SCALE = "model.layers.1.self_attn.q_b_proj.weight_scale_inv"


def _pop_scale(t):
    t.pop(SCALE, None)


def _wrong_scale_shape(t):
    if SCALE in t:
        t[SCALE] = t[SCALE][:1]


def _int_scale(t):
    if SCALE in t:
        t[SCALE] = t[SCALE].to(torch.int32)


def _nan_scale(t):
    if SCALE in t:
        t[SCALE][0, 0] = float("nan")


def _stray_scale(t):
    if "model.layers.0.input_layernorm.weight" in t:
        t["model.layers.0.input_layernorm.weight_scale_inv"] = torch.ones(1)


@pytest.mark.parametrize("edit,match", [
    (_pop_scale, "q_b_proj.weight is F8_E4M3 but its scale"),
    (_wrong_scale_shape, "weight_scale_inv has shape [1, 2]"),
    (_int_scale, "scale dtype I32"),
    (_nan_scale, "weight_scale_inv contains NaN or inf"),
    (_stray_scale, "a scale tensor without its quantized weight")])
def test_bad_fp8_scales_are_refused(edit, match, originals, tmp_path, capsys):
    q, _ = originals("fp8-block")
    # a NaN scale is found while the layer is read, after the run's notes are logged: not yet
    # issue 25's one line (the notes go first), but the error is the last line
    _refused(_edit(q, tmp_path, edit), tmp_path, capsys, match, one_line=edit is not _nan_scale)


def test_bad_block_size_and_unread_methods_are_refused(originals, tmp_path, capsys):
    q, _ = originals("fp8-block")
    bad = _edit(q, tmp_path, lambda t: None,
                lambda c: c["quantization_config"].update(weight_block_size=[64, 64]))
    _refused(bad, tmp_path, capsys, "weight_scale_inv has shape")
    shutil.rmtree(bad)
    awq = _edit(q, tmp_path, lambda t: None,
                lambda c: c.update(quantization_config={"quant_method": "awq", "bits": 4}))
    _refused(awq, tmp_path, capsys, "already quantized (AWQ)")


def test_packed_weight_shape_mismatch_is_refused(originals, tmp_path, capsys):
    q, _ = originals("ct-int4")
    key = "model.layers.0.mlp.down_proj.weight_shape"

    def edit(t):
        if key in t:
            t[key] = torch.tensor([128, 512])

    _refused(_edit(q, tmp_path, edit), tmp_path, capsys, "weight_shape says [128, 512]")
