#!/usr/bin/env bash
# Download the pinned wheels a lent GPU machine lacks, for `bash bench/run_on_gpu.sh` to install there.
#
# Why: the device image (Python 3.12, torch 2.11+cu130) ships transformers 5.x and huggingface_hub 1.x, under
# which diffsynth 1.1.9 does not import (design.md §1), and it has no pydantic. The device reaches no registry,
# so the pinned versions travel as wheels: `run(..., carry=[".cache/gpu-wheels"])`. Carry is capped at 64 MiB
# for the whole working tree, so only what the image lacks (or has at another version) is fetched — the whole
# lock minus torch/nvidia/triton is several hundred MiB (`--all` downloads it, to measure that).
#
# Versions come from requirements.lock, so this list never drifts from the tested set. The destination is under
# .cache/, which .gitignore already ignores: nothing here is ever committed.
#
#   bash bench/fetch_wheels.sh                 # -> .cache/gpu-wheels (the carry set)
#   bash bench/fetch_wheels.sh --all DIR       # every lock pin except torch/torchvision/triton/nvidia/cuda
set -euo pipefail
cd "$(dirname "$0")/.."

mode=carry
if [[ "${1:-}" == "--all" ]]; then mode=all; shift; fi
dest=${1:-.cache/gpu-wheels}
lock=requirements.lock

# What the device image lacks or holds at an incompatible version (KINDS.md, "Python packages already there";
# accelerate 1.15.0, safetensors 0.8.0, einops, sentencepiece, numpy, pillow, pyyaml, psutil, regex, requests,
# tqdm, filelock, fsspec, hf-xet, httpx are there and fit the pins). tokenizers: transformers 4.57.6 requires
# <=0.23.0 and checks it at import; the image has 0.23.2. typing_extensions: pydantic 2.14 needs >=4.16.
carry=(
  transformers huggingface_hub tokenizers diffusers diffsynth peft
  pydantic pydantic_core pydantic-settings python-dotenv annotated-types typing-inspection typing_extensions
)

norm() { tr '[:upper:]_.' '[:lower:]--' <<<"$1"; }

pins=()
if [[ $mode == carry ]]; then
  for name in "${carry[@]}"; do
    line=$(grep -i -E "^$(norm "$name" | sed 's/-/[-_.]/g')==" "$lock" || true)
    [[ -n $line ]] || { echo "error: $name is not pinned in $lock" >&2; exit 2; }
    pins+=("$line")
  done
else
  while IFS= read -r line; do
    [[ -z $line || $line == \#* ]] && continue
    n=$(norm "${line%%==*}")
    case $n in torch|torchvision|triton|nvidia-*|cuda-*) continue ;; esac
    pins+=("$line")
  done <"$lock"
fi

mkdir -p "$dest"
# Platform tags per the device README; the image is glibc >= 2.35 (Python 3.12.3), so up to manylinux_2_35.
plat=()
for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
# --all also takes sdists (a few lock pins, e.g. alibabacloud-tea, publish no wheel): it only measures size.
binary=(--only-binary=:all:)
[[ $mode == all ]] && binary=(--prefer-binary)
python3 -m pip download --quiet --no-deps "${binary[@]}" --python-version 3.12 --implementation cp \
  "${plat[@]}" -d "$dest" "${pins[@]}" 2> >(grep -v "is neither a file nor a directory" >&2)

# One version of each package: a stale wheel beside the pinned one would stop the install on the device.
python3 - "$dest" "${pins[@]}" <<'EOF'
import pathlib, re, sys
dest, pins = pathlib.Path(sys.argv[1]), sys.argv[2:]
want = {re.sub(r"[-_.]+", "_", p.split("==")[0]).lower(): p.split("==")[1] for p in pins}
for whl in sorted(dest.glob("*.whl")):
    name, version = whl.name.split("-")[:2]  # sdists (--all only) are left alone
    key = re.sub(r"[-_.]+", "_", name).lower()
    if want.get(key) != version:
        print(f"removing {whl.name}: not the pinned {key}=={want.get(key)}")
        whl.unlink()
EOF
count=$(find "$dest" -name '*.whl' | wc -l)
size=$(du -sb "$dest" | cut -f1)
echo "$count wheels, $((size / 1024 / 1024)) MiB ($size bytes) in $dest"
if [[ $mode == carry && $size -gt $((48 * 1024 * 1024)) ]]; then
  echo "warning: over 48 MiB; the device's carry limit is 64 MiB for the whole working tree" >&2
fi
