# Two entry points: `make run` (the whole pipeline, smoke preset, embedded corpus) and `make test`.
# TORCH_SPEC, when set, is passed to `pip install` before the project, so that a machine without a GPU
# can pick a CPU build of torch (e.g. TORCH_SPEC=torch==2.13.0, or
# TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"); left empty, pip resolves torch
# from pyproject.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?=
PRESET ?= smoke
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: run test lint bench install clean-runs serve down

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install --quiet $(TORCH_SPEC); fi
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

run: install
	$(PY) -m flows.pipeline --preset $(PRESET)

# One pytest worker per core, a test file per worker at a time (its module fixtures run once); -n 0 runs
# in this process.
test: install
	$(PY) -m pytest -q -n auto --dist loadfile

# ruff, configured in pyproject.toml: lint and formatting, checked (CI runs this before the tests).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Prefect server, MLflow server, process pool + worker and every deployment, on 127.0.0.1; Ctrl-C stops them.
serve: install
	$(PY) deployments/serve.py up --prefect-port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT)

down:
	$(PY) deployments/serve.py down

# Side-by-side comparisons (printed, logged to the `benchmarks` MLflow experiment); BENCH_FLAGS=--quick for a short run.
bench: install
	$(PY) -m benchmarks $(BENCH_FLAGS)

clean-runs:
	rm -rf runs
