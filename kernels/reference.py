"""Pure-PyTorch reference kernels. They are the CPU path and the oracle for the Triton kernels."""
from __future__ import annotations

import torch

_QUERY_BLOCK = 256  # bounds the [heads, queries, keys] score matrix during long prefills


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention by positions, GQA without repeating K/V.

    q: [Hq, T, D]; k, v: [Hkv, L, D]; q_pos: [T]; k_pos: [L] or [Hkv, L] (absolute
    positions of the cached rows). Query at position p sees key at position j iff
    j <= p (and p - j < sliding_window). Softmax in fp32; output [Hq, T, D] in q's dtype.
    """
    n_q_heads, n_queries, head_dim = q.shape
    n_kv_heads = k.shape[0]
    groups = n_q_heads // n_kv_heads
    out = torch.empty_like(q)
    if n_queries == 0:
        return out
    scale = head_dim ** -0.5
    kf, vf = k.float(), v.float()
    kp = k_pos if k_pos.dim() == 2 else k_pos[None, :]  # [Hkv or 1, L]
    for start in range(0, n_queries, _QUERY_BLOCK):
        stop = min(start + _QUERY_BLOCK, n_queries)
        t = stop - start
        qb = q[:, start:stop].float().reshape(n_kv_heads, groups * t, head_dim)
        scores = torch.matmul(qb, kf.transpose(1, 2)) * scale  # [Hkv, G*t, L]
        qp = q_pos[start:stop][None, :, None]  # [1, t, 1]
        allowed = kp[:, None, :] <= qp  # [Hkv|1, t, L]
        if sliding_window is not None:
            allowed = allowed & (qp - kp[:, None, :] < sliding_window)
        allowed = allowed.repeat(1, groups, 1)  # row g*t+i of a KV group is query i
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)  # a query with no visible key outputs zeros
        ob = torch.matmul(probs, vf)  # [Hkv, G*t, D]
        out[:, start:stop] = ob.reshape(n_q_heads, t, head_dim).to(q.dtype)
    return out


def chunk_scores_reference(chunk_keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Score of each chunk for each KV head: chunk_keys [Hkv, N, D] (mean key per chunk),
    query [Hq, D]. The query heads sharing a KV head add their scores (GQA). Returns [Hkv, N] fp32."""
    n_kv_heads = chunk_keys.shape[0]
    groups = query.shape[0] // n_kv_heads
    qg = query.float().reshape(n_kv_heads, groups, -1)  # [Hkv, G, D]
    return torch.matmul(qg, chunk_keys.float().transpose(1, 2)).sum(1)  # [Hkv, N]


def select_chunks_reference(chunk_keys: torch.Tensor, query: torch.Tensor, n_select: int) -> torch.Tensor:
    """Indices [Hkv, n_select] (ascending) of the chunks kept per KV head: chunk 0 (attention
    sinks) always, then the best-scoring others."""
    n_chunks = chunk_keys.shape[1]
    n_select = min(n_select, n_chunks)
    scores = chunk_scores_reference(chunk_keys, query)
    scores[:, 0] = float("inf")
    return scores.topk(n_select, dim=-1).indices.sort(dim=-1).values
