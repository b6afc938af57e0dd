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

.PHONY: install test test-fast test-latest test-oldest lock demo bench bench-data gpu-bundle gpu-plan clean

# The CPU venv's torch: an exact pin, as any other spec pulls several GB of CUDA wheels here.
TORCH_CPU := torch==2.13.0
# What `make install` installs: the library with the test and Hugging Face extras; the lock also
# covers the benchmark peers (liger-kernel, cut-cross-entropy) that `make bench` adds.
EXTRAS := dev,hf
LOCK_EXTRAS := dev,hf,bench

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
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager $(TORCH_CPU) -e '.[$(LOCK_EXTRAS)]'
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider --durations=10 tests; status=$$?; \
	  $(LATEST)/bin/python -m megareweight.lockfile diff constraints.txt; exit $$status

# Refresh the lock: the drift check above, and only if its suite passes, its versions become
# constraints.txt (review `git diff constraints.txt`, then commit it with any setup.py change).
lock: test-latest
	$(LATEST)/bin/python -m megareweight.lockfile freeze --out constraints.txt

# The oldest torch and Triton setup.py declares (what preinstalled CUDA nodes and NGC containers
# were seen to carry): the loss-kernel tests, Triton under its interpreter, in a venv of their own.
# torch 2.11 comes from PyPI as its CUDA build (about 3 GB with its nvidia-* wheels) and runs on the
# CPU. numpy < 2.4: Triton 3.6's interpreter turns scalar arguments into 1-element arrays and
# calls int() on them, which numpy 2.4 refuses (the compiled GPU path does not use the interpreter).
# Not the lock: its pins of torch's own requirements conflict with torch 2.11's; the rest is the
# newest that setup.py's ranges allow beside it.
OLDEST := .venv-oldest
OLDEST_PINS := torch==2.11.0 triton==3.6.0 'numpy<2.4'
test-oldest:
	rm -rf $(OLDEST)
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q --upgrade pip
	$(OLDEST)/bin/pip install -q $(OLDEST_PINS)
	$(OLDEST)/bin/pip install -q $(OLDEST_PINS) -e '.[dev]'
	$(OLDEST)/bin/python -c "import torch, triton; print('test-oldest: torch', torch.__version__, 'triton', triton.__version__)"
	TRITON_INTERPRET=1 $(OLDEST)/bin/python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_packing.py

# For one GPU window on a node without a package index (launch/gpu_check.sh): wheels for Python
# 3.12 of what such a node lacks, and a prepared 32k-vocabulary corpus, in .gpu_bundle/ (ignored
# by git; the device tool carries it). See launch/gpu_check.sh.
GPU_BUNDLE := .gpu_bundle
gpu-bundle: install
	$(BIN)/python -m megareweight.gpu_bundle --out $(GPU_BUNDLE) --corpus $(CORPUS)

gpu-plan:
	launch/gpu_check.sh --plan

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=10 tests

demo: install
	$(BIN)/megareweight demo --corpus $(CORPUS) --out runs/demo

# The peers need the bench extras (locked too). No TRITON_INTERPRET here: the bench sets it itself
# on a machine without CUDA, and on a GPU the Triton kernels must be compiled, not interpreted.
bench: install
	$(BIN)/pip install -q -c constraints.txt -e '.[$(LOCK_EXTRAS)]'
	$(BIN)/python -m megareweight.kernels.bench

bench-data: install
	$(BIN)/python -m megareweight.data.bench --out experiments/data/bench_cpu.json --prepare-corpus $(CORPUS)

clean:
	rm -rf runs .cache .pytest_cache $(LATEST) $(OLDEST) $(GPU_BUNDLE)
