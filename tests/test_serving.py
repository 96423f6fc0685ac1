"""Serving rules (quantizer/export/serving.py): one hand-made export per rule that breaks it
(config.json + tensors of the right shapes, zeros inside: the rules read headers, g_idx and
weight_shape), checked for exactly that finding; then the CLI and the pipeline around it."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from quantizer.cli import main
from quantizer.export.serving import ERROR, check_export

H, I, L = 256, 512, 2  # hidden, dense MLP width, layers: Marlin-aligned at TP 1 and 2
DENSE = dict(model_type="llama", hidden_size=H, intermediate_size=I, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, num_hidden_layers=L, vocab_size=64)
MIXTRAL = dict(DENSE, model_type="mixtral", intermediate_size=256, num_local_experts=2,
               num_experts_per_tok=1)
ATTN = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (128, H), "self_attn.v_proj": (128, H),
        "self_attn.o_proj": (H, H)}
MLP = {"mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}


def experts(width: int = 256, n: int = 2) -> dict:
    return {f"block_sparse_moe.experts.{e}.{w}": shape for e in range(n)
            for w, shape in (("w1", (width, H)), ("w3", (width, H)), ("w2", (H, width)))}


def ct_tensors(p, out, inp, bits, gs, zp=False, g_idx=None):
    n = 1 if gs == -1 else inp // gs
    t = {f"{p}.weight_packed": torch.zeros(out, -(-inp * bits // 32), dtype=torch.int32),
         f"{p}.weight_scale": torch.ones(out, n, dtype=torch.float16),
         f"{p}.weight_shape": torch.tensor([out, inp])}
    if zp:
        t[f"{p}.weight_zero_point"] = torch.zeros(-(-out * bits // 32), n, dtype=torch.int32)
    if g_idx is not None:
        t[f"{p}.weight_g_idx"] = g_idx.to(torch.int32)
    return t


def gptq_tensors(p, out, inp, bits, gs, g_idx=None):
    n = 1 if gs == -1 else inp // gs
    g = torch.arange(inp) // (inp if gs == -1 else gs) if g_idx is None else g_idx
    return {f"{p}.qweight": torch.zeros(inp * bits // 32, out, dtype=torch.int32),
            f"{p}.qzeros": torch.zeros(n, out * bits // 32, dtype=torch.int32),
            f"{p}.scales": torch.ones(n, out, dtype=torch.float16),
            f"{p}.g_idx": g.to(torch.int32)}


def awq_tensors(p, out, inp, bits, gs):
    n = 1 if gs == -1 else inp // gs
    return {f"{p}.qweight": torch.zeros(inp, out * bits // 32, dtype=torch.int32),
            f"{p}.qzeros": torch.zeros(n, out * bits // 32, dtype=torch.int32),
            f"{p}.scales": torch.ones(n, out, dtype=torch.float16)}


WRITERS = {"compressed-tensors": ct_tensors, "gptq": gptq_tensors, "awq": awq_tensors}


def write_export(path, config, qcfg, modules, bits=4, gs=128, per=None, floats=(), **kw):
    """An export of `config` whose every layer holds `modules` ({relative name: (out, in)})
    quantized as qcfg's method stores them (`per`: {relative name: (bits, gs)} overrides),
    plus float `floats` (routers) and an fp16 embedding / lm_head."""
    path.mkdir(parents=True, exist_ok=True)
    method = qcfg["quant_method"]
    tensors = {"model.embed_tokens.weight": torch.zeros(64, H, dtype=torch.float16),
               "lm_head.weight": torch.zeros(64, H, dtype=torch.float16)}
    for i in range(config["num_hidden_layers"]):
        for rel, (out, inp) in modules.items():
            b, g = (per or {}).get(rel, (bits, gs))
            tensors.update(WRITERS[method](f"model.layers.{i}.{rel}", out, inp, b, g, **kw))
        for rel, (out, inp) in dict(floats).items():
            tensors[f"model.layers.{i}.{rel}.weight"] = torch.zeros(out, inp,
                                                                   dtype=torch.float16)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": qcfg}))
    return path


def ct_config(bits=4, gs=128, sym=True, actorder=None, targets=("Linear",),
              ignore=("lm_head",), groups=None):
    def group(b, g, s, t):
        return {"targets": list(t), "format": "pack-quantized", "input_activations": None,
                "weights": {"num_bits": b, "type": "int", "symmetric": s,
                            "strategy": "channel" if g == -1 else "group",
                            "group_size": None if g == -1 else g, "actorder": actorder,
                            "dynamic": False}}
    groups = groups or [(bits, gs, sym, targets)]
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "ignore": list(ignore),
            "config_groups": {f"group_{k}": group(*g) for k, g in enumerate(groups)}}


def gptq_config(bits=4, gs=128, sym=True, desc_act=False):
    return {"quant_method": "gptq", "bits": bits, "group_size": gs, "sym": sym,
            "desc_act": desc_act, "checkpoint_format": "gptq"}


def awq_config(bits=4, gs=128, not_convert=("lm_head",)):
    return {"quant_method": "awq", "bits": bits, "group_size": gs, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": list(not_convert)}


def rules(report, verdict=None) -> set[str]:
    return {f.rule for f in report.findings if verdict is None or f.verdict == verdict}


def test_fine_exports_have_no_findings(tmp_path):
    for name, cfg, qcfg in (("awq", DENSE, awq_config()), ("gptq", DENSE, gptq_config()),
                            ("ct", DENSE, ct_config())):
        report = check_export(write_export(tmp_path / name, cfg, qcfg, {**ATTN, **MLP}))
        assert report.findings == [], report.render()
        assert report.modules == 2 * 7
    moe = write_export(tmp_path / "moe", MIXTRAL, ct_config(ignore=(
        "lm_head", r"re:^model\.layers\.\d+\.block_sparse_moe\.gate$")), {**ATTN, **experts()},
        floats={"block_sparse_moe.gate": (2, H)})
    report = check_export(moe)
    assert report.findings == [], report.render()
    assert report.paths == {"dense": "compressed-tensors WNA16 (Marlin)",
                            "moe": "compressed-tensors WNA16 MoE (Marlin MoE)"}


def test_format_unknown_or_nothing_quantized(tmp_path):
    bnb = write_export(tmp_path / "bnb", DENSE, gptq_config(), ATTN)
    cfg = json.loads((bnb / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    (bnb / "config.json").write_text(json.dumps(cfg))
    assert rules(check_export(bnb), ERROR) == {"format"}


def test_awq_bits(tmp_path):
    report = check_export(write_export(tmp_path / "a", DENSE, awq_config(bits=8), ATTN, bits=8))
    assert rules(report, ERROR) == {"awq-bits"}


def test_awq_not_convert_substring_unquantizes_a_packed_module(tmp_path):
    # vLLM's is_layer_skipped(skip_with_substr=True): "mlp.gate" also catches mlp.gate_proj
    report = check_export(write_export(tmp_path / "a", DENSE,
                                       awq_config(not_convert=("lm_head", "mlp.gate")), MLP))
    assert rules(report, ERROR) == {"scheme", "fused-scheme"}  # gate_proj float, up_proj not
    (f,) = [f for f in report.errors if f.rule == "scheme"]
    assert "mlp.gate_proj" in f.module and "'mlp.gate'" in f.message


def test_gptq_bits(tmp_path):
    report = check_export(write_export(tmp_path / "g", DENSE, gptq_config(bits=6), ATTN, bits=6))
    assert rules(report, ERROR) == {"gptq-bits"}


def test_gptq_asymmetric_dense_is_off_marlin(tmp_path):
    report = check_export(write_export(tmp_path / "g", DENSE, gptq_config(sym=False), ATTN))
    assert rules(report) == {"gptq-marlin"} and not report.errors
    assert "zero points" in report.warnings[0].message and "--sym" in report.warnings[0].fix
    assert report.paths["dense"] == "gptq (exllama / gptq_gemm)"


def test_gptq_permuted_g_idx_without_desc_act(tmp_path):
    perm = torch.randperm(H, generator=torch.Generator().manual_seed(0)) // 128
    report = check_export(write_export(tmp_path / "g", DENSE, gptq_config(), ATTN, g_idx=perm))
    assert rules(report, ERROR) == {"gidx"}
    ok = check_export(write_export(tmp_path / "d", DENSE, gptq_config(desc_act=True), ATTN,
                                   g_idx=perm))
    assert not ok.errors  # desc_act: gptq_marlin sorts by g_idx


def test_gptq_asymmetric_moe_loads_wrong(tmp_path):
    report = check_export(write_export(tmp_path / "g", MIXTRAL, gptq_config(sym=False),
                                       experts(), floats={"block_sparse_moe.gate": (2, H)}))
    assert "moe-gptq-asym" in rules(report, ERROR)
    (f,) = [f for f in report.errors if f.rule == "moe-gptq-asym"]
    assert f.layers == (0, 1) and "--sym" in f.fix


def test_moe_bits(tmp_path):
    report = check_export(write_export(tmp_path / "m", MIXTRAL, gptq_config(bits=3), experts(),
                                       bits=3))
    assert "moe-bits" in rules(report, ERROR)


def test_ct_actorder_group_is_rejected(tmp_path):
    g_idx = torch.arange(H) // 128
    report = check_export(write_export(tmp_path / "c", DENSE, ct_config(actorder="group"),
                                       ATTN, g_idx=g_idx))
    assert rules(report, ERROR) == {"ct-actorder"}
    assert "--static-groups" in report.errors[0].fix
    weight = check_export(write_export(tmp_path / "w", DENSE, ct_config(actorder="weight"),
                                       ATTN))
    assert not weight.findings


def test_ct_format(tmp_path):
    path = write_export(tmp_path / "c", DENSE, ct_config(), ATTN)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["format"] = "int-quantized"
    (path / "config.json").write_text(json.dumps(cfg))
    assert "ct-format" in rules(check_export(path), ERROR)


def test_ct_asymmetric_bits(tmp_path):
    bad = check_export(write_export(tmp_path / "c3", DENSE, ct_config(bits=3, sym=False), ATTN,
                                    bits=3, zp=True))
    assert rules(bad, ERROR) == {"ct-asym-bits"}
    four = check_export(write_export(tmp_path / "c4", DENSE, ct_config(sym=False), ATTN,
                                     zp=True))
    assert rules(four) == {"ct-asym"} and not four.errors
    assert "0.8.5" in four.warnings[0].message


def test_ct_other_bits_are_off_marlin(tmp_path):
    report = check_export(write_export(tmp_path / "c", DENSE, ct_config(bits=5), ATTN, bits=5))
    assert rules(report) == {"ct-bits"} and not report.errors


def test_ct_linear_target_must_ignore_the_router(tmp_path):
    report = check_export(write_export(tmp_path / "c", MIXTRAL, ct_config(), experts(),
                                       floats={"block_sparse_moe.gate": (2, H)}))
    (f,) = report.errors
    assert f.rule == "ct-ignore" and f.module == "model.layers.*.block_sparse_moe.gate"
    assert f.layers == (0, 1) and "ignore" in f.fix


def test_scheme_must_target_every_quantized_linear_and_match_the_tensors(tmp_path):
    only_q = ct_config(targets=(r"re:.*q_proj$",))
    report = check_export(write_export(tmp_path / "c", DENSE, only_q, ATTN))
    assert rules(report, ERROR) == {"scheme", "fused-scheme"}
    assert any("no config group targets it" in f.message for f in report.errors)
    # zero points stored, the config says symmetric: vLLM would never read them
    zp = check_export(write_export(tmp_path / "z", DENSE, ct_config(), ATTN, zp=True))
    assert rules(zp, ERROR) == {"scheme"} and "zero points" in zp.errors[0].message
    # the config's group size is not the tensors'
    g = check_export(write_export(tmp_path / "g", DENSE, ct_config(gs=64), ATTN))
    assert rules(g, ERROR) == {"scheme"} and "group size" in g.errors[0].message


def test_fused_shards_share_one_scheme(tmp_path):
    mixed = ct_config(groups=[(3, 128, True, (r"re:.*q_proj$",)),
                              (4, 128, True, (r"re:.*[kvo]_proj$",))])
    report = check_export(write_export(tmp_path / "c", DENSE, mixed, ATTN,
                                       per={"self_attn.q_proj": (3, 128)}))
    assert "fused-scheme" in rules(report, ERROR)
    (f,) = [f for f in report.errors if f.rule == "fused-scheme"]
    assert f.module == "model.layers.*.self_attn.qkv_proj" and "q_proj 3-bit" in f.message


def test_experts_of_one_layer_share_one_scheme(tmp_path):
    per = {"block_sparse_moe.experts.1.w2": (8, 128)}
    mixed = ct_config(groups=[(8, 128, True, (r"re:.*experts\.1\.w2$",)),
                              (4, 128, True, ("Linear",))],
                      ignore=("lm_head", r"re:.*block_sparse_moe\.gate$"))
    report = check_export(write_export(tmp_path / "c", MIXTRAL, mixed, experts(), per=per,
                                       floats={"block_sparse_moe.gate": (2, H)}))
    assert rules(report, ERROR) == {"moe-scheme"}


def test_moe_scheme_is_looked_up_under_vllm_expert_names(tmp_path):
    # Per-module targets naming Mixtral's on-disk w1/w3/w2: vLLM asks for experts.0.gate_proj
    names = (r"re:^model\.layers\.(?:0|1)\.block_sparse_moe\.experts\.(?:0|1)\.w[123]$",)
    report = check_export(write_export(tmp_path / "c", MIXTRAL, ct_config(targets=names),
                                       experts()))
    assert rules(report, ERROR) == {"moe-lookup"}
    assert "experts.0.gate_proj" in report.errors[0].message
    # a target covering every expert linear name of the block: served (recent vLLM only)
    block = (r"re:^model\.layers\.(?:0|1)\.block_sparse_moe\.experts\.\d+\.[^.]+$",)
    ok = check_export(write_export(tmp_path / "b", MIXTRAL, ct_config(targets=block),
                                   experts()))
    assert not ok.errors and rules(ok) == {"moe-linear-target"}


def test_ct_asymmetric_moe_is_refused(tmp_path):
    report = check_export(write_export(tmp_path / "c", MIXTRAL, ct_config(sym=False),
                                       experts(), zp=True))
    assert rules(report, ERROR) == {"ct-moe-asym"}


def test_marlin_shapes_warn_and_tp_split(tmp_path):
    narrow = dict(DENSE, intermediate_size=192)  # down_proj K = 192: not a multiple of 128
    mlp = {"mlp.gate_proj": (192, H), "mlp.up_proj": (192, H), "mlp.down_proj": (H, 192)}
    path = write_export(tmp_path / "n", narrow, gptq_config(gs=64), mlp, gs=64)
    report = check_export(path)
    assert rules(report) == {"marlin-shape"} and not report.errors
    assert report.warnings[0].module == "model.layers.*.mlp.down_proj"
    strict = check_export(path, tp_size=1, strict_tp=True)  # --tp-size 1: asked for Marlin
    assert rules(strict, ERROR) == {"marlin-shape"}
    # TP 2: gate/up 96 outputs per GPU (% 64: off Marlin), down 96 inputs per GPU, which its
    # 64-groups do not divide (vLLM refuses the split): --pad-for-tp fixes both
    tp2 = check_export(path, tp_size=2, strict_tp=True)
    assert {(f.rule, f.module.rsplit(".", 1)[-1]) for f in tp2.errors} == {
        ("marlin-shape", "gate_proj"), ("marlin-shape", "up_proj"), ("tp-split", "down_proj")}
    assert all(f.fix == "--pad-for-tp 2" for f in tp2.errors)
    # TP 5: 192 outputs do not split: vLLM refuses whatever the kernel
    assert "tp-split" in rules(check_export(path, tp_size=5), ERROR)


def test_moe_marlin_shape_falls_back_or_fails(tmp_path):
    cfg = dict(MIXTRAL, intermediate_size=96)
    ok = check_export(write_export(tmp_path / "w", cfg, gptq_config(gs=32), experts(96),
                                   gs=32))
    assert rules(ok) == {"moe-marlin-shape"} and not ok.errors  # MoeWNA16 takes it
    eight = check_export(write_export(tmp_path / "e", cfg, gptq_config(bits=8, gs=32),
                                      experts(96), bits=8, gs=32))
    assert rules(eight, ERROR) == {"moe-fallback"}  # int8 with groups: MoeWNA16 cannot


def test_engine_none_checks_nothing(tmp_path):
    path = write_export(tmp_path / "a", DENSE, awq_config(bits=8), ATTN, bits=8)
    assert check_export(path, engine="none").findings == []


# ---- the command line --------------------------------------------------------------------
def test_check_cli_exit_codes_and_json(tmp_path, capsys):
    good = write_export(tmp_path / "good", DENSE, gptq_config(), {**ATTN, **MLP})
    assert main(["check", str(good)]) == 0
    assert "0 error(s), 0 warning(s), 14 quantized modules" in capsys.readouterr().out
    assert main(["check", str(good), "--tp-size", "2"]) == 0
    assert "TP-2: ok (group size 128)" in capsys.readouterr().out
    warn = write_export(tmp_path / "warn", DENSE, gptq_config(sym=False), ATTN)
    assert main(["check", str(warn)]) == 0
    out = capsys.readouterr().out
    # one line per distinct finding: every layer's q_proj in one line
    assert out.count("[gptq-marlin] model.layers.*.self_attn.q_proj (layers 0-1)") == 1
    bad = write_export(tmp_path / "bad", MIXTRAL, gptq_config(sym=False), experts())
    assert main(["check", str(bad), "--json"]) == 2
    data = json.loads(capsys.readouterr().out)
    assert data["errors"] and "moe-gptq-asym" in data["errors"][0]


# ---- the pipeline: defaults that serve, refusals before any work and before publishing ----
ARGS = ["--calib-samples", "4", "--calib-seqlen", "16", "--no-progress"]


@pytest.mark.slow
def test_gptq_default_is_symmetric_act_order_static_groups(tiny_checkpoint, tmp_path,
                                                           prose_file, request):
    src = tiny_checkpoint("tiny-mixtral")
    out = tmp_path / "q"
    assert main([str(src), "-o", str(out), "--method", "gptq", "--calib-data",
                 str(prose_file), *ARGS]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (cfg["sym"], cfg["desc_act"], cfg["static_groups"]) == (True, False, True)
    record = json.loads((out / "layerquant.json").read_text())
    assert record["serving"]["errors"] == []
    assert record["serving"]["kernel_paths"] == {
        "dense": "gptq_marlin (GPTQMarlinLinearMethod)",
        "moe": "gptq_marlin (GPTQMarlinMoEMethod)"}
    # the asymmetric choice stays, explicitly: dense exports then leave Marlin (a warning)
    dense = tiny_checkpoint("tiny-llama")
    asym = tmp_path / "asym"
    assert main([str(dense), "-o", str(asym), "--method", "gptq", "--asym",
                 "--no-act-order", "--calib-data", str(prose_file), *ARGS]) == 0
    cfg = json.loads((asym / "config.json").read_text())["quantization_config"]
    assert (cfg["sym"], cfg["desc_act"], cfg["static_groups"]) == (False, False, False)
    assert rules(request.node.serving_reports[-1]) == {"gptq-marlin"}


def test_refused_before_any_work(tiny_checkpoint, tmp_path, capsys):
    src = tiny_checkpoint("tiny-llama")
    out = tmp_path / "q"
    # asymmetric 3-bit compressed-tensors: vLLM takes zero points at 4/8 bit only
    assert main([str(src), "-o", str(out), "--method", "rtn", "--bits", "3", "--asym",
                 "--calib-samples", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "refused before any work" in err and "[ct-asym-bits]" in err and "--sym" in err
    # act-order with g_idx cannot be written as compressed-tensors >= 0.19 reads it
    assert main([str(src), "-o", str(out), "--method", "gptq", "--format",
                 "compressed-tensors", "--act-order", "--no-static-groups", *ARGS]) == 2
    assert "[ct-actorder]" in capsys.readouterr().err
    # 3-bit experts: vLLM's fused-MoE kernels take int4 / int8
    moe = tiny_checkpoint("tiny-qwen3-moe")
    assert main([str(moe), "-o", str(out), "--method", "rtn", "--bits", "3",
                 "--calib-samples", "0", "--no-progress"]) == 2
    assert "[moe-bits]" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing on disk


def test_not_published_when_the_written_export_breaks_a_rule(tiny_checkpoint, tmp_path,
                                                             monkeypatch, capsys):
    """An export whose files break a rule (here: a config that names the wrong width) is not
    published: exit 2 naming the rule, the job directory kept, and --resume re-exports it
    once fixed, without quantizing again."""
    import quantizer.run.assemble as assemble

    src = tiny_checkpoint("tiny-llama")
    out = tmp_path / "q"
    real = assemble.write_config

    def wrong_width(src_dir, dst_dir, updates):
        updates = {**updates, "quantization_config": {**updates["quantization_config"],
                                                      "bits": 8}}
        return real(src_dir, dst_dir, updates)

    monkeypatch.setattr(assemble, "write_config", wrong_width)
    args = [str(src), "-o", str(out), "--method", "rtn", "--calib-samples", "0",
            "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not published" in err and "[scheme]" in err and "job directory kept" in err
    assert not out.exists() and (tmp_path / "q.job").is_dir()
    monkeypatch.setattr(assemble, "write_config", real)
    assert main([*args, "--resume"]) == 0
    assert check_export(out).findings == [] and not (tmp_path / "q.job").exists()


@pytest.mark.serving_errors_expected  # --engine none writes what vLLM refuses, on purpose
def test_engine_none_skips_the_rules(tiny_checkpoint, tmp_path, request):
    from quantizer import quantize
    out = tmp_path / "q"
    quantize(tiny_checkpoint("tiny-llama"), out, bits=3, method="rtn", symmetric=False,
             calib_samples=0, progress=False, engine="none")
    assert rules(request.node.serving_reports[-1], ERROR) == {"ct-asym-bits"}
    assert json.loads((out / "layerquant.json").read_text())["serving"]["errors"] == []


@pytest.mark.slow
def test_adaptive_fused_groups_share_and_low_targets_are_refused(tiny_checkpoint, tmp_path,
                                                                 prose_file, capsys):
    src = tiny_checkpoint("tiny-llama")
    out = tmp_path / "q"
    assert main([str(src), "-o", str(out), "--bits", "4.5", "--calib-data", str(prose_file),
                 *ARGS]) == 0
    capsys.readouterr()
    from quantizer.validate.loader import quant_spec
    spec = quant_spec(json.loads((out / "config.json").read_text()))
    for i in range(2):
        for fused in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            parent = "self_attn" if "q_proj" in fused else "mlp"
            got = {(spec.for_module(f"model.layers.{i}.{parent}.{n}").bits,
                    spec.for_module(f"model.layers.{i}.{parent}.{n}").group_size)
                   for n in fused}
            assert len(got) == 1, (i, fused, got)
    # below what servable candidates reach: refused, naming the smallest servable target
    low = tmp_path / "low"
    assert main([str(src), "-o", str(low), "--bits", "2.1", "--measurement",
                 str(out / "measurement.json"), "--calib-data", str(prose_file), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "smallest servable target is" in err and not low.exists()
