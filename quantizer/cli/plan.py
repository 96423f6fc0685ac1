"""`quantize plan MODEL`: the memory plan a run with these settings would get, from config.json
alone (plan/apply.py: the run's own path), and with --tp-size N whether the export would load
at tensor parallel N."""
from __future__ import annotations

import logging

from ..export.tp import check_checkpoint, describe_problems
from ..plan.apply import plan_command, plan_group_size
from ..plan.machine import visible_gpu_memory
from .args import settings_from_args

log = logging.getLogger(__name__)


def run(a) -> int:
    settings = settings_from_args(a).validated()
    gpus = visible_gpu_memory()
    settings.budgets.check_totals(gpus)
    if settings.budgets.vram and not gpus:
        print(f"no GPU is visible here: planned for the GPU(s) --vram-budget "
              f"{settings.budgets.vram_text} names (cuda:0 when it names none), as on the "
              f"machine that will run it")
    devices = [int(d.split(":")[1]) for d in settings.devices or () if d.startswith("cuda:")]
    print(plan_command(a.model, settings, devices or None))
    for n in a.plan_tp_sizes or ():
        problems, sizes = check_checkpoint(a.model, n, plan_group_size(settings))
        print(f"\nTP-{n}: ok (group size {', '.join(map(str, sizes))})" if not problems else
              "\n" + describe_problems(problems, n, ", ".join(map(str, sizes))))
    return 0
