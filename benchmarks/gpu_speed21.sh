#!/usr/bin/env bash
# Issue 21's table in one short device call (about 4 minutes on one H100): ours and
# llm-compressor 0.14 one after the other on the same generated checkpoint, 8 layers of
# Llama-2-7B width, GPTQ then AWQ, bf16, 4-bit g128, 128 x 512 calibration tokens; then the
# start-up probe if time is left. From the repository root, with the peer's wheels carried in
# .whl/ (device tool: carry [".whl"]):
#   bash benchmarks/gpu_speed21.sh [more bench_speed.py options]
# The table is printed last; JSON, log and the per-run logs come back in $OUT. Runs whose
# estimate no longer fits BENCH_TIME_BUDGET (seconds, default 215) are skipped and recorded,
# never started. 32 layers and the MoE widths need the whole suite (about 9 minutes):
#   bash benchmarks/gpu_run.sh --suite issue21
set -u
cd "$(dirname "$0")/.."
BENCH_TIME_BUDGET="${BENCH_TIME_BUDGET:-215}" exec bash benchmarks/gpu_run.sh \
  --suite issue21 --rows 8L,startup --suite-layers 8,32 "$@"
