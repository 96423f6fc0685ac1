"""`quantize check OUT [--tp-size N]`: will vLLM load this export, and on its fast path? (the
serving rules of export/serving.py; a directory without quantized tensors gets the
tensor-parallel shape check of its config.json)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from ..export.serving import check_export
from ..export.tp import (check_checkpoint, checkpoint_group_sizes, describe_problems,
                         problem_summary)
from ..stream.source import read_config

TP_RULES = ("marlin-shape", "moe-marlin-shape", "tp-split")


def run(a) -> int:
    path = Path(a.model)
    if path.is_dir() and any(path.glob("*.safetensors")) and _has_quantized(path):
        return _check_export(path, a)
    tp = a.tp_size or 1
    problems, sizes = check_checkpoint(a.model, tp, a.group_size)
    if not problems:
        print(f"TP-{tp}: ok (group size {', '.join(map(str, sizes))})")
        return 0
    groups = ", ".join(map(str, sizes))
    print(describe_problems(problems, tp, groups))  # the report: every problem
    raise InputError(problem_summary(problems, tp, groups) + " (listed above)")


def _check_export(path: Path, a) -> int:
    report = check_export(path, a.tp_size or 1, a.engine, strict_tp=a.tp_size is not None)
    print(json.dumps(report.to_dict(), indent=1) if a.json else report.render())
    if a.tp_size and not any(f.rule in TP_RULES for f in report.findings) and not a.json:
        sizes = checkpoint_group_sizes(read_config(path), a.group_size)
        print(f"TP-{a.tp_size}: ok (group size {', '.join(map(str, sizes))})")
    if report.errors:  # the report above; one line on stderr, as every refusal
        raise InputError(f"{path}: {len(report.errors)} serving error(s) listed above: vLLM "
                         f"would refuse this export or load it wrong")
    return 0


def _has_quantized(path: Path) -> bool:
    return (path / "config.json").is_file() and bool(
        read_config(path).get("quantization_config"))
