# kolors-job — the README's commands. Everything installs itself into .venv from the pinned lock.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
IMAGE ?= kolors-job:dev
CACHE ?= $(HOME)/.cache/kolors-job
GPUS ?= 1
# SIGTERM (docker stop, Ctrl-C) -> checkpoint -> exit 75 must fit in here; torchrun gets it less a margin
GRACE ?= 120
SHUTDOWN_TIMEOUT = $(shell echo $$(( $(GRACE) - ($(GRACE) / 4 < 10 ? $(GRACE) / 4 : 10) )))
# GPUS>1: the same job as PyTorch DDP, one rank per GPU, through torchrun (kolors_job.launch.torchrun keeps exit codes)
RUN_IN_IMAGE = $(if $(filter-out 1,$(GPUS)),--entrypoint tini $(IMAGE) -- python -m kolors_job.launch.torchrun --shutdown-timeout=$(SHUTDOWN_TIMEOUT) --standalone --nproc-per-node=$(GPUS) -m kolors_job run,$(IMAGE) run)
# OUTPUT: a URI is passed as is; a local directory is mounted at /runs. Unset: the manifest's spec.output.uri.
OUTPUT_IS_DIR = $(if $(OUTPUT),$(if $(findstring ://,$(OUTPUT)),,yes))
# Host credential profiles, read-only, where the SDKs look for them (HOME=/tmp in the container).
PROFILES = $(foreach d,.aws .aliyun,$(if $(wildcard $(HOME)/$(d)),-v $(HOME)/$(d):/tmp/$(d):ro))
PYTEST_ARGS ?=

.PHONY: help install demo test test-slow lint run image k8s-examples bench-cpu lock schema clean

help:
	@echo "make demo      the whole job on CPU with a tiny random Kolors (about a minute on 2 cores)"
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
	$(VENV)/bin/ruff check kolors_job tests bench scripts entrypoint.py
	$(VENV)/bin/hadolint Dockerfile

schema: $(STAMP)
	@$(VENV)/bin/kolors-job schema

# BASE_IMAGE=...: another Debian bookworm with python3 + python3-venv (the Dockerfile's build argument).
# Plain Dockerfile syntax: BuildKit/buildx and the legacy builder both build it.
image:
	@command -v docker >/dev/null || { echo "error: docker is not installed (https://docs.docker.com/engine/install/)"; exit 2; }
	@docker info >/dev/null 2>&1 || { echo "error: no Docker engine is running (start dockerd, or use k8s/ or pai/)"; exit 2; }
	docker build $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) -t $(IMAGE) .

# make run MANIFEST=job.yaml | MANIFEST_URI=s3://b/m.yaml [OUTPUT=s3://...|./runs] [GPUS=8]
# Outputs go where the manifest's spec.output.uri says unless OUTPUT is given (a local OUTPUT is mounted).
run: image
	@test -n "$(MANIFEST)$(MANIFEST_URI)" || { echo "usage: make run MANIFEST=path | MANIFEST_URI=uri [OUTPUT=uri|dir]"; exit 2; }
	@docker info --format '{{json .Runtimes}}' | grep -q nvidia || { echo "error: the NVIDIA container runtime is missing (install nvidia-container-toolkit)"; exit 2; }
	mkdir -p $(CACHE) $(if $(OUTPUT_IS_DIR),$(OUTPUT))
	docker run --rm --gpus all --shm-size 16g --stop-timeout $(GRACE) --user $$(id -u):$$(id -g) -e HOME=/tmp \
	  -e KOLORS_JOB_GRACE_SECONDS=$(GRACE) -v $(CACHE):/cache $(PROFILES) \
	  $(if $(OUTPUT_IS_DIR),-v $(abspath $(OUTPUT)):/runs) \
	  $(if $(MANIFEST),-v $(abspath $(MANIFEST)):/job/manifest.yaml:ro -e KOLORS_JOB_MANIFEST_URI=/job/manifest.yaml,-e KOLORS_JOB_MANIFEST_URI=$(MANIFEST_URI)) \
	  -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e AWS_SESSION_TOKEN -e AWS_REGION -e AWS_PROFILE \
	  -e OSS_ACCESS_KEY_ID -e OSS_ACCESS_KEY_SECRET -e OSS_SESSION_TOKEN \
	  -e ALIBABA_CLOUD_ACCESS_KEY_ID -e ALIBABA_CLOUD_ACCESS_KEY_SECRET -e ALIBABA_CLOUD_SECURITY_TOKEN \
	  -e ALIBABACLOUD_ACCESS_KEY_ID -e ALIBABACLOUD_ACCESS_KEY_SECRET -e ALIBABACLOUD_SECURITY_TOKEN \
	  -e ALIBABA_CLOUD_PROFILE -e ALIBABA_CLOUD_REGION_ID \
	  -e KOLORS_JOB_S3_ENDPOINT_URL -e KOLORS_JOB_OSS_ENDPOINT \
	  $(RUN_IN_IMAGE) $(if $(OUTPUT),--output $(if $(OUTPUT_IS_DIR),/runs,$(OUTPUT)))

k8s-examples: $(STAMP)
	$(VENV)/bin/kolors-job render k8s --write-examples k8s/

bench-cpu: $(STAMP)
	$(PY) -m bench.cpu

# Re-resolve requirements.lock from pyproject.toml (needs the package indexes pip is configured with).
lock:
	$(PYTHON) -m venv /tmp/kolors-job-lock && /tmp/kolors-job-lock/bin/pip install --quiet --upgrade pip
	/tmp/kolors-job-lock/bin/pip install --dry-run --ignore-installed --report /tmp/kolors-job-lock.json .
	$(PYTHON) scripts/write_lock.py /tmp/kolors-job-lock.json requirements.lock

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache
