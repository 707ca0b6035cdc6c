"""Pure-PyTorch reference kernels. They are the CPU path and the oracle for the Triton kernels."""
from __future__ import annotations

from typing import Callable, Iterable

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
    return top_chunks(chunk_scores_reference(chunk_keys, query), n_select)


def top_chunks(scores: torch.Tensor, n_select: int) -> torch.Tensor:
    """Ascending indices [Hkv, min(n_select, N)] of the best chunks by scores [Hkv, N], chunk 0 first
    (shared by the reference and the Triton selection, so they differ only in the scores)."""
    n_chunks = scores.shape[1]
    n_select = max(0, min(n_select, n_chunks))
    if n_chunks == 0:
        return torch.empty(scores.shape[0], 0, dtype=torch.long, device=scores.device)
    scores = scores.clone()
    scores[:, 0] = float("inf")
    return scores.topk(n_select, dim=-1).indices.sort(dim=-1).values


def attention_partial_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q against ONE slab of keys, kept mergeable with other slabs' results.

    Same arguments and mask as `attention_reference`. Returns (out [Hq, T, D] fp32,
    lse [Hq, T] fp32): out is normalised over this slab only and lse is the log-sum-exp
    of its scaled scores; a query that sees no key of the slab gets out 0, lse -inf.
    """
    n_q_heads, n_queries, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[0], k.shape[1]
    groups = n_q_heads // n_kv_heads
    out = torch.zeros(n_q_heads, n_queries, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.full((n_q_heads, n_queries), float("-inf"), dtype=torch.float32, device=q.device)
    if n_queries == 0 or n_keys == 0:
        return out, lse
    scale = head_dim ** -0.5
    kf, vf = k.float(), v.float()
    kp = k_pos if k_pos.dim() == 2 else k_pos[None, :]
    for start in range(0, n_queries, _QUERY_BLOCK):
        stop = min(start + _QUERY_BLOCK, n_queries)
        t = stop - start
        qb = q[:, start:stop].float().reshape(n_kv_heads, groups * t, head_dim)
        scores = torch.matmul(qb, kf.transpose(1, 2)) * scale  # [Hkv, G*t, L]
        qp = q_pos[start:stop][None, :, None]
        allowed = kp[:, None, :] <= qp
        if sliding_window is not None:
            allowed = allowed & (qp - kp[:, None, :] < sliding_window)
        allowed = allowed.repeat(1, groups, 1)
        scores = scores.masked_fill(~allowed, float("-inf"))
        lse_b = torch.logsumexp(scores, dim=-1)  # [Hkv, G*t]; -inf where nothing is visible
        probs = torch.exp(scores - lse_b[..., None]).nan_to_num(nan=0.0)
        out[:, start:stop] = torch.matmul(probs, vf).reshape(n_q_heads, t, head_dim)
        lse[:, start:stop] = lse_b.reshape(n_q_heads, t)
    return out, lse


def merge_partials_reference(
    outs: torch.Tensor, lses: torch.Tensor, out_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine S partial attentions over disjoint key sets into the attention over their union.

    outs [S, Hq, T, D] fp32, lses [S, Hq, T] fp32 (from `attention_partial_*`). Returns
    (out [Hq, T, D] in out_dtype, lse [Hq, T] fp32); queries that saw no key anywhere get 0, -inf.
    """
    lse = torch.logsumexp(lses.float(), dim=0)  # [Hq, T]
    weights = torch.exp(lses.float() - lse[None]).nan_to_num(nan=0.0)  # -inf - -inf: no keys at all
    out = (weights[..., None] * outs.float()).sum(0)
    return out.to(out_dtype), lse


Slab = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (k [Hkv, S, D], v [Hkv, S, D], k_pos [S] or [Hkv, S])
PartialFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
MergeFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def merge_streamed(q: torch.Tensor, slabs: Iterable[Slab], q_pos: torch.Tensor, sliding_window: int | None,
                   partial: PartialFn, merge: MergeFn) -> torch.Tensor:
    """Attention of q over the union of the slabs, each attended as it arrives and folded into a
    running (out, lse): a layer's attention can start on the first slab of a streamed cache."""
    acc: tuple[torch.Tensor, torch.Tensor] | None = None
    for k, v, k_pos in slabs:
        part = partial(q, k, v, q_pos, k_pos, sliding_window)
        acc = part if acc is None else merge(torch.stack([acc[0], part[0]]), torch.stack([acc[1], part[1]]))
    if acc is None:  # no slab at all: nothing is visible
        return torch.zeros_like(q)
    return acc[0].to(q.dtype)


def streamed_attention_reference(q: torch.Tensor, slabs: Iterable[Slab], q_pos: torch.Tensor,
                                 sliding_window: int | None = None) -> torch.Tensor:
    """`attention_reference` over a cache given as slabs of rows (any split), merged by log-sum-exp."""
    return merge_streamed(q, slabs, q_pos, sliding_window, attention_partial_reference, merge_partials_reference)
