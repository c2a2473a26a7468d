# Two set-up commands for a fresh machine (see README): `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned in the same pip call as the project, so pip never resolves an unpinned
# torch (which would pull several GB of CUDA packages). 2.13.0 is the CPU wheel on disk here.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test lint bench gpu-check clean

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

# On a machine with an NVIDIA GPU, as it is (its python3 with torch and Triton, no venv, no
# network): the CUDA tests and GPU benchmarks, results JSON under benchmarks/results/.
# GPU_CHECK_ARGS=--quick for the 3-minute version, --dry-run to list the steps.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PYTHON) -c "import gradscope.kernels" 2>/dev/null || \
		$(GPU_PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis runs
