# `make demo` and `make test` work on a fresh clone: they create .venv and install the project first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean bench bench-full bench-gpu

EXAMPLE := examples/plugin-example

# The example plugin package is installed too: tests/test_plugin_example.py runs a study with it.
$(STAMP): pyproject.toml $(EXAMPLE)/pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet -e $(EXAMPLE)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/transferlab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf transferlab-runs transferlab.db transferlab.db-wal transferlab.db-shm quickstart.png .pytest_cache

# Benchmarks (benchmarks/README.md): each prints its ratio against a baseline run in the same process
# and writes a JSON record under benchmarks/results/. `bench` runs the quick variants (minutes on 2
# CPUs); `bench-full` the full sizes (the whole yosinski-digits study, naive and through Ray: longer).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.trainer_throughput --quick
	$(BIN)/python -m benchmarks.feature_cache_effect --quick
	$(BIN)/python -m benchmarks.store_queries --quick
	$(BIN)/python -m benchmarks.study_walltime --quick

bench-full: $(STAMP)
	$(BIN)/python -m benchmarks.trainer_throughput
	$(BIN)/python -m benchmarks.feature_cache_effect
	$(BIN)/python -m benchmarks.store_queries
	$(BIN)/python -m benchmarks.study_walltime

# The GPU check (benchmarks/gpu_check.py): CUDA checks, throughput, an ablation, a fractional-GPU study.
bench-gpu: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check
