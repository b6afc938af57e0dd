# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Offline wandb, a project-local cache for DeepSpeed's JIT-compiled ops, and DeepSpeed's CPU
# accelerator: set for every target so that tests and demos never touch the network or $HOME.
export WANDB_MODE ?= offline
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM := false

# The demo reuses a prepared corpus when one sits beside the checkout, else builds its own.
CORPUS ?= $(firstword $(wildcard ../shared/corpus) data/corpus)

.PHONY: install test test-fast demo bench bench-data clean

install: $(VENV)/.installed

# torch first and exactly pinned: any other spec pulls several GB of CUDA wheels.
$(VENV)/.installed: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,hf]'
	touch $@

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=10 tests

demo: install
	$(BIN)/megareweight demo --corpus $(CORPUS) --out runs/demo

bench: install
	TRITON_INTERPRET=1 $(BIN)/python -m megareweight.kernels.bench --out kernels/results/cpu

bench-data: install
	$(BIN)/python -m megareweight.data.bench --out experiments/data/bench_cpu.json --prepare-corpus $(CORPUS)

clean:
	rm -rf runs .cache .pytest_cache
