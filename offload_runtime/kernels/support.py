"""What the Triton kernels take: checked before dispatch (no triton import needed here)."""
from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def dtype_reason(*tensors: torch.Tensor) -> str | None:
    bad = [str(t.dtype) for t in tensors if t.dtype not in SUPPORTED_DTYPES]
    return f"dtype {', '.join(bad)} (Triton kernels take float16, bfloat16, float32)" if bad else None


def head_dim_reason(x: torch.Tensor) -> str | None:
    return f"head_dim {x.shape[-1]} > {MAX_HEAD_DIM}" if x.dim() > 0 and x.shape[-1] > MAX_HEAD_DIM else None


def attention_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                     k_pos: torch.Tensor) -> str | None:
    """Why the Triton attention cannot take these inputs (None if it can)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        return f"q, k, v must be 3-D [heads, rows, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    reason = dtype_reason(q, k, v) or head_dim_reason(q)
    if reason is None and not (q.dtype == k.dtype == v.dtype):
        reason = f"mixed dtypes q={q.dtype} k={k.dtype} v={v.dtype}"
    if reason is None and (q_pos.dtype.is_floating_point or k_pos.dtype.is_floating_point):
        reason = f"floating-point positions q_pos {q_pos.dtype}, k_pos {k_pos.dtype}"
    return reason


def merge_reason(outs: torch.Tensor, lses: torch.Tensor, out_dtype: torch.dtype) -> str | None:
    if out_dtype not in SUPPORTED_DTYPES:
        return f"out_dtype {out_dtype} (Triton kernels take float16, bfloat16, float32)"
    return dtype_reason(outs, lses) or head_dim_reason(outs)


def chunk_scores_reason(chunk_keys: torch.Tensor, query: torch.Tensor) -> str | None:
    return dtype_reason(chunk_keys, query) or head_dim_reason(chunk_keys)
