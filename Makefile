# make demo: set up a virtual environment and run the demo.  make test: set up and run the tests.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# tests/test_deploy.py deploys the workflow with it
SNAKEDEPLOY := snakedeploy==0.17.1

.PHONY: setup demo test test-fast test-gpu lint
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-slurm.txt pyproject.toml
	@python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else f"esmshard needs Python 3.11 or newer; python3 here is {sys.version.split()[0]}")'
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps --upgrade --target $(VENV)/slurm-plugins -r requirements-slurm.txt  # apart: see there
	python3 -m venv $(VENV)/snakedeploy  # a command in an environment of its own, as pipx installs one:
	$(VENV)/snakedeploy/bin/pip install -q $(SNAKEDEPLOY)  # it brings pandas (requirements-slurm.txt)
	$(PYTHON) -m pip install -q --no-deps -e .  # from esmshard import ...: see README, From Python
	touch $@

demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" bash demo/run.sh

# One worker per core, whole files per worker (their module fixtures are shared runs), in the
# order tests/conftest.py gives them (not xdist's, which starts the files with most tests), and
# one more worker for the SLURM test alone, which mostly waits (tests/conftest.py). The 20
# slowest tests are listed at the end, to keep an eye on the suite's time. The package is
# byte-compiled first, as a first run would leave it: where PYTHONDONTWRITEBYTECODE is set (CI),
# each of the suite's ~500 Python processes would compile the modules it imports again.
test: setup
	$(PYTHON) -m compileall -q workflow/scripts
	$(PYTHON) -m pytest -n auto --dist loadfile --no-loadscope-reorder --durations=20

# For iterating: everything but the tests that run the real snakemake (marker "workflow").
test-fast: setup
	$(PYTHON) -m compileall -q workflow/scripts
	$(PYTHON) -m pytest -n auto --dist loadfile --durations=10 -m "not workflow"

# The GPU tests (tests/gpu), in one process: a missing GPU is an error. Not set up here, so that a
# GPU machine without network can run them: PYTHON=python3 for its environment (README).
test-gpu:
	ESMSHARD_TEST_DEVICE=$${ESMSHARD_TEST_DEVICE:-cuda} $(PYTHON) -m pytest tests/gpu -p no:xdist

# ruff (configured in pyproject.toml) on the Python code, snakefmt on the rule files, and Snakemake's own lint.
lint: setup
	$(VENV)/bin/ruff check workflow/scripts tests bench
	$(VENV)/bin/ruff format --check workflow/scripts tests bench
	$(VENV)/bin/snakefmt --check workflow
	$(VENV)/bin/snakemake --lint
