#!/usr/bin/env bash
# One GPU loan's worth of checks, in order of value: the environment and the extension's build;
# correctness on the card (the GPU tests, then the kernel tests against float64; the compile gate
# is left out: it needs no GPU); one training step of every method under
# torch.cuda.set_sync_debug_mode("error"); the headline benchmarks (CUDA-event timings);
# compute-sanitizer memcheck on one small case per kernel and the queue push; one ncu summary per
# kernel. Each step runs under its own `timeout`; a failed step is recorded and the next one runs.
#
#   benchmarks/gpu_check.sh OUTDIR            on the GPU machine (nothing is installed there)
#   benchmarks/gpu_check.sh --dry-run OUTDIR  on a CPU: print every step's command, run each
#       step's Python entry in its dry form, all in one interpreter (pytest --collect-only, which
#       must select tests; a module's --dry-run, which imports it and validates its arguments;
#       setup.py --name) and check that the steps' time limits add up to less than MAX_TOTAL
#
# OUTDIR gets three files, rewritten after every step so a run cut off part-way keeps what it
# finished (a device call returns at most 8 files): summary.md (one line per step, then the
# tables), log.txt (every command's output) and gpu_check.tar.gz (tables/*.md, tables/*.jsonl rows
# as data, JUnit XML of the test steps, the ncu report).
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUTDIR=${1:?usage: benchmarks/gpu_check.sh [--dry-run] OUTDIR}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
TABLES="$WORK/tables"
mkdir -p "$TABLES"
LOG="$OUTDIR/log.txt" STATUS="$WORK/status.txt"
: >"$LOG"; : >"$STATUS"

MAX_TOTAL=570   # seconds: the steps' limits together, inside one 10-minute device call
TOTAL=0 FAILED=0
# The test files holding @pytest.mark.gpu tests (tests/test_gpu_check_script.py checks the list).
GPU_TESTS="tests/ops tests/methods tests/data tests/test_queue.py tests/test_bank.py"
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -p no:xdist --continue-on-collection-errors)

summarize() {
  {
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ) git $(git rev-parse --short HEAD 2>/dev/null)"
    echo
    sed 's/^/    /' "$STATUS"
    echo
    cat "$TABLES"/*.md 2>/dev/null
  } >"$OUTDIR/summary.md"
  cp "$OUTDIR/summary.md" "$LOG" "$WORK/" 2>/dev/null
  tar czf "$OUTDIR/gpu_check.tar.gz" -C "$WORK" . 2>/dev/null
}

# The dry form of a step's command, in DRY_CMD: from the Python interpreter on (past any wrapper
# tool such as compute-sanitizer or ncu); pytest collects only, a fastssl module gets --dry-run.
dry_form() {
  while [ $# -gt 0 ] && [ "$1" != "$PY" ]; do shift; done
  [ $# -ge 2 ] || return 1
  case "$2 ${3:-}" in
    "-m pytest") DRY_CMD=("$@" --collect-only) ;;
    "-m fastssl."*) DRY_CMD=("$@" --dry-run) ;;
    "setup.py "*) DRY_CMD=("$PY" setup.py --name) ;;
    *) DRY_CMD=("$@") ;;
  esac
}

dry_step() {  # dry_step NAME SECONDS CMD...: print the command, record its dry form for the end
  local name=$1 limit=$2; shift 2
  echo "=== $name (${limit}s): $*" | tee -a "$LOG"
  if [ "$1" != "$PY" ] && ! command -v "$1" >/dev/null 2>&1; then
    echo "    ($1 is not installed here: its Python entry is checked alone)" | tee -a "$LOG"
  fi
  if ! dry_form "$@"; then
    echo "$name dry-run: no Python entry in the command" | tee -a "$STATUS"; FAILED=1; return
  fi
  printf '%s\0' "$name" "${#DRY_CMD[@]}" "${DRY_CMD[@]}" >>"$WORK/dry_steps"
}

step() {  # step NAME SECONDS CMD...: run within min(SECONDS, what is left of MAX_TOTAL); log; record rc
  local name=$1 limit=$2; shift 2
  TOTAL=$((TOTAL + limit))
  if [ $DRY = 1 ]; then dry_step "$name" "$limit" "$@"; return; fi
  local t0=$SECONDS left=$((MAX_TOTAL - SECONDS))
  if ! command -v "$1" >/dev/null 2>&1; then echo "$name skipped: $1 not found" | tee -a "$STATUS"; return; fi
  if [ "$left" -lt 10 ]; then echo "$name skipped: budget spent" | tee -a "$STATUS"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local verdict=ok
  [ $rc -eq 124 ] && verdict="TIMED OUT"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict=FAILED
  echo "$name: $verdict (rc=$rc, $((SECONDS - t0))s of ${limit}s)" | tee -a "$STATUS"
  summarize
}

# 1. where we are, and the extension built for this card (TORCH_CUDA_ARCH_LIST: the visible GPU's)
step env 15 "$PY" -m fastssl.bench.harness --require-cuda
step build 110 "$PY" setup.py build_ext --inplace
# 2. correctness on the card: the GPU tests (fused vs float64 gradients of every method's step, the
# MAE model's layout, DALI), then the kernel tests (every op against float64 on CUDA tensors)
step gpu-tests 75 "${PYTEST[@]}" -m "gpu and not sync_debug" --junitxml="$WORK/gpu-tests.xml" $GPU_TESTS
step kernel-tests 80 "${PYTEST[@]}" -m "not gpu" --junitxml="$WORK/kernel-tests.xml" tests/ops \
  --ignore=tests/ops/test_compile_gate.py
# 3. no host synchronization in a training step (the headline "no host sync")
step sync-debug 30 "${PYTEST[@]}" -m "gpu and sync_debug" --junitxml="$WORK/sync-debug.xml" tests/methods
# 4. the headline benchmarks: CUDA events around synchronized windows, eager / compile / fastssl
for name in info_nce dino; do
  step "bench-$name" 40 "$PY" -m "fastssl.bench.$name" --out "$TABLES"
done
step bench-contrastive 35 "$PY" -m fastssl.bench.contrastive --out "$TABLES"
step bench-mae 20 "$PY" -m fastssl.bench.mae --out "$TABLES"
step bench-queue 15 "$PY" -m fastssl.bench.queue --out "$TABLES"
step bench-train 45 "$PY" -m fastssl.bench.train --out "$TABLES"
# 5. memory errors: one small case per kernel and the queue push
step memcheck 30 compute-sanitizer --tool memcheck --error-exitcode 1 \
  "$PY" -m fastssl.bench.kernel_cases --size small
# 6. one ncu summary per kernel at the benchmark shapes, profiled after a warm-up pass (autotuning)
step ncu 30 ncu --profile-from-start off --section SpeedOfLight --kernel-name-base function \
  --kernel-name "regex:_.*_kernel" --log-file "$WORK/ncu.txt" \
  "$PY" -m fastssl.bench.kernel_cases --size bench --profile-second-pass

if [ $DRY = 1 ]; then
  # every step's dry form in one interpreter (fastssl.bench.dry_steps): one import of torch
  timeout 300 "$PY" -m fastssl.bench.dry_steps "$WORK/dry_steps" 2>>"$LOG" | tee -a "$STATUS"
  [ "${PIPESTATUS[0]}" -eq 0 ] || FAILED=1
  verdict=ok
  if [ $TOTAL -ge $MAX_TOTAL ]; then verdict="OVER BUDGET"; FAILED=1; fi
  echo "budget: steps' limits add up to ${TOTAL}s of ${MAX_TOTAL}s ($verdict)" | tee -a "$STATUS"
  summarize
  exit $FAILED
fi
summarize
cat "$OUTDIR/summary.md"
