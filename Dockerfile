# kolors-job: job manifest -> Kolors LoRA + 8-frame story + aesthetic scores + report, on any CUDA GPU.
#
#   docker build -t kolors-job .
#   docker run --gpus all -v kolors-cache:/cache -e KOLORS_JOB_MANIFEST_URI=s3://bkt/m.yaml kolors-job
#
# Plain Dockerfile syntax (no `# syntax=` line, no `RUN --mount`): it builds with BuildKit/buildx and with
# the legacy builder alike, and needs no registry pull beyond its base image.
#
# Base image: plain Debian Python, not nvidia/cuda. torch 2.14.1's PyPI wheel brings the CUDA 13.0
# user-space libraries as pip wheels (cuda-toolkit 13.0.3: cudart, cuBLAS, cuFFT, NVRTC...; cuDNN 9.24,
# NCCL 2.30, cuSPARSELt, NVSHMEM) and Triton brings ptxas, so a CUDA base image would only add a second,
# unused CUDA copy (~3 GB) that can disagree with torch's. The one thing the host provides is the driver
# (libcuda.so + nvidia-smi), mounted by the NVIDIA container toolkit / the k8s device plugin; it must be
# >= 580 for CUDA 13.0. Python 3.11 matches requirements.lock (and diffsynth 1.1.9's tested range).
# BASE_IMAGE: any Debian bookworm with python3 + python3-venv (e.g. one made with debootstrap and
# `docker import` where no registry is reachable); the packages go into a venv, never the system Python.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
FROM ${BASE_IMAGE}

# tini: PID 1 that forwards SIGTERM (the job checkpoints on it) and reaps orphans of compile workers.
# gcc + libc6-dev: Triton compiles a small C launcher at run time (torch.compile); without a C compiler
# `compile: true` fails. libc6-dev is unpinned on purpose: it must equal the base image's libc6, which
# Debian security updates move.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 gcc=4:12.2.0-3 libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 1000 kolors \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/kolors --shell /usr/sbin/nologin kolors \
    && mkdir -p /cache \
    && chown kolors:kolors /cache

# Every download and compile cache lives on the /cache volume, so a second job on the same volume
# skips the model download (GBs) and the torch.compile warm-up (minutes).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    KOLORS_JOB_CACHE_DIR=/cache \
    HF_HOME=/cache/huggingface \
    MODELSCOPE_CACHE=/cache/modelscope \
    TORCH_HOME=/cache/torch \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_CACHE_DIR=/cache/triton \
    XDG_CACHE_HOME=/cache/xdg \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /app

# 1. The pinned dependency set (the same file `make test` installs): the big, rarely changing layer.
#    A venv on PATH: Debian's own python3 refuses pip installs into the system (PEP 668).
COPY requirements.lock ./
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir -r requirements.lock

# 2. The package itself, without dependencies (all pinned above); setuptools comes from the lock.
COPY pyproject.toml README.md /tmp/src/
COPY kolors_job /tmp/src/kolors_job
RUN pip install --no-cache-dir --no-deps --no-build-isolation /tmp/src \
    && rm -rf /tmp/src

# 3. The entry script (`python -m kolors_job` works too).
COPY entrypoint.py ./

USER 1000:1000
# The user's own home: `docker run IMAGE demo` writes ./demo-output here (/app belongs to root).
WORKDIR /home/kolors
VOLUME ["/cache"]

ENTRYPOINT ["tini", "--", "python", "/app/entrypoint.py"]
CMD ["run"]
