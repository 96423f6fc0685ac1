"""Assemble the export: shards of the non-layer tensors (from the source) and the layers (from
their job files), config.json with its quantization_config, the tokenizer, layerquant.json
and the marker, staged inside the job directory until it is published."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..export.writer import ShardWriter, copy_tokenizer, write_config
from .outputs import EXPORT, write_marker
from .serving_checks import export_quantization_config


def assemble(job, jobdir, staged: Path, max_shard_bytes: int,
             module_settings: dict | None = None) -> None:
    """Final checkpoint (job: run.job.Job): non-layer tensors from the source, layers from
    their job files."""
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    source = job.source
    out_dtype = getattr(torch, job.settings.out_dtype)
    writer = ShardWriter(staged, max_shard_bytes)
    # Tensors the text model uses in the output dtype; a vision tower's and a projector's as
    # they are in the checkpoint (never cast, never quantized)
    text, kept = job.arch.split_non_layer(source.non_layer_names())
    head = source.load(text, dtype=out_dtype)
    head.update(source.load(kept))
    writer.add(dict(sorted(head.items())))
    del head
    for i in range(source.num_layers):
        tensors, _ = jobdir.load_layer("quantize", i)
        writer.add(dict(sorted(tensors.items())))
    writer.finish()
    qcfg = export_quantization_config(job, module_settings)
    if module_settings is not None and (jobdir.path / "measurement.json").is_file():
        shutil.copy2(jobdir.path / "measurement.json", staged / "measurement.json")
    updates = {"quantization_config": qcfg, "torch_dtype": job.settings.out_dtype}
    if job.padded_intermediate:
        updates.update(job.arch.config_update(source.raw_config, job.arch.intermediate_key,
                                              job.padded_intermediate))
    write_config(source.path, staged, updates)
    copy_tokenizer(source.path, staged)
    write_record(job, staged)
    write_marker(staged, EXPORT)  # last: it lists every file of the export


def write_record(job, staged: Path) -> None:
    """layerquant.json: where the export came from and how it was made."""
    (staged / "layerquant.json").write_text(json.dumps({
        "source": str(job.source.path.absolute()), "method": job.settings.method,
        "settings": job.settings.result_dict(), "group_size": job.group_size,
        "original_intermediate_size": job.intermediate, "notes": job.notes}, indent=2,
        sort_keys=True, default=str))
