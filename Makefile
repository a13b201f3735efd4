# kolors-job — the README's commands. Everything installs itself into .venv from the pinned lock.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install demo test test-slow lint run bench-cpu lock schema clean

help:
	@echo "make demo      the whole job on CPU with a tiny random Kolors (seconds)"
	@echo "make test      the test suite (installs the pinned set into $(VENV) first)"
	@echo "make lint      ruff + hadolint"
	@echo "make run       build the image and run a manifest on the local GPU (MANIFEST=path or MANIFEST_URI=uri)"
	@echo "make bench-cpu time the tiny pipeline (regression smoke; GPU numbers: python -m bench.gpu)"

$(STAMP): requirements.lock requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kolors-job demo --output demo-output

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" -p no:cacheprovider --timeout=600 $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow" -p no:cacheprovider --timeout=1800 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check kolors_job tests bench entrypoint.py
	$(VENV)/bin/ruff format --check kolors_job tests bench entrypoint.py || true

schema: $(STAMP)
	@$(VENV)/bin/kolors-job schema

bench-cpu: $(STAMP)
	$(PY) -m bench.cpu

# Re-resolve requirements.lock from pyproject.toml (needs the package indexes pip is configured with).
lock:
	$(PYTHON) -m venv /tmp/kolors-job-lock && /tmp/kolors-job-lock/bin/pip install --quiet --upgrade pip
	/tmp/kolors-job-lock/bin/pip install --dry-run --ignore-installed --report /tmp/kolors-job-lock.json .
	$(PYTHON) scripts/write_lock.py /tmp/kolors-job-lock.json requirements.lock

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache
