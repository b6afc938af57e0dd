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

.PHONY: install test test-fast test-latest lock demo bench bench-data clean

# The CPU venv's torch: an exact pin, as any other spec pulls several GB of CUDA wheels here.
TORCH_CPU := torch==2.13.0
# What `make install` installs: the library with the test and Hugging Face extras.
EXTRAS := dev,hf

install: $(VENV)/.installed

# Locked: every package (transitive ones included) at the version the suite passed with
# (constraints.txt, written by `make lock`). Constraints, not requirements: a package the lock does
# not name (a CUDA torch's nvidia-* wheels on a GPU machine) still installs, at whatever pip picks.
$(VENV)/.installed: setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt --upgrade pip
	$(BIN)/pip install -q -c constraints.txt $(TORCH_CPU)
	$(BIN)/pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

# Drift check, not part of CI: a separate venv with the newest versions setup.py's ranges allow
# (no constraints; torch stays at the CPU pin, the only torch this machine can install without GBs
# of CUDA wheels), the whole suite there, then the packages whose version differs from the lock.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q $(TORCH_CPU)
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[$(EXTRAS)]'
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider --durations=10 tests; status=$$?; \
	  $(LATEST)/bin/python -m megareweight.lockfile diff constraints.txt; exit $$status

# Refresh the lock: the drift check above, and only if its suite passes, its versions become
# constraints.txt (review `git diff constraints.txt`, then commit it with any setup.py change).
lock: test-latest
	$(LATEST)/bin/python -m megareweight.lockfile freeze --out constraints.txt

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=10 tests

demo: install
	$(BIN)/megareweight demo --corpus $(CORPUS) --out runs/demo

bench: install
	TRITON_INTERPRET=1 $(BIN)/python -m megareweight.kernels.bench --out kernels/results/cpu

bench-data: install
	$(BIN)/python -m megareweight.data.bench --out experiments/data/bench_cpu.json --prepare-corpus $(CORPUS)

clean:
	rm -rf runs .cache .pytest_cache $(LATEST)
