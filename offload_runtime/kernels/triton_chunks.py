"""Triton chunk scoring for the retrieval selection: each chunk's mean key against a query, GQA heads summed.

`chunk_scores_triton` and `select_chunks_triton` have the signatures of their `*_reference` twins
in reference.py (the selection: these scores, then torch's top-k, chunk 0 always kept).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .reference import top_chunks
from .support import chunk_scores_reason


@triton.jit
def _chunk_scores_kernel(
    CK, Q, OUT,
    stride_ch, stride_cn, stride_cd,
    stride_qh, stride_qd,
    stride_oh, stride_on,
    n_chunks, head_dim,
    GROUPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: one KV head, BLOCK_N chunks. Each chunk-key tile is read once and scored
    against the KV head's G query heads in turn (their scores add: GQA)."""
    kv_head = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_chunks
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    keys = tl.load(CK + kv_head * stride_ch + n[:, None] * stride_cn + d[None, :] * stride_cd,
                   mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    score = tl.zeros([BLOCK_N], tl.float32)
    for g in tl.static_range(GROUPS):
        qg = tl.load(Q + (kv_head * GROUPS + g) * stride_qh + d * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
        score += tl.sum(keys * qg[None, :], 1)
    tl.store(OUT + kv_head * stride_oh + n * stride_on, score, mask=n_ok)


def chunk_scores_triton(chunk_keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """As `chunk_scores_reference`: [Hkv, N] fp32, the G query heads of a KV head summed."""
    if chunk_keys.dim() != 3 or query.dim() != 2 or chunk_keys.shape[2] != query.shape[1]:
        raise ValueError(f"chunk scores need chunk_keys [Hkv, N, D] and query [Hq, D], "
                         f"got {tuple(chunk_keys.shape)}, {tuple(query.shape)}")
    reason = chunk_scores_reason(chunk_keys, query)
    if reason:
        raise ValueError(f"Triton chunk scores do not support these inputs: {reason}")
    n_kv_heads, n_chunks, head_dim = chunk_keys.shape
    if n_kv_heads == 0 or query.shape[0] % n_kv_heads:
        raise ValueError(f"{query.shape[0]} query heads are not a multiple of {n_kv_heads} KV heads")
    common.check_device(chunk_keys, query)
    common.check_offsets(chunk_keys=chunk_keys)
    out = common.alloc(n_kv_heads, n_chunks, dtype=torch.float32, device=chunk_keys.device)
    if n_chunks == 0:
        return out
    block_n = 32
    _chunk_scores_kernel[(n_kv_heads, triton.cdiv(n_chunks, block_n))](
        chunk_keys, query, out,
        *chunk_keys.stride(), *query.stride(), *out.stride(),
        n_chunks, head_dim,
        GROUPS=query.shape[0] // n_kv_heads, BLOCK_N=block_n, BLOCK_D=common.block_d(head_dim),
    )
    return out


def select_chunks_triton(chunk_keys: torch.Tensor, query: torch.Tensor, n_select: int) -> torch.Tensor:
    """As `select_chunks_reference`: Triton scores, then torch's top-k (chunk 0 always kept)."""
    return top_chunks(chunk_scores_triton(chunk_keys, query), n_select)
