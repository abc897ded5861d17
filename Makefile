# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Everything here runs on local files; hub names work when these are unset and a network is there.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

# Where to take torch from: the indexes pip is set up with, unless TORCH_INDEX_URL names one (on a machine without
# an NVIDIA GPU, the CPU wheel index from PyTorch's install page avoids PyPI's multi-GB CUDA build).
TORCH_INDEX_URL ?=
TORCH_SOURCE := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL),)

.PHONY: setup demo test test-ipu-stack
setup: $(VENV)/.installed

# torch is pinned and installed first so that nothing pulls an unpinned (multi-GB) build.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 $(TORCH_SOURCE)
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

demo: setup
	PYTHON=$(BIN)/python ./demo.sh

# Tiny training steps on a few busy cores are far faster single-threaded.
test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q tests

# The Poplar SDK's stack (requirements-ipu.txt: PopTorch's torch 2.0.1 and the libraries that work with it), without
# the SDK: the IPU backend against the strict PopTorch stand-in, the IPU checks, and each script end to end on the
# CPU. torch 2.0.1 from the configured index brings its CUDA runtime wheels, which load without a GPU.
IPU_VENV := .venv-ipu
IPU_PYTHON ?= $(PYTHON)
IPU_STACK_TESTS := tests/test_poptorch_backend.py tests/test_poptorch_double.py tests/test_poptorch_serialization.py tests/test_popdist.py \
	tests/test_ipu_checks.py tests/test_config.py tests/test_readme_offline_runs.py

$(IPU_VENV)/.installed: requirements-ipu.txt
	@$(IPU_PYTHON) -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 11))' || { \
	  echo "make test-ipu-stack: torch 2.0.1 needs Python 3.10 or 3.11: pass IPU_PYTHON=python3.10 (or 3.11)"; exit 2; }
	$(IPU_PYTHON) -m venv $(IPU_VENV)
	$(IPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(IPU_VENV)/bin/python -m pip install -q torch==2.0.1
	$(IPU_VENV)/bin/python -m pip install -q -r requirements-ipu.txt
	touch $@

test-ipu-stack: $(IPU_VENV)/.installed
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(IPU_VENV)/bin/python -m pytest -q $(IPU_STACK_TESTS)
