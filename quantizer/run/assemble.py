"""Assemble the export: the shards (export/store.py: non-layer tensors from the source, the
layers written in place or from their job files), config.json with its quantization_config, the tokenizer, layerquant.json
and the marker, staged inside the job directory until it is published."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..export.store import write_shards
from ..export.writer import copy_tokenizer, write_config
from .outputs import EXPORT, write_marker
from .serving_checks import export_quantization_config


def assemble(job, jobdir, staged: Path, max_shard_bytes: int,
             module_settings: dict | None = None) -> None:
    """Final checkpoint (job: run.job.Job): the shards (written in place layer by layer, or
    assembled from layer files: export/store.py), config.json, tokenizer, layerquant.json."""
    source = job.source
    write_shards(job, jobdir, staged, max_shard_bytes)
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
