"""The command line builds the one settings object (issue 18): `quantize plan` plans with a
run's defaults, `quantize measure` refuses the flags a measurement would ignore, and every
refusal is one line, exit 2, nothing on disk. No torch work: argument parsing only, plus
the CLI's own refusal path for a few cases."""
from __future__ import annotations

import pytest

from quantizer.cli import main
from quantizer.cli.args import measure_parser, plan_parser, quantize_parser, settings_from_args
from quantizer.errors import InputError

PLANNED = ("bits", "method", "group_size", "dtype", "calib", "budgets", "hidden_device",
           "hessian_device", "devices", "gptq", "awq")


def _planned(settings):
    return {k: getattr(settings, k) for k in PLANNED}


@pytest.mark.parametrize("flags", [
    [],
    ["--bits", "3"],
    ["--bits", "4.5"],
    ["--method", "gptq", "--group-size", "64"],
    ["--vram-budget", "0:20G,1:40G", "--devices", "0,1", "--calib-samples", "16"],
    ["--dtype", "bfloat16", "--hidden-device", "cpu", "--ram-budget", "8G"],
])
def test_plan_resolves_the_settings_a_run_would(tmp_path, flags):
    """Same flags, same settings after validation: method, bits, group size, working dtype,
    calibration, budgets (one parse for every device) and method options."""
    model = str(tmp_path)
    plan = settings_from_args(plan_parser().parse_args([model, *flags])).validated()
    run = settings_from_args(quantize_parser().parse_args(
        [model, "-o", str(tmp_path / "out"), *flags])).validated()
    assert _planned(plan) == _planned(run)


def test_plan_and_run_take_the_default_method_of_the_api():
    from quantizer.settings import QuantSettings, default_method
    for bits in (2, 3, 4, 8, 4.25):
        args = plan_parser().parse_args(["m", "--bits", str(bits)])
        assert settings_from_args(args).validated().method == \
            QuantSettings(bits=bits).validated().method == default_method(
                QuantSettings(bits=bits).validated().bits, not float(bits).is_integer())


@pytest.mark.parametrize("flag", [
    ["--bits", "3"], ["--method", "awq"], ["--format", "gptq"], ["--awq-grid", "10"],
    ["--measurement", "m.json"], ["--tp-size", "2"], ["--engine", "none"], ["--adaptive"],
])
def test_measure_refuses_flags_it_would_ignore(flag):
    with pytest.raises(InputError, match="unrecognized arguments"):
        measure_parser().parse_args(["model", "-o", "m.json", *flag])


def test_measure_takes_what_a_measurement_depends_on():
    a = measure_parser().parse_args(["model", "-o", "m.json", "--damp", "0.05", "--asym",
                                     "--calib-samples", "16", "--group-size", "64",
                                     "--vram-budget", "20G"])
    s = settings_from_args(a).replaced(method="gptq").validated()
    assert (s.gptq.damp, s.symmetric, s.calib.samples) == (0.05, False, 16)


def test_measure_refusal_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["measure", str(tmp_path), "-o", str(out), "--bits", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--bits" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_damp_has_one_default():
    """The GPTQ export's quantization_config falls back to the option's own default."""
    from quantizer.export.gptq import quantization_config
    from quantizer.settings import GPTQOptions
    assert quantization_config(4, 128, [])["damp_percent"] == GPTQOptions().damp
