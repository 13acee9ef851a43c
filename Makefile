# `make demo` and `make test` create .venv on first use and install everything.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_TRAIN_ENABLE_PRINT_PATCH := 0

.PHONY: demo test test-fast bench lint clean

# A connection dropped mid-download (it happens with the large wheels) resumes; a failed install is retried whole.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --retries 10 --timeout 60 --upgrade pip
	for attempt in 1 2 3; do \
	  $(PY) -m pip install --quiet --retries 10 --timeout 60 --resume-retries 20 -e '.[test]' && break; \
	  if [ $$attempt = 3 ]; then exit 1; fi; \
	  echo "pip install failed (attempt $$attempt of 3); retrying in 20 s"; sleep 20; \
	done
	touch $@

demo: $(VENV)/.installed
	$(PY) pipelines/demo.py

# Two pytest-xdist workers: the modules on the session's Ray cluster on one, the others beside them
# (tests/conftest.py groups them). `-p no:xdist` runs everything in one process, in file order.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

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
