#!/usr/bin/env bash
# The one GPU run: the checks only a GPU can answer, environment, kernel correctness, then the benchmark
# sweep, headline numbers first.
#
# The device call (the `run` tool), from the repo root, after `bash benchmarks/fetch_wheels.sh` here:
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=540)
# It needs no network there. TOTAL_S (500 s) bounds the script, so it ends before timeout_s; a second
# try on the still-warm machine, with what is left of 15 device minutes, is for example
#   run(command="TOTAL_S=200 bash benchmarks/gpu.sh --no-tests", carry=[".whl"], timeout_s=230)
# Record what came back (here): python -m benchmarks.record <files_at folder>
#
# Stages, each with its own budget; every result is on disk under $OUT as soon as it exists:
#   1. install: the carried wheels (.whl/: trl, liger-kernel, cut-cross-entropy and what the image lacks of
#      their needs) and dpo-fast (a copy laid out as installed) into a scratch folder put first on PYTHONPATH
#   2. the GPU checks (benchmarks/gpu_checks.py), one line each, PASS/FAIL/SKIP with
#      its figure: the float32-output GEMM on this torch, the row kernels past
#      element 2^31, float32 heads with TF32 off and on, autotuned results
#      bit-identical on the first and second call, the fused split sizing's programs
#      per SM against the driver's occupancy, a head on a non-current device         CHECKS_S=120
#   3. environment report (nvidia-smi, versions, each peer imported, the wheels'
#      requirements checked against what is installed: benchmarks/wheel_check.py)  ENV_S=45
#   4. cost-model plan, when `python -m benchmarks plan` exists                     PLAN_S=20
#   5. the suite's GPU-relevant part: every test on the `device` fixture (-m device),
#      tests/test_gpu_smoke.py (every impl x bf16/fp16/fp32 against the float64
#      oracle at real head sizes) first, then the kernel files, the rest after; no
#      -x (each failure reported); what the budget does not reach is not run         TESTS_S=120
#   6. the headline case (Llama-3-8B head, 1 pair x 8192 tokens, bf16), dpo-fast's
#      impls first, then every peer (those that compile last)                       HEADLINE_S=180
#   7. the other GPU cases, each dpo-fast first, with what is left (RESERVE_S=20 kept for the transfer)
#
# Files under $OUT (8 come back at most; this writes 7):
#   gpu_sh.log      stage lines, install log, the GPU checks' verdicts, environment report, plan table
#   gpu_tests.log   pytest's report of stage 5
#   gpu_bench.log   the sweep's console output (stages 6 and 7)
#   headline/<device>-<date>.json, .md     stage 6, rewritten after every method
#   rest/<device>-<date>.json, .md         stage 7, likewise
#
# Usage (repo root): bash benchmarks/gpu.sh [--dry-run] [--no-checks] [--no-tests] [--headline-only]
#   --dry-run        the whole flow on CPU at small shapes in a minute or two (tests/test_gpu_script.py runs
#                    it): wheels from $WHEELS into a scratch folder, the GPU checks at tiny shapes (Triton's
#                    interpreter), the float32 torch-impl smoke tests, the tiny and small cases with
#                    naive-eager and dpo-fast-torch
#   --no-checks      skip stage 2
#   --no-tests       skip stage 5
#   --headline-only  skip stage 6
# Environment: OUT (set by the device tool; else a temporary folder, printed first), WHEELS (.whl),
# SITE (the scratch install folder: /tmp/site; a temporary folder for --dry-run), PYTHON (python3), and the
# budgets above.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0 RUN_CHECKS=1 RUN_TESTS=1 RUN_REST=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --no-checks) RUN_CHECKS=0 ;;
    --no-tests) RUN_TESTS=0 ;;
    --headline-only) RUN_REST=0 ;;
    *) echo "unknown argument: $1 (see the head of $0)" >&2; exit 2 ;;
  esac
  shift
done

WHEELS="${WHEELS:-.whl}"
PY="${PYTHON:-python3}"
TOTAL_S="${TOTAL_S:-500}" CHECKS_S="${CHECKS_S:-120}" ENV_S="${ENV_S:-45}" PLAN_S="${PLAN_S:-20}"
TESTS_S="${TESTS_S:-120}" HEADLINE_S="${HEADLINE_S:-180}" RESERVE_S="${RESERVE_S:-20}"
if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu
  HEADLINE="tiny 2x32"
  REST_CASES="small 2x128"
  # Enough to prove the flow, quickly: a peer and dpo-fast, given in that order and run dpo-fast first;
  # the torch-impl float32 smoke tests (CI runs the whole suite, Triton paths included, on its own).
  METHOD_ARGS=(--methods "naive-eager,dpo-fast-torch" --repeats 1)
  TEST_FILES=(tests/test_gpu_smoke.py)
  TEST_ARGS=(-k "float32 and torch")
  CHECK_ARGS=(--dry-run)
  SITE="${SITE:-$(mktemp -d "${TMPDIR:-/tmp}/dpo-fast-gpu-site.XXXXXX")}"
  OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/dpo-fast-gpu-out.XXXXXX")}"
else
  DEVICE=cuda
  HEADLINE="llama3-8b 1x8192"
  REST_CASES=""  # every other GPU case, read from benchmarks/cases.py below
  METHOD_ARGS=()
  # The suite's GPU-relevant part (every test on the `device` fixture), the smoke file and the kernel files
  # first, so the budget reaches what matters most; then every other test file, the slow fuzzer last.
  TEST_FILES=(tests/test_gpu_smoke.py tests/test_launch_device.py tests/test_large_offsets.py
              tests/test_confident_tokens.py tests/test_fused.py tests/test_hidden_paths.py tests/test_logits_path.py
              tests/test_edge_cases.py tests/test_determinism.py tests/test_cuda_graphs.py)
  for file in tests/test_*.py; do
    case " ${TEST_FILES[*]} tests/test_fuzz.py " in *" $file "*) ;; *) TEST_FILES+=("$file") ;; esac
  done
  TEST_FILES+=(tests/test_fuzz.py)
  TEST_ARGS=(-m device)
  CHECK_ARGS=()
  SITE="${SITE:-/tmp/site}"
  OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/dpo-fast-gpu-out.XXXXXX")}"  # the device tool sets OUT
fi

mkdir -p "$OUT"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[gpu.sh $(elapsed)s] $*" | tee -a "$OUT/gpu_sh.log"; }
stage_end() {  # name, seconds allowed, exit code (timeout's 124 or, after --kill-after, 137)
  if [ "$3" = 124 ] || [ "$3" = 137 ]; then log "$1 stopped at $2s (timeout)"; else log "$1 exit code $3"; fi
}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
log "start: dry run $DRY_RUN, device $DEVICE, budget ${TOTAL_S}s, out $OUT, scratch site $SITE"

# 1. Install. The wheels go into $SITE with --no-deps (the image keeps its torch, triton, transformers):
#    all in one pip call, or one at a time if that fails, so a bad wheel costs only itself.
mkdir -p "$SITE"
PIP=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  wheels=("$WHEELS"/*.whl)
  if "${PIP[@]}" "${wheels[@]}" >> "$OUT/gpu_sh.log" 2>&1; then
    log "installed ${#wheels[@]} wheels from $WHEELS: $(cd "$WHEELS" && echo *.whl)"
  else
    log "installing the wheels together failed; one at a time"
    for wheel in "${wheels[@]}"; do
      "${PIP[@]}" "$wheel" >> "$OUT/gpu_sh.log" 2>&1 && log "installed $wheel" || log "installing $wheel FAILED"
    done
  fi
else
  log "no wheels in $WHEELS: peers the image lacks will be skipped (run benchmarks/fetch_wheels.sh first)"
fi
# dpo-fast as installed (kernels/ becomes dpo_fast/kernels, setup.py's package_dir), with a dist-info so
# its version is reported; no build step, so nothing but a copy can fail. Python runs with -P: the source
# folder in the current directory (which has no dpo_fast/kernels) must not shadow it.
VERSION=$(sed -n 's/^ *version="\([^"]*\)".*/\1/p' setup.py)
rm -rf "$SITE/dpo_fast" "$SITE"/dpo_fast-*.dist-info
cp -r dpo_fast "$SITE/dpo_fast" && cp -r kernels "$SITE/dpo_fast/kernels" \
  && mkdir -p "$SITE/dpo_fast-$VERSION.dist-info" \
  && printf 'Metadata-Version: 2.1\nName: dpo-fast\nVersion: %s\n' "$VERSION" \
     > "$SITE/dpo_fast-$VERSION.dist-info/METADATA" \
  && log "dpo-fast $VERSION copied into $SITE" || log "copying dpo-fast into $SITE FAILED"
export PYTHONPATH="$SITE:$PWD"
RUN=("$PY" -P)
if ! "${RUN[@]}" -c "" 2> /dev/null; then
  log "$PY has no -P (Python 3.11+): the source folder would shadow the installed dpo-fast; stopping"
  exit 1
fi

# 2. The GPU checks, first: what only a GPU can answer, one verdict line each (also on the console).
if [ "$RUN_CHECKS" = 1 ]; then
  log "gpu checks: python -m benchmarks.gpu_checks (at most ${CHECKS_S}s)"
  timeout --kill-after=10 $(( CHECKS_S + 15 )) "${RUN[@]}" -m benchmarks.gpu_checks --budget-s "$CHECKS_S" \
    ${CHECK_ARGS[@]+"${CHECK_ARGS[@]}"} 2>&1 | tee -a "$OUT/gpu_sh.log"
  stage_end "gpu checks" "$CHECKS_S" "${PIPESTATUS[0]}"
fi

# 3. Environment report.
log "environment (at most ${ENV_S}s)"
{
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
      --format=csv 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  timeout --kill-after=5 "$ENV_S" "${RUN[@]}" - <<'PYEOF' 2>&1
import importlib
import platform
import time
from importlib import metadata

import torch

print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"multiprocessors {p.multi_processor_count}, memory {p.total_memory / 2**30:.1f} GiB, "
          f"capability {p.major}.{p.minor}")
for name in ("triton", "transformers", "accelerate", "trl", "liger-kernel", "cut-cross-entropy", "datasets",
             "dill", "multiprocess", "pyarrow", "huggingface-hub", "dpo-fast"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "not installed")
for module in ("dpo_fast", "dpo_fast.fused", "trl", "trl.trainer.utils", "trl.kernels.chunked_logprob",
               "liger_kernel.chunked_loss", "cut_cross_entropy", "datasets"):
    start = time.perf_counter()
    try:
        loaded = importlib.import_module(module)
        print(f"import {module} ok ({time.perf_counter() - start:.1f}s) from {getattr(loaded, '__file__', '?')}")
    except Exception as exc:
        print("import", module, "FAILED:", type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
PYEOF
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    echo "### the carried wheels' requirements against what is installed here"
    timeout --kill-after=5 30 "${RUN[@]}" -m benchmarks.wheel_check --installed "$WHEELS"
  fi
} >> "$OUT/gpu_sh.log" 2>&1
log "environment done"

# 4. The cost model's plan for the sweep's shapes, where the command exists (benchmarks/__main__.py).
log "python -m benchmarks plan (at most ${PLAN_S}s)"
echo "### python -m benchmarks plan" >> "$OUT/gpu_sh.log"
timeout --kill-after=5 "$PLAN_S" "${RUN[@]}" -m benchmarks plan > "$SITE/plan.txt" 2>&1
rc=$?
if [ "$rc" = 2 ] && grep -q "unrecognized arguments: plan" "$SITE/plan.txt"; then
  log "no plan command in this version of benchmarks/__main__.py: skipped"
else
  cat "$SITE/plan.txt" >> "$OUT/gpu_sh.log"
  log "plan exit code $rc"
fi

# 5. Kernel correctness, bounded; no -x, every failure reported with its errors.
if [ "$RUN_TESTS" = 1 ]; then
  log "pytest ${TEST_FILES[*]} ${TEST_ARGS[*]} (at most ${TESTS_S}s)"
  timeout --kill-after=10 "$TESTS_S" "${RUN[@]}" -m pytest "${TEST_FILES[@]}" -v -rfE --tb=short \
    -p no:cacheprovider --durations=5 ${TEST_ARGS[@]+"${TEST_ARGS[@]}"} > "$OUT/gpu_tests.log" 2>&1
  stage_end pytest "$TESTS_S" $?
  tail -n 3 "$OUT/gpu_tests.log"
fi

# 6-7. The sweep: one process per stage, so a hung or crashed stage does not take the other with it. The
# sweep's own budget stops it starting new runs 40 s before the stage's hard limit.
sweep() {  # stage name, seconds, comma-separated cases
  local stage="$1" seconds="$2" cases="$3"
  if [ "$seconds" -lt 60 ]; then
    log "$stage: only ${seconds}s left: not run"
    return
  fi
  log "$stage: python -m benchmarks --cases '$cases' (at most ${seconds}s)"
  echo "### $stage: $cases" >> "$OUT/gpu_bench.log"
  timeout --kill-after=10 "$seconds" "${RUN[@]}" -m benchmarks --device "$DEVICE" --cases "$cases" \
    --out "$OUT/$stage" --budget-s $(( seconds - 40 )) --no-plot --no-progress \
    ${METHOD_ARGS[@]+"${METHOD_ARGS[@]}"} >> "$OUT/gpu_bench.log" 2>&1
  stage_end "$stage" "$seconds" $?
}

left() { echo $(( TOTAL_S - $(elapsed) - RESERVE_S )); }
budget=$(left)
sweep headline $(( budget < HEADLINE_S ? budget : HEADLINE_S )) "$HEADLINE"
if [ "$RUN_REST" = 1 ]; then
  if [ -z "$REST_CASES" ]; then
    REST_CASES=$("${RUN[@]}" -c "from benchmarks.cases import GPU_CASES
print(','.join(c.name for c in GPU_CASES if c.name != '$HEADLINE'))")
  fi
  sweep rest "$(left)" "$REST_CASES"
fi

log "done; files in $OUT:"
find "$OUT" -type f | sort | while read -r f; do echo "  $f ($(wc -c < "$f") bytes)"; done | tee -a "$OUT/gpu_sh.log"
