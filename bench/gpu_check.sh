#!/usr/bin/env bash
# GPU checks: what the CPU test suite cannot show. Run on a machine with NVIDIA GPUs:
#     bash bench/gpu_check.sh
# Each feature adds its own clearly marked section below; a section that needs hardware
# the machine lacks prints that it is skipped. The script exits non-zero if any check failed.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
N_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
FAILED=0
echo "gpu_check: ${N_GPUS} GPU(s) visible, python: ${PY}"

# ---------------------------------------------------------------------------------------
# Section: two-GPU tensor parallelism (issue 6)
# TP=2 over NCCL gives exactly the tokens of TP=1 on one GPU (llama and qwen2, both
# engine modes, with and without a draft, greedy and seeded sampling), then one
# end-to-end torchrun run of the CLI.
# ---------------------------------------------------------------------------------------
if [ "${N_GPUS}" -ge 2 ]; then
    echo "== two-GPU tensor parallelism (NCCL)"
    OFFLOAD_TP_BACKEND=nccl "$PY" -m pytest -q tests/test_tensor_parallel.py || FAILED=1
    OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --nproc_per_node=2 -m offload_runtime.run \
        --device cuda --max-new-tokens 16 --json \
        --model "$("$PY" -c 'import tempfile; from offload_runtime import synthetic; print(synthetic.make_checkpoint(tempfile.mkdtemp(), "llama"))' 2>/dev/null | tail -1)" \
        --prompt "Kamiro telan vorsi lu den." || FAILED=1
else
    echo "== two-GPU tensor parallelism: SKIPPED (needs 2 GPUs, ${N_GPUS} visible)"
fi

exit ${FAILED}
