# `make demo` and `make test` create .venv on first use and install everything.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_TRAIN_ENABLE_PRINT_PATCH := 0

.PHONY: demo test test-fast bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) pipelines/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=15

# Everything that needs no Ray cluster or server: the inner loop while editing the core.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" --durations=10

bench: $(VENV)/.installed
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/metrics.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs demo_data mlflow.db mlartifacts .pytest_cache
