#!/usr/bin/env bash
# One GPU session's worth of checks: build the extension for the card, run the GPU tests and the
# kernel tests on it, every benchmark, the traffic model beside them, compute-sanitizer on one
# small case of each kernel and of the queue push, and one ncu summary per kernel.
# Usage: benchmarks/gpu_check.sh OUTDIR   (on the device machine: benchmarks/gpu_check.sh "$OUT")
# Steps run in order of value (correctness, then the headline benchmarks), each within its own
# timeout and the overall BUDGET; summary.md is rewritten after every step, so a run cut off
# part-way still leaves what it finished. Files: summary.md, log.txt, status.txt, results.jsonl,
# model.jsonl, tables/*.md, tables/*.jsonl (rows as data, for benchmarks/results/).
set -u
OUTDIR=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUTDIR/tables"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The build compiles for the visible GPU unless TORCH_CUDA_ARCH_LIST is set (fastssl/_build.py).
LOG="$OUTDIR/log.txt"; STATUS="$OUTDIR/status.txt"; TABLES="$OUTDIR/tables"
: >"$LOG"; : >"$STATUS"

QUICK=${GPU_CHECK_QUICK:+--quick}  # set GPU_CHECK_QUICK=1 to smoke-test this script's logic on a CPU
BUDGET=${GPU_CHECK_BUDGET:-450}  # seconds for the whole script: it must end well inside one 10-minute call

summarize() {
  {
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ) git $(git rev-parse --short HEAD 2>/dev/null)"
    echo
    sed 's/^/    /' "$STATUS"
    echo
    cat "$TABLES"/*.md 2>/dev/null
  } >"$OUTDIR/summary.md"
  cat "$TABLES"/*.jsonl >"$OUTDIR/results.jsonl" 2>/dev/null || : >"$OUTDIR/results.jsonl"
}

step() {  # step NAME SECONDS CMD...: run within min(SECONDS, what is left of BUDGET); log; record rc
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((BUDGET - SECONDS))
  if [ "$left" -lt 15 ]; then echo "$name skipped: budget spent" | tee -a "$STATUS"; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$STATUS"
  summarize
}

has() { command -v "$1" >/dev/null 2>&1; }

step env 60 "$PY" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
step build 180 "$PY" setup.py build_ext --inplace
step gpu-tests 60 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
step model 60 "$PY" -m fastssl.cli bench --model --json "$OUTDIR/model.jsonl"
# Benchmarks in order of what the issues ask most; the remaining budget decides how far it gets.
for name in info_nce contrastive dino mae queue train data; do
  step "bench_$name" 90 "$PY" -m "fastssl.bench.$name" --out "$TABLES" $QUICK
done
step kernel-tests 120 "$PY" -m pytest -q -x -p no:cacheprovider tests/ops
if has compute-sanitizer; then
  step memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m fastssl.bench.kernel_cases --size small
fi
if has ncu && [ -z "$QUICK" ]; then
  # One summary per fused kernel at the benchmark shapes: throughput as % of the card's peaks.
  step ncu 120 ncu --section SpeedOfLight --kernel-name-base function --kernel-name "regex:_.*_kernel" \
    --launch-count 20 "$PY" -m fastssl.bench.kernel_cases --size bench
fi
summarize
cat "$OUTDIR/summary.md"
