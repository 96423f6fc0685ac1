#!/usr/bin/env bash
# A refactor's check on the GPU box (device tool), from the repository root:
#   bash tools/gpu_check.sh BASE_TREE [STORIES_DIR]
# 1. the Triton kernel and hidden-store tests on CUDA (TRITON_INTERPRET=0);
# 2. the exports of this tree and of BASE_TREE (an older checkout carried beside it, e.g.
#    .dev/base) on the GPU, hashed by tools/export_hashes_cli.py --device cuda: the same JSON
#    means byte-identical GPU exports;
# 3. the speed bench's own 8-layer rows and start-up probe (no peer), for the per-layer times.
# Results (a few files, at most 8 come back) go to $OUT or /tmp/gpu_check.
set -u
cd "$(dirname "$0")/.."
. benchmarks/gpu_env.sh
base="$1"; stories="${2:-/nonexistent}"
out="${OUT:-/tmp/gpu_check}"; mkdir -p "$out"
python -m pytest --version >/dev/null 2>&1 || pip install -q --no-index .dev/pyt/*.whl
cases="rtn/awq,awq/awq,gptq/gptq,gptq/compressed-tensors,awq-gptq/awq"
for p in kernels calibration measurements; do [ -e "$base/quantizer/$p" ] || ln -sfn "../$p" "$base/quantizer/$p"; done
python tools/export_hashes_cli.py --repo . --device cuda --only "$cases" --stories "$stories" \
  --out "$out/hashes_tree.json" > "$out/hashes_tree.log" 2>&1 &
python tools/export_hashes_cli.py --repo "$base" --device cuda --only "$cases" --stories "$stories" \
  --out "$out/hashes_base.json" > "$out/hashes_base.log" 2>&1 &
TRITON_INTERPRET=0 timeout 240 python -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py \
  tests/test_kernels_dispatch.py tests/test_hidden_store.py tests/test_warmup.py 2>&1 | tail -5 \
  | tee "$out/gpu_tests.txt"
wait
python - "$out" <<'PY'
import json, sys
a = json.load(open(sys.argv[1] + "/hashes_tree.json")); b = json.load(open(sys.argv[1] + "/hashes_base.json"))
same = [k for k in a if b.get(k) == a[k]]
print(f"GPU exports: {len(same)} of {len(a)} runs identical to the base tree;",
      "differ:", [k for k in a if b.get(k) != a[k]])
PY
BENCH_TIME_BUDGET="${BENCH_TIME_BUDGET:-150}" BENCH_SCRATCH=/tmp/gpu_check_bench OUT="$out" \
  bash benchmarks/gpu_run.sh --suite issue21 --rows 8L,startup --suite-layers 8,32 2>&1 | tail -32 \
  > "$out/speed_tail.txt"
cat "$out/speed_tail.txt"
