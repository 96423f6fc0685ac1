"""The serving rules (export/serving.py) on this job's export: on the planned export before any
weight is read (adaptive: after the bit allocation), and on the staged files before they are
published; and the quantization_config the export carries."""
from __future__ import annotations

import json
from pathlib import Path

from ..export import get_exporter
from ..export.serving import (NotServable, Scheme, check_export, check_view, planned_view,
                              refuse_errors, router_ignore)
from .widths import linear_shapes


def serving_tp(settings) -> tuple[int, bool]:
    """The TP size the serving rules check at, and whether the user asked for it (then a
    shape off the Marlin path is an error, as --tp-size refuses it before any work)."""
    n = settings.tp_size or settings.pad_for_tp
    return (n or 1), bool(n)


def export_quantization_config(job, module_settings: dict | None = None) -> dict:
    """config.json's quantization_config for this job (job: run.job.Job; per-module
    settings: adaptive)."""
    s = job.settings
    act_order = bool(s.gptq.act_order)
    return get_exporter(job.export_format).quantization_config(
        bits=s.bits, group_size=job.group_size,
        not_converted=job.arch.not_converted(job.export_format),
        symmetric=s.symmetric, act_order=act_order, static_groups=bool(s.gptq.static_groups),
        damp=float(s.gptq.damp), float_linears=router_ignore(job.arch),
        module_bits=None if module_settings is None else {
            name: (bits, gs, s.symmetric, act_order)
            for name, (bits, gs) in module_settings.items()})


def check_planned(job, module_settings: dict | None = None) -> list[str]:
    """The serving rules on the export this job will write, before any weight is read (or,
    adaptive, before the quantize pass): InputError naming every error and its fix; the
    warnings come back as lines."""
    s, arch, cfg = job.settings, job.arch, job.source.raw_config
    g_idx = bool(s.gptq.act_order) and not s.gptq.static_groups
    shapes = linear_shapes(job.source, job.padded_intermediate)
    names, rel = [], {}
    for i in range(job.source.num_layers):
        for n in arch.for_layer(cfg, i).linears:
            full = f"{arch.layer_prefix(i)}.{n}"
            names.append(full)
            rel[full] = n
    awq = job.export_format == "awq"

    def scheme(full: str) -> Scheme:
        bits, gs = (module_settings or {}).get(full, (s.bits, job.group_size))
        return Scheme(int(bits), int(gs), False if awq else bool(s.symmetric), g_idx)

    def rel_shape(full: str):
        return shapes.get(rel[full]) or _expert_shape(rel[full], shapes)

    config = dict(cfg)
    if job.padded_intermediate:
        config[arch.intermediate_key] = job.padded_intermediate
    view = planned_view(config, export_quantization_config(job, module_settings),
                        {n: rel_shape(n) for n in names}, names, scheme)
    tp, strict = serving_tp(s)
    report = check_view(view, tp, s.engine, strict)
    refuse_errors(report, "refused before any work" if module_settings is None else
                  "refused after the bit allocation, before quantizing")
    return [f.line() for f in report.warnings]


def _expert_shape(name: str, shapes: dict) -> tuple[int, int]:
    # Every expert of a family has one shape: representative layers list each expert's
    # linears, so a missing name is only an expert of a MoE layer not listed there.
    key = next(k for k in shapes if k.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]
               and ".experts." in k)
    return shapes[key]


def check_staged(job, staged: Path) -> dict:
    """The serving rules on the written export before it is published: NotServable (the job
    directory is kept) on any error; warnings go into layerquant.json and the notes."""
    tp, strict = serving_tp(job.settings)
    report = check_export(staged, tp, job.settings.engine, strict)
    record = json.loads((staged / "layerquant.json").read_text())
    record["serving"] = report.to_dict()
    (staged / "layerquant.json").write_text(json.dumps(record, indent=2, sort_keys=True,
                                                       default=str))
    refuse_errors(report, "not published", NotServable)
    job.notes += [f"serving {f.line()}" for f in report.warnings]
    return report.to_dict()
