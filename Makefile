# prestage: `make demo` runs every stage on a tiny model built here (no network);
# `make test` runs the tests. Both create .venv and install what they need (CPU torch first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup registry test demo lint bench clean

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
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python -m tests.support.demo

lint: setup
	$(BIN)/ruff check prestage stages runner tests bench
	$(BIN)/ruff format --check prestage stages runner tests bench

bench: setup
	$(BIN)/python -m bench.run_all

clean:
	rm -rf .demo artifacts/*/ bench/out
