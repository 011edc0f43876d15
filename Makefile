# The targets are the commands people type; `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Without a GPU, install PyTorch's CPU build: the default Linux wheel of torch is
# a CUDA build of several GB. The exact local version (+cpu) makes pip fail
# loudly rather than fall back to a CUDA wheel. Where the CPU wheel is not on a
# local find-links path, add PyTorch's CPU index, for example:
#   make install TORCH_CPU_INDEX="--extra-index-url https://download.pytorch.org/whl/cpu"
TORCH_CPU ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?=
PYTEST_ARGS ?=

.PHONY: help install run test test-quick test-without-ray bench chaos fuzz lint clean

help: ## Show this list of targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

install: $(BIN)/.installed ## Create the virtualenv and install runjobs with its test tools.

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing the default (CUDA) builds"; \
	else \
		echo "No GPU found: installing $(TORCH_CPU)"; \
		$(BIN)/pip install --quiet $(TORCH_CPU_INDEX) "$(TORCH_CPU)"; \
	fi
	$(BIN)/pip install --quiet -e '.[dev,onnx,jax,search,mlflow]'
	touch $@

run: install ## Set up, then run the built-in TensorFlow vs PyTorch comparison on an embedded local Ray.
	$(BIN)/runjobs submit

test: install ## Set up, then run the whole test suite (real Ray, TensorFlow and torch on CPU).
	$(BIN)/pytest $(PYTEST_ARGS)

test-quick: install ## Run the quick subset (no end-to-end training through Ray).
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-without-ray: install ## Run the quick subset with Ray made unimportable (a stub that raises ImportError).
	@stub=$$(mktemp -d) && mkdir $$stub/ray && \
	echo 'raise ImportError("Ray is made unimportable for this run")' > $$stub/ray/__init__.py && \
	PYTHONPATH=$$stub $(BIN)/pytest -m "not slow" $(PYTEST_ARGS); code=$$?; rm -rf $$stub; exit $$code

bench: install ## Run the benchmarks and print their tables (see docs/BENCHMARKS.md).
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/bench_submit.py
	$(BIN)/python bench/bench_variants.py
	$(BIN)/python bench/bench_sweep.py
	$(BIN)/python bench/bench_overhead.py
	$(BIN)/python bench/bench_remote.py
	$(BIN)/python bench/bench_search.py

chaos: install ## Run the fault harness: 100 rounds of faults on a two-node local cluster (see docs/RELIABILITY.md).
	$(BIN)/python bench/chaos.py --rounds 100

fuzz: install ## Fuzz flags, spec files and CSVs through --dry-run: 10,000 inputs (see docs/RELIABILITY.md).
	$(BIN)/python bench/fuzz.py --examples 10000

lint: install ## Check style with ruff.
	$(BIN)/ruff check jobs workers tests bench
	$(BIN)/ruff format --check jobs workers tests bench

clean: ## Remove the virtualenv and run outputs.
	rm -rf $(VENV) runs build *.egg-info
