#!/usr/bin/env bash
# The one prepared command for a lent GPU (bench/README.md has the exact `run` call):
#   run(command="bash bench/run_on_gpu.sh", carry=[".cache/gpu-wheels"], timeout_s=540)
#
# Why: the device image (Python 3.12, torch 2.11+cu130) ships transformers 5.x / huggingface_hub 1.x (diffsynth
# 1.1.9 does not import under them) and no pydantic, and it reaches no registry. So the pinned wheels that
# bench/fetch_wheels.sh downloaded here travel in `carry`, are installed into a --target dir that PYTHONPATH puts
# in front of the image's site-packages (the image's torch stays), their versions are checked, and only then
# does the benchmark start, under a timeout that leaves the lease time to fetch $OUT. Extra arguments go to
# bench.gpu, e.g. `bash bench/run_on_gpu.sh --only job_story_compile`.
#
# $OUT receives bench.json (rewritten after every measurement), bench.md (the table), bench.log, nvidia-smi.csv.
set -uo pipefail
cd "$(dirname "$0")/.."
# Not HF_HUB_OFFLINE=1: diffusers then refuses load_lora_weights(dir) without a weight_name (generate.py).
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-$PWD/bench/out}
PY=${PYTHON:-python3}
WHEELS=${BENCH_WHEELS:-.cache/gpu-wheels}
SITE=${BENCH_SITE:-/tmp/kolors-bench-site}
LIMIT=${BENCH_TIMEOUT_S:-450}
mkdir -p "$OUT"
say() { echo "[run_on_gpu $(date +%T)] $*"; }

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if ((${#wheels[@]} == 0)); then
  say "no wheels in $WHEELS: run 'bash bench/fetch_wheels.sh' before the call and carry .cache/gpu-wheels"
  exit 3
fi
say "installing ${#wheels[@]} carried wheels into $SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
  || { say "pip install of the carried wheels failed"; exit 3; }
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm --format=csv \
  >"$OUT/nvidia-smi.csv" 2>&1 || true
cat "$OUT/nvidia-smi.csv"

# Every carried wheel must be the version Python now sees, and the stack must import: fail in seconds, not minutes.
"$PY" - "${wheels[@]}" <<'EOF' || { say "version/import check failed"; exit 4; }
import importlib.metadata as md
import pathlib
import sys

bad = []
for whl in sys.argv[1:]:
    name, version = pathlib.Path(whl).name.split("-")[:2]
    try:
        seen = md.version(name)
    except md.PackageNotFoundError:
        seen = None
    if seen != version:
        bad.append(f"{name}: carried {version}, python sees {seen}")
import torch  # noqa: E402
import diffusers, peft, pydantic, pydantic_settings, transformers  # noqa: E401,E402,F401
# The job modules the benchmark drives: a new top-level import of a package the image lacks shows up here
# (add its wheel to bench/fetch_wheels.sh's carry list), not as 20 failed measurements.
import kolors_job.data.scan, kolors_job.render.pipeline, kolors_job.models.loading, kolors_job.models.tiny, kolors_job.train.loop  # noqa: E401,E402,F401
import bench.gpu  # noqa: E402,F401
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available(),
      "| transformers", transformers.__version__, "diffusers", diffusers.__version__, "peft", peft.__version__)
if bad:
    sys.exit("version mismatch: " + "; ".join(bad))
EOF

say "python -m bench.gpu --quick $* (limit ${LIMIT}s)"
timeout --signal=INT --kill-after=30 "$LIMIT" "$PY" -m bench.gpu --quick --out "$OUT/bench.json" "$@" 2>&1 \
  | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
if ((rc == 124)); then
  # Not 124: the device tool reads 124 as its own time-out. Every finished measurement is in $OUT already.
  say "bench.gpu reached its ${LIMIT}s limit and was stopped (results so far are in \$OUT)"
  rc=75
fi
say "bench.gpu exited $rc"
# bench.gpu prints the table last; if it was killed before that, print what it had written.
if ((rc != 0)) && [[ -f $OUT/bench.md ]]; then cat "$OUT/bench.md"; fi
exit "$rc"
