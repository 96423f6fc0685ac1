"""Issue 25: nothing lost, nothing half-written. Every case of the issue, table-driven, and the
rule over all of them: the exit code is one of 0, 2, 3, 130 (143 after SIGTERM); a refusal
(2) is exactly one line on stderr and leaves nothing new on disk, the user's files untouched.

The refusals run in-process (`quantizer.cli.main`) on tiny generated checkpoints: each takes
well under a second. Whole runs (a measurement, AWQ, SIGTERM, processes) are marked slow."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantizer.cli import main
from quantizer.errors import InputError

from helpers import assert_refused, cli

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--method", "rtn", "--calib-samples", "0", "--no-progress"]
CALIB = ["--calib-samples", "4", "--calib-seqlen", "16", "--no-progress"]
CUDA = torch.cuda.is_available()


# ---- the rule: helpers.assert_refused (rc 2, one line, the disk as it was) ----------------
def copy_model(tiny_checkpoint, dest: Path, preset: str = "tiny-llama") -> Path:
    shutil.copytree(tiny_checkpoint(preset), dest)
    return dest


def edit_config(model: Path, **changes) -> None:
    cfg = json.loads((model / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (model / "config.json").write_text(json.dumps(cfg))


def export(model: Path, out: Path, *extra) -> Path:
    assert main([str(model), "-o", str(out), *FAST, *extra]) == 0
    return out


# ---- the table: every refusal of the issue ------------------------------------------------
# (id, setup(tmp, model) -> None, argv with {m} {out} {tmp} placeholders, the words the one
# line must hold). The model is a copy under tmp, so the rule also sees it untouched.
def _user_dir(tmp, m):
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("the user's own notes")


def _our_export_plus_user_file(tmp, m):
    export(m, tmp / "out")
    (tmp / "out" / "README.md").write_text("added by the user")


def _our_export(tmp, m):
    export(m, tmp / "out")


def _file_output(tmp, m):
    (tmp / "out").write_text("a file")


def _no_layers_key(tmp, m):
    edit_config(m, num_hidden_layers=None)


def _layers_string(tmp, m):
    edit_config(m, num_hidden_layers="2")


def _bad_shape(tmp, m):
    f = m / "model.safetensors"
    t = load_file(f)
    key = "model.layers.1.mlp.up_proj.weight"
    t[key] = t[key][:200].contiguous()
    save_file(t, f)


def _fake_measurement(tmp, m):
    (tmp / "meas.json").write_text("{}")


def _quantized_input(tmp, m):
    export(m, tmp / "q")


def _stripped_export(tmp, m):
    """An AWQ export whose config.json lost its quantization_config: its tensors tell."""
    export(m, tmp / "q")
    edit_config(tmp / "q", quantization_config=None)


def _gptq_export(tmp, m):
    export(m, tmp / "q", "--format", "gptq")


def _measurement_in_output(tmp, m):
    export(m, tmp / "out")
    (tmp / "out" / "measurement.json").write_text("{}")  # the user's, inside our export...
    marker = json.loads((tmp / "out" / ".layerquant").read_text())
    marker["files"].append("measurement.json")  # ...which our marker even lists
    (tmp / "out" / ".layerquant").write_text(json.dumps(marker))


def _nothing(tmp, m):
    pass


def _job_of_other_inputs(tmp, m):
    """OUT.job of an interrupted run with other inputs (its lock file stays)."""
    from quantizer.measurements.jobstate import JobDir
    job = JobDir(tmp / "out.job")
    job.begin({"model": "other", "calibration": None, "settings": {"bits": 3}},
              first_stage="quantize")
    job.unlock()


CASES = [
    # data loss (was rc 0, the model or the user's files deleted)
    ("output-is-input-overwrite", _nothing, ["{m}", "-o", "{m}", "--overwrite"], "is the input model itself"),
    ("output-is-input-resume", _nothing, ["{m}", "-o", "{m}", "--resume"], "is the input model itself"),
    ("output-inside-input", _nothing, ["{m}", "-o", "{m}/q"], "lies inside the input model"),
    ("output-contains-input", _nothing, ["{m}", "-o", "{tmp}", "--resume"], "contains the input model"),
    ("resume-over-user-files", _user_dir, ["{m}", "-o", "{out}", "--resume"], "did not write (notes.txt)"),
    ("overwrite-user-files", _user_dir, ["{m}", "-o", "{out}", "--overwrite"], "did not write (notes.txt)"),
    ("overwrite-export-plus-user-file", _our_export_plus_user_file,
     ["{m}", "-o", "{out}", "--overwrite"], "also holds files layerquant did not write (README.md)"),
    ("resume-never-replaces-an-export", _our_export, ["{m}", "-o", "{out}", "--resume"], "--overwrite"),
    ("existing-export-needs-overwrite", _our_export, ["{m}", "-o", "{out}"], "pass --overwrite"),
    ("output-is-a-file", _file_output, ["{m}", "-o", "{out}"], "is a file"),
    ("resume-and-overwrite", _nothing, ["{m}", "-o", "{out}", "--resume", "--overwrite"], "contradict"),
    ("existing-job-needs-a-flag", _job_of_other_inputs, ["{m}", "-o", "{out}"], "--resume"),
    ("resume-other-inputs", _job_of_other_inputs, ["{m}", "-o", "{out}", "--resume"], "cannot resume"),
    ("work-dir-is-input", _nothing, ["{m}", "-o", "{out}", "--work-dir", "{m}"], "is the input model itself"),
    ("work-dir-inside-output", _nothing, ["{m}", "-o", "{out}", "--work-dir", "{out}/job"], "overlap"),
    ("measurement-inside-replaced-output", _measurement_in_output,
     ["{m}", "-o", "{out}", "--overwrite", "--method", "gptq", "--bits", "4.5", "--measurement",
      "{out}/measurement.json"], "--measurement"),
    # accepted nonsense (was rc 0 with an export)
    ("vram-budget-0", _nothing, ["{m}", "-o", "{out}", "--vram-budget", "0"], "--vram-budget"),
    ("vram-budget-negative", _nothing, ["{m}", "-o", "{out}", "--vram-budget", "-1"], "--vram-budget"),
    ("vram-budget-abc", _nothing, ["{m}", "-o", "{out}", "--vram-budget", "abc"], "--vram-budget"),
    ("vram-budget-1K", _nothing, ["{m}", "-o", "{out}", "--vram-budget", "1K"], "--vram-budget"),
    ("vram-budget-10T", _nothing, ["{m}", "-o", "{out}", "--vram-budget", "10T"], "--vram-budget"),
    ("plan-vram-budget-10T", _nothing, ["plan", "{m}", "--vram-budget", "10T"], "--vram-budget"),
    ("plan-vram-budget-0", _nothing, ["plan", "{m}", "--vram-budget", "0"], "--vram-budget"),
    ("ram-budget-1K", _nothing, ["{m}", "-o", "{out}", "--ram-budget", "1K"], "--ram-budget"),
    ("ram-budget-garbage", _nothing, ["{m}", "-o", "{out}", "--ram-budget", "lots"], "--ram-budget"),
    ("plan-ram-budget-1K", _nothing, ["plan", "{m}", "--ram-budget", "1K"], "--ram-budget"),
    ("hessian-device-garbage", _nothing, ["{m}", "-o", "{out}", "--hessian-device", "tpu"], "--hessian-device"),
    ("max-shard-size-0", _nothing, ["{m}", "-o", "{out}", "--max-shard-size", "0"], "--max-shard-size"),
    ("bits-8.5-measurement", _fake_measurement,
     ["{m}", "-o", "{out}", "--bits", "8.5", "--measurement", "{tmp}/meas.json"], "--bits"),
    ("bits-100-measurement", _fake_measurement,
     ["{m}", "-o", "{out}", "--bits", "100", "--measurement", "{tmp}/meas.json"], "--bits"),
    ("abbreviation-bit", _nothing, ["{m}", "-o", "{out}", "--bit", "4"], "unrecognized arguments: --bit"),
    ("abbreviation-over", _nothing, ["{m}", "-o", "{out}", "--over"], "unrecognized arguments: --over"),
    ("measurement-missing", _nothing,
     ["{m}", "-o", "{out}", "--bits", "4.5", "--measurement", "{tmp}/none.json"], "--measurement"),
    ("calib-samples-negative", _nothing, ["{m}", "-o", "{out}", "--calib-samples", "-3"], "--calib-samples"),
    # wrong exit code, traceback-class messages (was rc 1, often OUT.job left)
    ("config-without-num-hidden-layers", _no_layers_key, ["{m}", "-o", "{out}"], "num_hidden_layers"),
    ("config-num-hidden-layers-string", _layers_string, ["{m}", "-o", "{out}"], "num_hidden_layers"),
    ("weight-shape-disagrees", _bad_shape, ["{m}", "-o", "{out}"], "model.layers.1.mlp.up_proj.weight"),
    ("weight-shape-disagrees-calibrated", _bad_shape, ["{m}", "-o", "{out}", *CALIB[:4]], "disagree"),
    ("dtype-unknown", _nothing, ["{m}", "-o", "{out}", "--dtype", "float8"], "--dtype"),
    ("device-garbage", _nothing, ["{m}", "-o", "{out}", "--device", "gpu0"], "--device"),
    ("awq-grid-0", _nothing, ["{m}", "-o", "{out}", "--method", "awq", "--awq-grid", "0"], "--awq-grid"),
    ("bits-nan", _nothing, ["{m}", "-o", "{out}", "--bits", "nan"], "--bits"),
    ("bits-inf", _nothing, ["{m}", "-o", "{out}", "--bits", "inf"], "--bits"),
    ("quantized-input-awq", _quantized_input, ["{tmp}/q", "-o", "{out}"], "already quantized (AWQ)"),
    ("quantized-input-gptq", _gptq_export, ["{tmp}/q", "-o", "{out}"], "already quantized (GPTQ)"),
    ("quantized-input-config-lost", _stripped_export, ["{tmp}/q", "-o", "{out}"],
     "already quantized (tensor"),
    ("calib-seqlen-beyond-context", _nothing,
     ["{m}", "-o", "{out}", "--calib-seqlen", "100000", "--calib-samples", "4"], "--calib-seqlen"),
    ("calib-beyond-host-memory", _nothing,
     ["{m}", "-o", "{out}", "--calib-seqlen", "4096", "--calib-samples", "100000"], "host memory"),
    ("check-tp-3", _nothing, ["check", "{m}", "--tp-size", "3"], "will not load at TP 3"),
    ("quantize-tp-size-3", _nothing, ["{m}", "-o", "{out}", "--tp-size", "3"], "will not load at TP 3"),
    ("quantize-pad-for-tp-1000", _nothing, ["{m}", "-o", "{out}", "--pad-for-tp", "1000"], "TP 1000"),
    ("missing-model", _nothing, ["{tmp}/nope", "-o", "{out}"], "does not exist"),
    ("eval-missing-model", _nothing, ["eval", "{tmp}/nope"], "does not exist"),
    ("eval-missing-base", _quantized_input, ["eval", "{tmp}/q", "--base", "{tmp}/gone"], "--base"),
    ("measure-output-is-dir", _nothing, ["measure", "{m}", "-o", "{tmp}"], "contains the input model"),
    ("measure-output-dir", _user_dir, ["measure", "{m}", "-o", "{out}"], "is a directory"),
    ("measure-output-user-file", _file_output, ["measure", "{m}", "-o", "{out}", "--overwrite"],
     "not a layerquant measurement"),
    ("measure-inside-model", _nothing, ["measure", "{m}", "-o", "{m}/measurement.json"], "inside the input model"),
]


@pytest.mark.parametrize("setup, argv, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refusals_are_one_line_exit_2_and_leave_the_disk_alone(setup, argv, match, tmp_path,
                                                                  tiny_checkpoint, capsys):
    m = copy_model(tiny_checkpoint, tmp_path / "m")
    setup(tmp_path, m)
    capsys.readouterr()
    argv = [a.format(m=m, out=tmp_path / "out", tmp=tmp_path) for a in argv]
    if argv[0] not in ("plan", "check", "eval", "measure"):  # quantize: fast unless told
        if "--method" not in argv and "--measurement" not in argv:
            argv += ["--method", "rtn"]
        if "--calib-samples" not in argv:
            argv += ["--calib-samples", "0"]
        argv.append("--no-progress")
    assert_refused(argv, capsys, tmp_path, match)


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("argv, match", [
    (["--device", "cuda"], "--device cuda"),
    (["--device", "cuda:1"], "--device cuda:1"),
    (["--devices", "0,1"], "--devices 0,1"),
], ids=["device-cuda", "device-cuda-1", "devices-0-1"])
def test_cuda_options_without_cuda(argv, match, tmp_path, tiny_checkpoint, capsys):
    """One line, no launch (so no torchelastic files in the temp folder either)."""
    m = copy_model(tiny_checkpoint, tmp_path / "m")
    temp_before = set(os.listdir(tempfile.gettempdir()))
    assert_refused([m, "-o", tmp_path / "out", *FAST, *argv], capsys, tmp_path, match)
    new = {n for n in set(os.listdir(tempfile.gettempdir())) - temp_before
           if n.startswith(("torchelastic", "layerquant-launch"))}
    assert not new


# ---- stuck after a refusal, a lost state.json ----------------------------------------------
def test_fix_the_input_and_rerun_works(tmp_path, tiny_checkpoint, capsys):
    """A refused run leaves no job directory, so fixing the model and running again is not
    refused for an 'unfinished job'."""
    m = copy_model(tiny_checkpoint, tmp_path / "m")
    good = (m / "model.safetensors").read_bytes()
    _bad_shape(tmp_path, m)
    assert_refused([m, "-o", tmp_path / "out", *FAST], capsys, tmp_path, "disagree")
    (m / "model.safetensors").write_bytes(good)
    code, err, _ = cli([m, "-o", tmp_path / "out", *FAST], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / ".layerquant").is_file() and not (tmp_path / "out.job").exists()


def _interrupted_job(tmp_path, m, marker: bool = True) -> Path:
    """OUT.job as a killed run leaves it (one committed layer), then state.json lost."""
    from quantizer.measurements.jobstate import JobDir
    work = tmp_path / "out.job"
    job = JobDir(work)
    job.begin({"model": "m", "calibration": None, "settings": {"bits": 4}},
              first_stage="quantize")
    job.save_layer("quantize", 0, {"w": torch.ones(2, 2)}, {"record": {}})
    job.commit_layer("quantize", 0)
    job.unlock()
    (work / "state.json").unlink()
    if not marker:  # a job directory from before markers: its stamped files say it is ours
        (work / ".layerquant").unlink()
    return work


@pytest.mark.parametrize("marker", [True, False], ids=["marker", "stamped-files"])
def test_lost_state_json_is_recognised_and_overwrite_clears_it(marker, tmp_path,
                                                               tiny_checkpoint, capsys):
    m = copy_model(tiny_checkpoint, tmp_path / "m")
    work = _interrupted_job(tmp_path, m, marker)
    for flags in ([], ["--resume"]):
        line = assert_refused([m, "-o", tmp_path / "out", *FAST, *flags], capsys, tmp_path,
                              "state.json is lost")
        assert "--overwrite" in line
    code, err, _ = cli([m, "-o", tmp_path / "out", *FAST, "--overwrite"], capsys)
    assert code == 0, err
    assert not work.exists() and (tmp_path / "out" / "model.safetensors").is_file()


def test_a_job_directory_with_user_files_is_never_wiped(tmp_path, tiny_checkpoint, capsys):
    m = copy_model(tiny_checkpoint, tmp_path / "m")
    work = _interrupted_job(tmp_path, m)
    (work / "diary.txt").write_text("mine")
    assert_refused([m, "-o", tmp_path / "out", *FAST, "--overwrite"], capsys, tmp_path,
                   "diary.txt")


def test_overwrite_replaces_our_export_and_resume_of_an_overwrite_may_too(tmp_path,
                                                                        tiny_checkpoint,
                                                                        capsys):
    m = copy_model(tiny_checkpoint, tmp_path / "m")
    out = export(m, tmp_path / "out")
    code, err, _ = cli([m, "-o", out, *FAST, "--overwrite", "--bits", "8", "--format",
                        "gptq"], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8
    # a job started with --overwrite, interrupted before it published: --resume finishes it
    from quantizer.measurements.jobstate import JobDir
    job = JobDir(tmp_path / "out.job")
    job.begin({"model": "x", "calibration": None, "settings": {}}, first_stage="quantize")
    job.set_note("replaces_output", True)
    job.unlock()
    from quantizer.run.jobdir import check_output
    check_output(out, tmp_path / "out.job", overwrite=False, resume=True)  # allowed
    (tmp_path / "out.job" / "state.json").write_text(
        (tmp_path / "out.job" / "state.json").read_text().replace('"replaces_output": true',
                                                                  '"other": true'))
    with pytest.raises(InputError, match="--resume never deletes"):
        check_output(out, tmp_path / "out.job", overwrite=False, resume=True)


# ---- misleading messages ---------------------------------------------------------------------
def _dense_config(path: Path, **cfg) -> Path:
    path.mkdir()
    base = dict(model_type="llama", hidden_size=192, intermediate_size=512,
                num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                vocab_size=512)
    (path / "config.json").write_text(json.dumps({**base, **cfg}))
    return path


def test_check_never_offers_padding_that_changes_nothing(tmp_path, capsys):
    """TP 1 with a hidden width no Marlin kernel takes: padding the MLP cannot help, so it
    is not offered (it used to say 'pads intermediate_size 512 → 512')."""
    path = _dense_config(tmp_path / "m")
    code, err, out = cli(["check", path, "--tp-size", "1"], capsys)
    assert code == 2 and len(err) == 1 and "padding cannot fix" in err[0], err
    assert "--pad-for-tp 1" not in out + err[0] and "512 → 512" not in out


def test_pad_for_tp_1000_is_not_advised_when_heads_cannot_split(tmp_path, tiny_checkpoint,
                                                                capsys):
    m = copy_model(tiny_checkpoint, tmp_path / "m")
    line = assert_refused([m, "-o", tmp_path / "out", *FAST, "--pad-for-tp", "1000"], capsys,
                          tmp_path, "attention heads")
    assert "padding cannot fix attention" in line and "→" not in line
    code, err, out = cli(["check", m, "--tp-size", "1000"], capsys)
    assert code == 2 and len(err) == 1 and "quantizing with --pad-for-tp" not in out


def test_eval_offline_hint_names_evals_own_flag(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    m = copy_model(tiny_checkpoint, tmp_path / "m")
    q = export(m, tmp_path / "q")
    monkeypatch.setitem(sys.modules, "datasets", None)  # no `datasets`: offline
    monkeypatch.delenv("LAYERQUANT_WIKITEXT", raising=False)
    line = assert_refused(["eval", q, "--data", "pileval", "--no-progress"], capsys, tmp_path,
                          "--data path/to/file.txt")
    assert "--calib-data" not in line


@pytest.mark.slow
def test_eval_says_when_the_recorded_original_is_gone(tmp_path, tiny_checkpoint, capsys,
                                                      caplog):
    m = copy_model(tiny_checkpoint, tmp_path / "m")
    q = export(m, tmp_path / "q")
    shutil.rmtree(m)
    code, err, out = cli(["eval", q, "--data", "builtin", "--seqlen", "32", "--max-windows",
                          "2", "--no-progress"], capsys)
    assert code == 0, err
    assert "is gone" in out and "--base" in out
    assert any("is gone" in r.getMessage() for r in caplog.records)  # a warning too


def test_help_texts_and_no_abbreviations():
    from quantizer.cli.args import PARSERS, quantize_parser
    for make in PARSERS.values():
        assert make().allow_abbrev is False
    helps = {a.dest: a.help for a in quantize_parser()._actions}
    for dest in ("bits", "calib_samples", "calib_seqlen", "seed", "device", "output"):
        assert helps[dest], dest


def test_measure_help_names_a_file(capsys):
    with pytest.raises(SystemExit):
        main(["measure", "--help"])
    out = capsys.readouterr().out
    assert "measurement file" in out and "output directory" not in out


def test_readme_documents_the_environment_variables():
    readme = (ROOT / "README.md").read_text()
    for var in ("LAYERQUANT_WIKITEXT", "LAYERQUANT_DEBUG"):
        assert var in readme


def test_missing_path_is_reported_before_torch_is_imported(tmp_path):
    code = ("import sys; from quantizer.cli import main; rc = main(['%s', '-o', 'x']); "
            "print(rc, 'torch' in sys.modules)" % (tmp_path / "nope"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert res.stdout.split() == ["2", "False"], res.stderr
    assert res.stderr.strip().splitlines() == [f"error: model path does not exist: "
                                               f"{tmp_path / 'nope'}"]


@pytest.mark.skipif(CUDA, reason="the note is for machines without a GPU")
def test_plan_without_a_gpu_says_what_it_planned_for(tmp_path, tiny_checkpoint, capsys):
    code, err, out = cli(["plan", tiny_checkpoint(), "--vram-budget", "16G"], capsys)
    assert code == 0, err
    assert out.startswith("no GPU is visible here")


def test_api_default_method_is_the_clis(monkeypatch, tmp_path, tiny_checkpoint):
    import quantizer.api as api
    from quantizer.settings import default_method
    seen = {}

    def fake_run(model, settings, out, progress):
        seen["method"] = settings.validated().method
    monkeypatch.setattr(api, "run_quantize", fake_run)
    for bits in (4, 3, 4.5):
        api.quantize(tiny_checkpoint(), tmp_path / "o", bits=bits)
        assert seen["method"] == default_method(bits)


# ---- the Python API --------------------------------------------------------------------------
@pytest.mark.parametrize("call, match", [
    (lambda api, m, o: api.quantize(m, o, bitz=4), "did you mean bits"),
    (lambda api, m, o: api.quantize(m, o, method="gptq", dmap=0.1), "did you mean damp"),
    (lambda api, m, o: api.measure(m, o, calib_sample=4), "did you mean calib_samples"),
    (lambda api, m, o: api.evaluate(m, dat="builtin"), "did you mean data"),
    (lambda api, m, o: api.load(m, devic="cpu"), "did you mean device"),
], ids=["quantize", "quantize-method-option", "measure", "evaluate", "load"])
def test_api_mistyped_keyword_is_one_value_error(call, match, tmp_path, tiny_checkpoint):
    import quantizer as api
    with pytest.raises(ValueError, match=match) as info:
        call(api, tiny_checkpoint(), tmp_path / "o")
    assert isinstance(info.value, InputError) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_api_raises_the_clis_line(tmp_path, tiny_checkpoint, capsys):
    import quantizer
    m = tiny_checkpoint()
    code, err, _ = cli([m, "-o", tmp_path / "o", *FAST, "--vram-budget", "1K"], capsys)
    with pytest.raises(ValueError) as info:
        quantizer.quantize(m, tmp_path / "o", method="rtn", calib_samples=0, vram_budget="1K")
    assert code == 2 and err == [f"error: {info.value}"]


def test_load_of_a_float_directory_says_so(tiny_checkpoint):
    from quantizer import load
    with pytest.warns(UserWarning, match="not a quantized export"):
        load(tiny_checkpoint())


# ---- quantized originals: one recogniser (quantizer/originals.py, issue 23) -----------------
@pytest.mark.parametrize("config, header, refused", [
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, {}, "(AWQ)"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, {}, "(GPTQ)"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, {},
     "(bitsandbytes)"),
    ({}, {"a.qweight": ([8, 64], "I32"), "a.qzeros": ([1, 8], "I32")}, "tensor a.q"),
    ({}, {"a.weight_packed": ([8, 8], "I32")}, "tensor a.weight_packed"),
    ({}, {"a.weight": ([8, 8], "F8_E4M3")}, "no quantization_config"),
    ({}, {"a.weight": ([8, 8], "BF16")}, None),
])
def test_quantized_inputs_are_recognised_in_one_place(config, header, refused):
    from quantizer.stream.originals import original_format
    if refused is None:
        assert original_format(config, header) is None
        return
    with pytest.raises(InputError, match=re.escape(refused)) as info:
        original_format(config, header)
    assert "\n" not in str(info.value)


# ---- adaptive targets against a measurement --------------------------------------------------
@pytest.fixture(scope="module")
def measured(tmp_path_factory, tiny_checkpoint, prose_file):
    root = tmp_path_factory.mktemp("measured")
    model = root / "m"
    shutil.copytree(tiny_checkpoint(), model)
    meas = root / "measurement.json"
    calib = ["--calib-data", str(prose_file), *CALIB]
    assert main(["measure", str(model), "-o", str(meas), *calib]) == 0
    return model, meas, calib


@pytest.mark.slow
def test_adaptive_targets_name_one_range(measured, tmp_path, capsys):
    """A target the measurement cannot reach is refused before any work, naming the one
    bound it misses for the engine (the smallest servable target for vLLM; the least any
    candidate reaches with --engine none), never two different minimums."""
    model, meas, calib = measured
    local = tmp_path / "meas.json"
    shutil.copy(meas, local)
    line = assert_refused([model, "-o", tmp_path / "out", "--bits", "2.1", "--measurement",
                           local, *calib], capsys, tmp_path, "smallest servable target")
    assert line.count(" bpw") == 1
    line = assert_refused([model, "-o", tmp_path / "out", "--bits", "2.1", "--measurement",
                           local, "--engine", "none", *calib], capsys, tmp_path,
                          "below the least")
    assert line.count("choose --bits") == 1
    doc = json.loads(local.read_text())  # a measurement that offers at most 5 bits
    for layer in doc["layers"]:
        for g in layer["groups"].values():
            g["candidates"] = [c for c in g["candidates"] if c["bits"] <= 5]
    narrow = tmp_path / "narrow.json"
    narrow.write_text(json.dumps(doc))
    assert_refused([model, "-o", tmp_path / "out", "--bits", "7", "--measurement", narrow,
                    "--engine", "none", *calib], capsys, tmp_path, "above the most")
    other = [a if a != "16" else "24" for a in calib]  # another calibration length
    assert_refused([model, "-o", tmp_path / "out", "--bits", "4.5", "--measurement", local,
                    *other], capsys, tmp_path, "calibration set differs")
    # below the smallest servable target, above the least of every candidate: --engine none
    # runs it, and says no other minimum
    code, err, _ = cli([model, "-o", tmp_path / "q", "--bits", "3", "--measurement", local,
                        "--engine", "none", *calib], capsys)
    assert code == 0, err
    assert not any("choose" in ln or "smallest" in ln for ln in err), err


# ---- whole runs: SIGTERM, AWQ's note, processes -------------------------------------------
@pytest.mark.slow
def test_sigterm_keeps_the_job_and_prints_the_resume_hint(tmp_path, tiny_checkpoint,
                                                          prose_file):
    m = copy_model(tiny_checkpoint, tmp_path / "m")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "quantizer.cli", str(m), "-o", str(out), "--method", "gptq",
            "--calib-data", str(prose_file), "--calib-samples", "16", "--calib-seqlen", "64",
            "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    state = tmp_path / "out.job" / "state.json"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 143, err
    assert "--resume" in err.strip().splitlines()[-1], err
    assert state.exists() and not out.exists()
    res = subprocess.run(args + ["--resume"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr
    assert (out / ".layerquant").is_file() and not (tmp_path / "out.job").exists()


@pytest.mark.slow
def test_awq_says_a_skipped_scale_group_once_per_run(tmp_path, tiny_checkpoint, prose_file,
                                                    caplog):
    from quantizer import quantize
    caplog.set_level("INFO", logger="quantizer")
    quantize(tiny_checkpoint("tiny-llama", num_hidden_layers=3), tmp_path / "q", method="awq",
             calib_data=str(prose_file), calib_samples=2, calib_seqlen=16, progress=False)
    logs = caplog.messages
    skipped = [ln for ln in logs if "skipping scale group" in ln]
    assert len(skipped) == 1, logs


@pytest.mark.slow
def test_launch_cleans_its_temporary_files_on_every_exit(tmp_path):
    """Success and a worker's failure: the launcher's log/error folder is removed, and a
    failure is one line naming the worker."""
    from quantizer.parallel import distributed as D
    from quantizer.errors import QuantizerError
    temp = Path(tempfile.gettempdir())
    before = {p.name for p in temp.iterdir()}
    assert D.launch(["cpu", "cpu"], D.run_sequence, [(json.loads, ("[1]",))]) == [[1]]
    with pytest.raises(QuantizerError, match=r"^worker rank \d failed: .*JSONDecodeError") as e:
        D.launch(["cpu", "cpu"], D.run_sequence, [(json.loads, ("{",))])
    assert "\n" not in str(e.value)
    new = {p.name for p in temp.iterdir()} - before
    assert not {n for n in new if n.startswith(("layerquant-launch", "torchelastic"))}, new
