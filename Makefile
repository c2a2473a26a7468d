# Two set-up commands for a fresh machine (see README): `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned in the same pip call as the project, so pip never resolves an unpinned
# torch (which would pull several GB of CUDA packages). 2.13.0 is the CPU wheel on disk here.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)" -e ".[dev]"
	touch $@

# Trains the built-in model healthy, then with a NaN fault: health reports on the terminal,
# run logs and visual reports (HTML + PNG) under runs/.
demo: $(VENV)/.installed
	$(VENV)/bin/gradscope demo --fault none
	$(VENV)/bin/gradscope demo --fault nan

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(VENV)/bin/pytest

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(VENV)/.installed
	$(VENV)/bin/gradscope bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis runs
