# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Everything here runs on local files; hub names work when these are unset and a network is there.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

# Without an NVIDIA GPU, the CPU build of torch: PyPI's Linux wheel carries the CUDA libraries (several GB).
TORCH_SOURCE := $(if $(shell command -v nvidia-smi 2>/dev/null),,--retries 1 \
	--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)

.PHONY: setup demo test
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
