#!/usr/bin/env bash
# One run on a GPU machine without network: install the carried peer wheels and dpo-fast, run the
# GPU tests, then the GPU benchmark sweep. Everything lands in ${OUT:-benchmarks/results}:
#   gpu_sh.log (set-up, versions, nvidia-smi), gpu_tests.log, gpu_bench.log,
#   <device>-<date>.json / .md / .png (the sweep; rewritten after every case)
#
# Before: bash benchmarks/fetch_wheels.sh (here, with network) puts the peers' wheels in .whl/.
# Usage (repo root): bash benchmarks/gpu.sh [--quick] [--no-tests] [-- extra args for python -m benchmarks]
#   --quick     the first three GPU cases only (Llama-3-8B 4x1024, Gemma-2-2B 1x8192, Qwen2.5-7B 4x1024)
#   --no-tests  skip pytest (the sweep gets the whole budget)
# Time: TOTAL_S (default 480) bounds the whole script; TESTS_S (default 150) the tests. The sweep
# stops starting new runs when its share is spent and reports the rest as skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
TOTAL_S="${TOTAL_S:-480}"
TESTS_S="${TESTS_S:-150}"
PY="${PYTHON:-python3}"
SWEEP_ARGS=()
RUN_TESTS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) SWEEP_ARGS+=(--quick) ;;
    --no-tests) RUN_TESTS=0 ;;
    --) shift; SWEEP_ARGS+=("$@"); break ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[gpu.sh $(elapsed)s] $*" | tee -a "$OUT/gpu_sh.log"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

# 1. The peers, from carried wheels (trl, liger-kernel, cut-cross-entropy, datasets, dill, multiprocess),
#    one at a time so that one bad wheel does not stop the others.
if compgen -G ".whl/*.whl" > /dev/null; then
  for wheel in .whl/*.whl; do
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel" \
      >> "$OUT/gpu_sh.log" 2>&1 || log "installing $wheel failed"
  done
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  log "no .whl/ folder: peers that the image lacks will be skipped (run benchmarks/fetch_wheels.sh first)"
fi

# 2. dpo-fast itself, editable so that dpo_fast.kernels maps to kernels/ (setup.py package_dir).
#    Fallback without pip: a copy laid out as installed, in /tmp/dpo_site, read with python -P so the
#    source folder in the current directory (which has no dpo_fast/kernels) does not shadow it.
RUN=("$PY")
if ! { "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >> "$OUT/gpu_sh.log" 2>&1 \
       && "$PY" -c "import dpo_fast.kernels" >> "$OUT/gpu_sh.log" 2>&1; }; then
  log "editable install failed; using a copy of dpo_fast (+ kernels/ as dpo_fast/kernels) in /tmp/dpo_site"
  rm -rf /tmp/dpo_site && mkdir -p /tmp/dpo_site && cp -r dpo_fast /tmp/dpo_site/ \
    && rm -rf /tmp/dpo_site/dpo_fast/kernels && cp -r kernels /tmp/dpo_site/dpo_fast/kernels
  export PYTHONPATH="/tmp/dpo_site${PYTHONPATH:+:$PYTHONPATH}:$PWD"
  RUN=("$PY" -P)
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "${RUN[@]}" - <<'PYEOF' 2>&1
import importlib
from importlib import metadata
import torch
device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", device)
for name in ("triton", "transformers", "trl", "liger-kernel", "cut-cross-entropy", "datasets", "dpo-fast"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "not installed")
for module in ("dpo_fast.kernels", "trl.kernels.chunked_logprob", "trl.trainer.utils", "liger_kernel.chunked_loss",
               "cut_cross_entropy", "dpo_fast.fused"):
    try:
        importlib.import_module(module)
        print("import", module, "ok")
    except Exception as exc:
        print("import", module, "FAILED:", type(exc).__name__, str(exc).splitlines()[0][:160])
PYEOF
} | tee -a "$OUT/gpu_sh.log"

# 3. The test suite on the GPU, bounded.
if [ "$RUN_TESTS" = 1 ]; then
  log "pytest tests (at most ${TESTS_S}s)"
  timeout --kill-after=10 "$TESTS_S" "${RUN[@]}" -m pytest tests -x -q -ra -p no:cacheprovider \
    > "$OUT/gpu_tests.log" 2>&1
  rc=$?
  tail -n 15 "$OUT/gpu_tests.log"
  [ "$rc" = 124 ] && log "pytest stopped at ${TESTS_S}s (timeout)" || log "pytest exit code $rc"
fi

# 4. The sweep with what is left (30 s kept for writing files and the transfer back).
BUDGET=$(( TOTAL_S - $(elapsed) - 30 ))
if [ "$BUDGET" -lt 60 ]; then
  log "only ${BUDGET}s left: no sweep"
  exit 1
fi
log "python -m benchmarks (budget ${BUDGET}s)"
# The budget stops new runs; the hard limit leaves a run in flight 60 s to finish.
timeout --kill-after=10 $(( BUDGET + 60 )) "${RUN[@]}" -m benchmarks --device cuda --out "$OUT" --budget-s "$BUDGET" \
  --no-progress "${SWEEP_ARGS[@]}" 2>&1 | tee "$OUT/gpu_bench.log" | grep -v "^  ok: "
log "done; files in $OUT:"
ls -l "$OUT" | tee -a "$OUT/gpu_sh.log"
