# Two set-up commands for a fresh machine (see README): `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned in the same pip call as the project, so pip never resolves an unpinned
# torch (which would pull several GB of CUDA packages). 2.13.0 is the CPU wheel on disk here.
TORCH_PIN ?= torch==2.13.0
# The versions of everything else that CI is known to pass with (pip constraints, torch aside):
# a new upstream release cannot turn `make test` red overnight. `make test-latest` tests the
# newest releases instead; `make lock` refreshes this file from a run of it that passed.
# LOCK= (empty) installs without constraints.
LOCK ?= .ci/constraints.txt
CONSTRAINTS = $(if $(LOCK),-c $(LOCK))
LATEST_VENV ?= .venv-latest
# Triton 3.6 (what the GPU machines run) beside $(VENV), without a second torch: its own
# site-packages hold Triton 3.6 and come first; a .pth file adds $(VENV)'s (torch, numpy).
# tests/kernels/test_kernel_static.py compiles the kernels with it too.
TRITON36_VENV ?= $(VENV)-triton36
TRITON36_PIN ?= triton==3.6.0
SITE_PACKAGES = -c "import sysconfig; print(sysconfig.get_path('purelib'))"

.PHONY: demo test test-fast test-latest lock mutate lint bench docs gpu-check clean

# The build backend comes from the constraints too (no build isolation), so a new setuptools
# cannot break the editable install either.
$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(UPGRADE_FLAGS) $(CONSTRAINTS) --upgrade pip setuptools
	$(PY) -m pip install --quiet $(UPGRADE_FLAGS) $(CONSTRAINTS) --no-build-isolation "$(TORCH_PIN)" -e ".[dev]"
	touch $@

$(TRITON36_VENV)/.installed: $(VENV)/.installed
	test -x $(TRITON36_VENV)/bin/python || $(PY) -m venv $(TRITON36_VENV)
	$(TRITON36_VENV)/bin/python -m pip install --quiet --no-deps "$(TRITON36_PIN)"
	$(PY) $(SITE_PACKAGES) > "$$($(TRITON36_VENV)/bin/python $(SITE_PACKAGES))/gradscope-main-venv.pth"
	$(TRITON36_VENV)/bin/python -c "import torch, triton; assert triton.__version__.startswith('3.6.'), triton.__version__"
	touch $@

# Trains the built-in model healthy, then with a NaN fault: health reports on the terminal,
# run logs and visual reports (HTML + PNG) under runs/.
demo: $(VENV)/.installed
	$(VENV)/bin/gradscope demo --fault none
	$(VENV)/bin/gradscope demo --fault nan

# Every test, on every core (pytest-xdist; the distributed tests, which spawn ranks, one at a
# time). PYTEST_ARGS adds options, e.g. PYTEST_ARGS="-n 0" for one process.
PYTEST_ARGS ?=
test: $(VENV)/.installed $(TRITON36_VENV)/.installed
	$(PY) -m ruff check .
	$(VENV)/bin/pytest -n auto --dist loadgroup $(PYTEST_ARGS)

# The quick loop while developing: no distributed, Triton-interpreter, integration or slow
# tests (tests/tiers.py), a fifth of the hypothesis examples.
test-fast: $(VENV)/.installed
	HYPOTHESIS_PROFILE=fast $(VENV)/bin/pytest -n auto -m "not distributed and not interpreter and not integration and not slow" $(PYTEST_ARGS)

# Every test against the newest release of every dependency (torch still pinned), in its own
# venv: a failure here and not in `make test` is an upstream release that breaks us.
test-latest:
	rm -f $(LATEST_VENV)/.installed
	$(MAKE) test VENV=$(LATEST_VENV) LOCK= UPGRADE_FLAGS="--upgrade --upgrade-strategy eager"

# Refresh the constraints from the newest releases, once every test passes with them.
lock: test-latest
	{ echo "# Versions \`make test\` installs (pip constraints). Refreshed by \`make lock\` on $$(date -u +%F)"; \
	  echo "# after every test passed with them; Python $$($(LATEST_VENV)/bin/python -c 'import platform; print(platform.python_version(), platform.machine())'). torch is pinned apart (TORCH_PIN)."; \
	  $(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v -i -E '^(torch|gradscope-diagnostics)( |=|@)'; \
	} > $(LOCK).new
	mv $(LOCK).new $(LOCK)

# Mutation testing of the failure-path and lifetime code ([tool.mutmut] in pyproject.toml); about
# an hour on 2 cores. `mutmut results` lists the survivors, `mutmut show NAME` shows one.
mutate: $(VENV)/.installed
	$(VENV)/bin/mutmut run
	$(VENV)/bin/mutmut results

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(VENV)/.installed
	$(VENV)/bin/gradscope bench

# The docs site (mkdocs.yml, docs/) into site/, warnings as errors; tests/test_docs_site.py builds it in `make test`.
docs: $(VENV)/.installed
	$(VENV)/bin/mkdocs build --strict

# On a machine with an NVIDIA GPU, as it is (its python3 with torch and Triton, no venv, no
# network): the CUDA tests and GPU benchmarks, results JSON under benchmarks/results/.
# GPU_CHECK_ARGS=--quick for the 3-minute version, --dry-run to list the steps.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	@# Installed, not just importable from the root (sys.path[0]): the benchmark scripts run from benchmarks/.
	$(GPU_PYTHON) -c "import sys; sys.path.pop(0); import gradscope.kernels" 2>/dev/null || \
		$(GPU_PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(VENV)-triton36 $(LATEST_VENV)-triton36 build dist *.egg-info .pytest_cache .ruff_cache .hypothesis runs mutants site
