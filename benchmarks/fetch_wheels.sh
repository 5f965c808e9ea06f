#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels that benchmarks/gpu.sh installs on a GPU
# machine without network: the peers' pure-Python packages and those of their needs that the GPU
# image lacks. That image already has torch, triton, transformers, accelerate, pandas, pyarrow,
# psutil, huggingface-hub, xxhash, fsspec, httpx, requests, jinja2, pyyaml, tqdm, matplotlib, pytest
# and pytest-benchmark.
#
#   trl                 TRL's ChunkedLogProbFunction (its backward imports trl.trainer.utils,
#                       which needs datasets -> dill, multiprocess)
#   liger-kernel        LigerFusedLinearDPOLoss (needs torch + triton only)
#   cut-cross-entropy   CCE (needs torch + triton only)
#
# Usage: bash benchmarks/fetch_wheels.sh [DEST]   (default .whl, ignored by git: /.whl/ in .gitignore)
# Then, with the device tool: run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=540)
# (carry must name .whl: ignored files do not travel otherwise). It ends with benchmarks/wheel_check.py:
# every requirement of every wheel met by another wheel or by the image's packages (Python 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
PY="${PYTHON:-python3}"
MAX_MB="${MAX_MB:-40}"
WHEELS=(
  trl==1.16.0
  liger-kernel==0.8.5
  cut-cross-entropy==25.1.1
  datasets==4.7.0      # the oldest trl 1.16 accepts; asks least of the image's pyarrow and hub
  dill==0.4.0          # datasets 4.7: dill<0.4.1
  multiprocess==0.70.18  # datasets 4.7: multiprocess<0.70.19
)
mkdir -p "$DEST"
# One version per package: a second one would stop the whole install on the GPU machine.
for spec in "${WHEELS[@]}"; do
  stem="$(echo "${spec%%==*}" | tr - _)"
  keep="$(echo "$spec" | tr - _ | sed 's/==/-/')"
  find "$DEST" -maxdepth 1 -iname "${stem}-*.whl" ! -iname "${keep}-*" -delete
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"
size_kb=$(du -sk "$DEST" | cut -f1)
echo "total: $((size_kb / 1024)) MiB in $DEST (limit ${MAX_MB} MiB; the working tree that travels is capped at 64 MiB)"
if [ "$size_kb" -gt $((MAX_MB * 1024)) ]; then
  echo "error: wheels exceed ${MAX_MB} MiB" >&2
  exit 1
fi
# pip installs them with --no-deps there, so check here that every requirement is met by another wheel or
# by the image's packages (versions as read on the image; gpu.sh checks again against what is installed).
"$PY" -m benchmarks.wheel_check "$DEST"
