"""`quantize measure MODEL -o measurement.json`: adaptive GPTQ's measurement pass alone."""
from __future__ import annotations

import json

from ..api import measure
from .args import output_from_args, settings_from_args


def run(a) -> int:
    out = output_from_args(a)
    summary = measure(a.model, out.output, settings_from_args(a), overwrite=out.overwrite,
                      resume=out.resume, work_dir=out.work_dir,
                      progress=not (a.no_progress or a.json))
    if a.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print(f"measured {summary['layers_measured']} of {summary['layers']} layers into "
              f"{summary['measurement']} ({summary['seconds']:.1f} s); quantize with "
              f"--measurement {summary['measurement']} --bits TARGET")
    return 0
