#!/usr/bin/env bash
# GPU checks: run on a machine with an NVIDIA GPU, from anywhere:  bash bench/gpu_check.sh
# Results go under $OUT (default bench/results/gpu_check/). Each section below is
# self-contained and clearly marked; add new sections at the end, in the same form.
# A lent GPU gives one command at most 10 minutes (15 minutes in all): pick sections with
# ONLY, e.g. `ONLY=offload,kernels bash bench/gpu_check.sh` (about 6 and 3 minutes at most);
# every step has its own timeout. Sections: kernels, offload, tp, bench, pipeline (default: all).
# Exit status: 0 if every section run passed, 1 otherwise (every chosen section runs regardless).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_check}
ONLY=${ONLY:-all}
mkdir -p "$OUT"
status=0
section() { echo; echo "==================== $* ===================="; }
want() { [ "$ONLY" = all ] || [[ ",$ONLY," == *",$1,"* ]]; }

# ==================== section: set-up ====================
# The project's .venv if there is one, else the machine's python3 (a GPU image with torch,
# triton, transformers, pytest); the package is installed in place if it is not importable.
section "set-up"
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
unset TRITON_INTERPRET  # compiled kernels on the GPU, never the interpreter
export PYTHONUNBUFFERED=1 OFFLOAD_RUNTIME_KERNELS=auto
if ! $PY -c "import offload_runtime.kernels" 2>/dev/null; then
    timeout 120 $PY -m pip install -q --no-deps --no-build-isolation -e . || status=1
fi
{ nvidia-smi; $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"; } \
    > "$OUT/device.txt" 2>&1 || status=1
cat "$OUT/device.txt"

# ==================== section: kernels (issue 5) ====================
# Every Triton kernel against its reference (compiled, on CUDA), the engine's greedy tokens
# with the Triton kernels forced on, then the kernels micro-benchmark (GB/s vs copy bandwidth).
if want kernels; then
    section "kernels: tests"
    timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$OUT/kernels_tests.log" || status=1
    section "kernels: micro-benchmark"
    timeout 90 $PY -m bench.kernels_bench --quick --out "$OUT/kernels_bench.json" 2>&1 | tee "$OUT/kernels_bench.log" || status=1
fi

# ==================== section: offload (issue 4) ====================
# Host-resident full cache and transfer scheduler on CUDA (streams, events, pinned host
# memory), offloaded parity, the link probe, a KV-store restore into CUDA caches and the
# server's pooled contexts with host-resident caches (issue 24); then link bandwidth, achieved
# H2D GB/s and the share of an L3 pass the compute waited on copies.
if want offload; then
    section "offload: CUDA tests"
    timeout 200 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_offload.py tests/test_serve_contexts.py -rs 2>&1 | tee "$OUT/offload_cuda_tests.log" || status=1
    section "offload: link and L3 pass"
    timeout 180 $PY bench/offload_check.py --out "$OUT/offload_check.json" 2>&1 | tee "$OUT/offload_check.log" || status=1
fi

# ==================== section: two-GPU tensor parallelism (issue 6) ====================
# TP=2 over NCCL gives exactly the tokens of TP=1 on one GPU (llama and qwen2, both engine
# modes, with and without a draft, greedy and seeded sampling, offloaded), then one
# end-to-end torchrun run of the CLI. Skipped, saying so, where fewer than two GPUs are visible.
if want tp; then
    N_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [ "${N_GPUS}" -ge 2 ]; then
        section "tensor parallelism: NCCL tests"
        OFFLOAD_TP_BACKEND=nccl timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_tensor_parallel.py 2>&1 | tee "$OUT/tp_tests.log" || status=1
        section "tensor parallelism: torchrun CLI"
        CKPT=$($PY -c 'import tempfile; from offload_runtime import synthetic; print(synthetic.make_checkpoint(tempfile.mkdtemp(), "llama"))' 2>/dev/null | tail -1)
        OMP_NUM_THREADS=1 timeout 120 $PY -m torch.distributed.run --nproc_per_node=2 -m offload_runtime.run \
            --device cuda --max-new-tokens 16 --json --model "$CKPT" --prompt "Kamiro telan vorsi lu den." \
            2>&1 | tee "$OUT/tp_cli.log" || status=1
    else
        section "tensor parallelism: SKIPPED (needs 2 GPUs, ${N_GPUS} visible)"
    fi
fi

# ==================== section: offloading benchmark (issue 8) ====================
# A 7B-shaped (Llama-2-7B) synthetic model at 32K and 128K under a 24 GB cap (an RTX 4090's
# memory): ours autoregressive over the offloaded cache, transformers' generate with its
# offloaded cache, our engine with two and three levels. JSON + PNG for bench/results/.
if want bench; then
    section "offloading benchmark: 7B shape, 32K and 128K, 24 GB cap"
    timeout 420 $PY -m bench --synthetic 7b --contexts 32768,131072 --new-tokens 8 --budget 4096 \
        --memory-cap-gib 24 --out "$OUT" --tag 24gb 2>&1 | tee "$OUT/offload_bench.log" || status=1
fi

# ==================== section: pipelined speculation (issue 14) ====================
# `--pipeline off` against `on` on the real GPU and its real host link (not emulated): an
# 8B-shaped (GQA) synthetic model at 32K, budget >= context (every token accepted), gamma 16,
# 2 repeats, bf16, no memory cap (the L2 cache holds all 32K rows). JSON for bench/results/.
if want pipeline; then
    section "pipelined speculation: 8B shape, 32K, real link"
    timeout 300 $PY -m bench.pipeline_bench --device cuda --synthetic 8b --context 32768 --gamma 16 \
        --new-tokens 86 --repeats 2 --slabs 2 --out "$OUT" --tag cuda 2>&1 | tee "$OUT/pipeline_bench.log" || status=1
fi

# ==================== (next section goes here) ====================

echo; echo "gpu_check ($ONLY): $([ $status -eq 0 ] && echo PASSED || echo FAILED); results in $OUT"
exit $status
