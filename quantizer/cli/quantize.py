"""`quantize MODEL -o OUT`: the settings the flags name, one run (or one process per device),
the report on stdout."""
from __future__ import annotations

from ..api import quantize_with
from ..parallel import distributed
from .args import output_from_args, settings_from_args


def run(a) -> int:
    joined = distributed.under_launcher() and not distributed.world().distributed
    if joined:  # started by torchrun: join its process group, one device per process
        distributed.join(distributed.resolve_devices(settings_from_args(a).devices))
    result = quantize_with(a.model, settings_from_args(a), output_from_args(a),
                           progress=not (a.no_progress or a.json))
    if distributed.world().main:
        print(result.to_json() if a.json else result)
    if joined:
        distributed.leave()
    return 0
