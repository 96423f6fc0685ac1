#!/usr/bin/env bash
# The one command to run on the GPU box (device tool), from the repository root:
#   bash benchmarks/gpu_run.sh [bench_speed.py options, e.g. --quick --only awq,gptq,peer]
#   BENCH=budget bash benchmarks/gpu_run.sh [bench_budget.py options, e.g. --only 70b,8G]
# The box has no network: the package is made importable from the working tree without pip,
# and the peer's wheels come in .whl/ (carried; see benchmarks/README.md). Results: a JSON and
# a log in $OUT (the device tool's return folder) or else benchmarks/results/.
set -u
cd "$(dirname "$0")/.."
. benchmarks/gpu_env.sh

dest="${OUT:-benchmarks/results}"
mkdir -p "$dest"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
bench="${BENCH:-speed}"  # speed: bench_speed.py; budget: bench_budget.py
json="$dest/${bench}_$stamp.json"
log="$dest/${bench}_$stamp.log"

{
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
  # one interpreter for the versions and the import check (each start costs seconds)
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'cuda', torch.cuda.is_available()); \
import quantizer.kernels, quantizer.calibration, quantizer.cli; print('layerquant importable')"
} 2>&1 | tee "$log"

wheels=()
[ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && wheels=(--peer-wheels .whl)
# ~9 minutes for everything on the device's 10-minute limit; runs that no longer fit are
# skipped (recorded in the JSON), never killed half way.
scratch="${BENCH_SCRATCH:-/tmp/layerquant_bench}"  # checkpoints, reused while the box stays warm
python3 "benchmarks/bench_$bench.py" --out "$json" --time-budget "${BENCH_TIME_BUDGET:-510}" \
  --scratch "$scratch" ${wheels[@]+"${wheels[@]}"} "$@" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
# the per-run stderr logs, for failures the JSON's tails do not explain (one archive: the
# device tool returns at most 8 files)
tar czf "$dest/logs_$stamp.tgz" -C "$scratch" logs 2>/dev/null || true
exit "$status"
