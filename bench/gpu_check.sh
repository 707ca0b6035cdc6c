#!/usr/bin/env bash
# One-command GPU check (a lent GPU, under 8 minutes): every section runs its CUDA tests
# (pytest marker `cuda`, skipped with the reason where no GPU exists) and its measurements.
# Results go to $OUT (the device tool's output folder) or bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
status=0

# --- host-resident full cache, transfer scheduler (issue 4) ---------------------------------
echo "== offload: CUDA tests (scheduler on CUDA, offloaded parity, link probe)"
timeout 240 "$PY" -m pytest -m cuda tests/test_cuda_offload.py -q -rs -s 2>&1 | tee "$RESULTS/offload_cuda_tests.txt" || status=1
echo "== offload: link bandwidth, achieved H2D GB/s, compute waiting on copies"
timeout 300 "$PY" bench/offload_check.py --out "$RESULTS/offload_check.json" 2>&1 | tee "$RESULTS/offload_check.txt" || status=1

exit $status
