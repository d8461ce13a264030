#!/usr/bin/env bash
# One GPU session's worth of checks: build the extension, run the GPU tests and the
# kernel tests on the card, run every benchmark; write tables and logs under OUTDIR.
# Usage: benchmarks/gpu_check.sh OUTDIR   (on the device machine: benchmarks/gpu_check.sh "$OUT")
# Everything lands in at most 4 files: summary.md (all tables), log.txt, results.jsonl, status.txt.
set -u
OUTDIR=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
LOG="$OUTDIR/log.txt"; STATUS="$OUTDIR/status.txt"; TABLES=$(mktemp -d)
: >"$LOG"; : >"$STATUS"

QUICK=${GPU_CHECK_QUICK:+--quick}  # set GPU_CHECK_QUICK=1 to smoke-test this script's logic on a CPU
BUDGET=${GPU_CHECK_BUDGET:-450}  # seconds for the whole script: it must end well inside one 10-minute call

step() {  # step NAME SECONDS CMD...: run within min(SECONDS, what is left of BUDGET); log; record rc
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((BUDGET - SECONDS))
  if [ "$left" -lt 15 ]; then echo "$name skipped: budget spent" | tee -a "$STATUS"; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$STATUS"
}

step env 60 "$PY" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
step build 180 "$PY" setup.py build_ext --inplace
step gpu-tests 60 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
# Benchmarks in order of what the issues ask most; the remaining budget decides how far it gets.
for name in info_nce dino mae queue train data; do
  [ -f "benchmarks/bench_$name.py" ] && step "bench_$name" 90 "$PY" "benchmarks/bench_$name.py" --out "$TABLES" $QUICK
done
step kernel-tests 120 "$PY" -m pytest -q -x -p no:cacheprovider tests/ops

{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ) git $(git rev-parse --short HEAD 2>/dev/null)"
  echo
  sed 's/^/    /' "$STATUS"
  echo
  cat "$TABLES"/*.md 2>/dev/null
} >"$OUTDIR/summary.md"
cat "$TABLES"/*.jsonl >"$OUTDIR/results.jsonl" 2>/dev/null || : >"$OUTDIR/results.jsonl"
rm -rf "$TABLES"
cat "$OUTDIR/summary.md"
