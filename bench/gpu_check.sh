#!/usr/bin/env bash
# GPU checks: run on a machine with an NVIDIA GPU, from anywhere:  bash bench/gpu_check.sh
# Results go under $OUT (default bench/results/gpu_check/). Each section below is
# self-contained and clearly marked; add new sections at the end, in the same form.
# Exit status: 0 if every section passed, 1 otherwise (every section runs regardless).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
status=0
section() { echo; echo "==================== $* ===================="; }

# ==================== section: set-up ====================
# The project's .venv if there is one, else the machine's python3 (a GPU image with torch,
# triton, transformers, pytest); the package is installed in place if it is not importable.
section "set-up"
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
unset TRITON_INTERPRET  # compiled kernels on the GPU, never the interpreter
export PYTHONUNBUFFERED=1 OFFLOAD_RUNTIME_KERNELS=auto
if ! $PY -c "import offload_runtime.kernels" 2>/dev/null; then
    $PY -m pip install -q --no-deps --no-build-isolation -e . || status=1
fi
{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } \
    > "$OUT/device.txt" 2>&1 || status=1
cat "$OUT/device.txt"

# ==================== section: kernels (issue 5) ====================
# Every Triton kernel against its reference (compiled, on CUDA), the engine's greedy tokens
# with the Triton kernels forced on, then the kernels micro-benchmark (GB/s vs copy bandwidth).
section "kernels: tests"
$PY -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$OUT/kernels_tests.log" || status=1
section "kernels: micro-benchmark"
$PY -m bench.kernels_bench --out "$OUT/kernels_bench.json" 2>&1 | tee "$OUT/kernels_bench.log" || status=1

# ==================== section: offload (issue 4) ====================
# Host-resident full cache and transfer scheduler on CUDA (streams, events, pinned host
# memory), offloaded parity, the link probe; then link bandwidth, achieved H2D GB/s and the
# share of an L3 pass the compute waited on copies.
section "offload: CUDA tests"
timeout 240 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_offload.py -rs 2>&1 | tee "$OUT/offload_cuda_tests.log" || status=1
section "offload: link and L3 pass"
timeout 300 $PY bench/offload_check.py --out "$OUT/offload_check.json" 2>&1 | tee "$OUT/offload_check.log" || status=1

# ==================== (next section goes here) ====================

echo; echo "gpu_check: $([ $status -eq 0 ] && echo PASSED || echo FAILED); results in $OUT"
exit $status
