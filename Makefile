# Two commands for a newcomer: `make test` and `make run`. Everything else is optional.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed on its own first so pip takes these builds (local copies on our CI machines).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# CPU wheels (no CUDA libraries: a venv GBs smaller) where PyTorch's index answers, else PyPI's
# default build. TORCH_INDEX=pypi or TORCH_INDEX=<url> skips the probe.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= auto
PYTEST_ARGS ?=

.PHONY: install install-runtime test test-faults test-fast run demo lint fmt bench services system-deps migrate clean help compose-smoke

help:
	@echo "make install  - create $(VENV) and install the package with dev extras (tests, lint)"
	@echo "make install-runtime - only what serving needs (what make run and make demo install)"
	@echo "make test     - install if needed, start PostgreSQL/Redis if down, run all tests"
	@echo "make test-faults - only the fault-injection suite (also part of make test)"
	@echo "make run      - start the service (embedded mode: SQLite, local data, in-process jobs)"
	@echo "make demo     - offline end-to-end demo through the HTTP API on the demo model"
	@echo "make lint     - ruff + mypy (strict) + import-linter (layer rules)"
	@echo "make bench    - run the benchmarks in bench/ (writes bench/results/*.json)"
	@echo "make compose-smoke - build and run the Docker stack for real (needs a Docker engine; slow)"

# Two installs: what serving needs (`make run`, `make demo`: the package and its runtime
# dependencies) and, on top, the dev and test tools (`make install`, `make test`, `make lint`).
install: $(VENV)/.installed
install-runtime: $(VENV)/.runtime

$(VENV)/.runtime: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@idx='$(TORCH_INDEX)'; \
	if [ "$$idx" = auto ]; then \
	  if $(PY) -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=10)" \
	      '$(TORCH_CPU_INDEX)' 2>/dev/null; then idx='$(TORCH_CPU_INDEX)'; else idx=pypi; fi; \
	fi; \
	if [ "$$idx" = pypi ]; then \
	  echo "torch: CPU-only wheels cannot be had here ($(TORCH_CPU_INDEX) did not answer); PyPI's default build, with CUDA libraries (several GB)"; \
	  $(PY) -m pip install -q $(TORCH_SPEC); \
	else \
	  echo "torch: CPU wheels from $$idx"; \
	  $(PY) -m pip install -q --index-url "$$idx" $(TORCH_SPEC); \
	fi
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.runtime
	$(PY) -m pip install -q -e '.[dev,onnx]'
	touch $@

services:
	@scripts/ensure-services.sh

# Tools the tests call that come from the OS: docker-compose v1 validates the compose files.
system-deps:
	@scripts/ensure-system-deps.sh

test: install services system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# Real dependencies broken on purpose: a private Redis stopped and frozen, workers killed.
test-faults: install services
	$(PY) -m pytest tests/faults $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow and not postgres and not redis" $(PYTEST_ARGS)

run: install-runtime
	$(VENV)/bin/polar serve

demo: install-runtime
	$(PY) -m app.demo.run_demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

fmt: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	@set -e; for b in bench/*.py; do echo "== $$b"; $(PY) $$b; done

migrate: install
	$(VENV)/bin/alembic upgrade head

# The Docker stack, built and run for real (scripts/compose_smoke.py); not part of `make test`.
compose-smoke: install
	$(PY) scripts/compose_smoke.py $(SMOKE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
