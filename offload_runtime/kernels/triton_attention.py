"""Triton attention over a KV set: any number of queries, keys split across programs (flash-decoding).

`attention_triton` and `attention_partial_triton` have the signatures of their `*_reference` twins
in reference.py. One kernel serves decode and prefill. Decode (gamma+1 queries): the G query
heads x T queries of a KV head share one tile and the keys are split across programs, then merged
(triton_merge.py); the K/V loads have no branch around them, so Triton pipelines them. Prefill
(more than SKIP_TILES_ABOVE queries): tiles of 64 queries, and a key tile that no query of the
tile can see by position (causal, sliding window) is skipped.

Loads are cast to fp32 in interpreter mode (the interpreter computes bf16 arithmetic wrongly) and
for fp32 inputs; on CUDA, fp16 and bf16 operands feed tl.dot directly with fp32 accumulation, as
flash attention does. GQA: the G query heads of one KV head and the T queries are packed into G*T
rows that share each K/V tile, so K/V are read once per KV head and never repeated per query head.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .support import attention_reason
from .triton_merge import merge

BLOCK_N = 64  # keys per tile
MAX_SPLITS = 128  # key splits of one attention call (flash-decoding); merged by triton_merge
SKIP_TILES_ABOVE = 16  # more queries (prefill): skip invisible key tiles; fewer (decode): pipelined loads
_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(q, k_ptrs, v_ptrs, visible, col_ok, d_ok, scale_log2, m_i, l_i, acc, UPCAST: tl.constexpr):
    """Online-softmax update of (m_i, l_i, acc) with one [BLOCK_N] tile of keys and values."""
    kt = tl.load(k_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
    if UPCAST:
        kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    s = tl.where(visible, s * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: avoid -inf - -inf
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    if UPCAST:
        v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _attention_kernel(
    Q, K, V, QPOS, KPOS, OUT, LSE,
    stride_qh, stride_qt, stride_qd,
    stride_kh, stride_kl, stride_kd,
    stride_vh, stride_vl, stride_vd,
    stride_qp, stride_kph, stride_kpl,
    stride_os, stride_oh, stride_ot, stride_od,
    stride_ls, stride_lh, stride_lt,
    n_queries, n_keys, head_dim, split_len, scale_log2, window,
    GROUPS: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, WRITE_LSE: tl.constexpr,
    SKIP_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: one KV head, BLOCK_M packed (query head, query) rows, one split of the keys.
    Writes the split's normalised output and (optionally) its log-sum-exp (natural log)."""
    kv_head = tl.program_id(0)
    row_block = tl.program_id(1)
    split = tl.program_id(2)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUPS * n_queries
    q_head = kv_head * GROUPS + rows // n_queries
    t = rows % n_queries
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(Q + q_head[:, None] * stride_qh + t[:, None] * stride_qt + d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = tl.load(QPOS + t * stride_qp, mask=row_ok, other=0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of base-2 scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    start = split * split_len
    stop = tl.minimum(start + split_len, n_keys)
    n = tl.arange(0, BLOCK_N)
    k_ptrs = K + kv_head * stride_kh + (start + n)[None, :] * stride_kl + d[:, None] * stride_kd  # [BLOCK_D, BLOCK_N]
    v_ptrs = V + kv_head * stride_vh + (start + n)[:, None] * stride_vl + d[None, :] * stride_vd  # [BLOCK_N, BLOCK_D]
    kp_ptrs = KPOS + kv_head * stride_kph + (start + n) * stride_kpl
    for n0 in range(start, stop, BLOCK_N):
        col_ok = n0 + n < stop
        k_pos = tl.load(kp_ptrs, mask=col_ok, other=0)
        visible = row_ok[:, None] & col_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
        if SKIP_TILES:  # prefill: skip K/V tiles no row can see (causal, window)
            if tl.max(visible.to(tl.int32)) > 0:
                m_i, l_i, acc = _attend_tile(q, k_ptrs, v_ptrs, visible, col_ok, d_ok, scale_log2, m_i, l_i, acc, UPCAST)
        else:  # decode: no branch around the loads, so the compiler can pipeline them
            m_i, l_i, acc = _attend_tile(q, k_ptrs, v_ptrs, visible, col_ok, d_ok, scale_log2, m_i, l_i, acc, UPCAST)
        k_ptrs += BLOCK_N * stride_kl
        v_ptrs += BLOCK_N * stride_vl
        kp_ptrs += BLOCK_N * stride_kpl

    empty = l_i == 0.0  # this query saw no key of this split
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(OUT + split * stride_os + q_head[:, None] * stride_oh + t[:, None] * stride_ot + d[None, :] * stride_od,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if WRITE_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # ln 2
        tl.store(LSE + split * stride_ls + q_head * stride_lh + t * stride_lt, lse, mask=row_ok)


def check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                     k_pos: torch.Tensor) -> None:
    reason = attention_reason(q, k, v, q_pos, k_pos)
    if reason:
        raise ValueError(f"Triton attention does not support these inputs: {reason}")
    n_q_heads, n_queries, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[0], k.shape[1]
    if k.shape != v.shape or k.shape[2] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [Hkv, L, {head_dim}]")
    if n_kv_heads == 0 or n_q_heads % n_kv_heads:
        raise ValueError(f"{n_q_heads} query heads are not a multiple of {n_kv_heads} KV heads")
    if q_pos.shape != (n_queries,):
        raise ValueError(f"q_pos must be [{n_queries}], got {tuple(q_pos.shape)}")
    if k_pos.shape not in ((n_keys,), (n_kv_heads, n_keys)):
        raise ValueError(f"k_pos must be [{n_keys}] or [{n_kv_heads}, {n_keys}], got {tuple(k_pos.shape)}")
    common.check_device(q, k, v, q_pos, k_pos)
    common.check_offsets(q=q, k=k, v=v, k_pos=k_pos)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(n_kv_heads: int, row_blocks: int, n_keys: int, device: torch.device) -> int:
    """Split the keys so that the grid fills the GPU about twice (flash-decoding); one split on CPU."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = max(1, (2 * sms) // max(1, n_kv_heads * row_blocks))
    return max(1, min(want, MAX_SPLITS, triton.cdiv(n_keys, 4 * BLOCK_N)))


def _launch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                      sliding_window: int | None, out: torch.Tensor, lse: torch.Tensor | None, split_len: int,
                      n_splits: int) -> None:
    n_q_heads, n_queries, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[0], k.shape[1]
    groups = n_q_heads // n_kv_heads
    rows = groups * n_queries
    block_m = common.block_m(rows)
    kp_h, kp_l = (k_pos.stride(0), k_pos.stride(1)) if k_pos.dim() == 2 else (0, k_pos.stride(0))
    out = out if out.dim() == 4 else out.unsqueeze(0)  # [splits, Hq, T, D]
    if lse is None:  # WRITE_LSE is False: the pointer is never used
        lse_t, ls = out, (0, 0, 0)
    else:
        lse_t = lse if lse.dim() == 3 else lse.unsqueeze(0)  # [splits, Hq, T]
        ls = lse_t.stride()
    grid = (n_kv_heads, triton.cdiv(rows, block_m), n_splits)
    _attention_kernel[grid](
        q, k, v, q_pos, k_pos, out, lse_t,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        q_pos.stride(0), kp_h, kp_l,
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        ls[0], ls[1], ls[2],
        n_queries, n_keys, head_dim, split_len, (head_dim ** -0.5) * _LOG2E,
        sliding_window if sliding_window is not None else 0,
        GROUPS=groups, HAS_WINDOW=sliding_window is not None, UPCAST=common.INTERPRETED or q.dtype == torch.float32,
        WRITE_LSE=lse is not None, SKIP_TILES=n_queries > SKIP_TILES_ABOVE,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=common.block_d(head_dim),
        # fp32 tiles need fewer pipeline stages to fit shared memory (head_dim 256: 345 KB at 3 stages)
        num_stages=(1 if common.block_d(head_dim) > 128 else 2) if q.dtype == torch.float32 else 3,
    )


def _split_plan(q: torch.Tensor, k: torch.Tensor, split_size: int | None) -> tuple[int, int]:
    """(split_len, n_splits): split_len a multiple of BLOCK_N."""
    n_q_heads, n_queries, _ = q.shape
    n_kv_heads, n_keys = k.shape[0], k.shape[1]
    if split_size is None:
        rows = (n_q_heads // n_kv_heads) * n_queries
        row_blocks = triton.cdiv(rows, common.block_m(rows))
        n_splits = _num_splits(n_kv_heads, row_blocks, n_keys, q.device)
        split_len = triton.cdiv(triton.cdiv(n_keys, n_splits), BLOCK_N) * BLOCK_N
    else:
        if split_size <= 0 or split_size % BLOCK_N:
            raise ValueError(f"split_size must be a positive multiple of {BLOCK_N}, got {split_size}")
        split_len = split_size
    return split_len, max(1, triton.cdiv(n_keys, split_len))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
            sliding_window: int | None, split_size: int | None, out: torch.Tensor, lse: torch.Tensor | None) -> None:
    """Fill out [Hq, T, D] (and lse [Hq, T] if given): one launch, or split keys + merge."""
    n_q_heads, n_queries, head_dim = q.shape
    if n_queries == 0:
        return
    if k.shape[1] == 0:  # no keys: nothing is visible
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return
    split_len, n_splits = _split_plan(q, k, split_size)
    if n_splits == 1:
        _launch_attention(q, k, v, q_pos, k_pos, sliding_window, out, lse, split_len, 1)
        return
    parts = common.alloc(n_splits, n_q_heads, n_queries, head_dim, dtype=torch.float32, device=q.device)
    part_lse = common.alloc(n_splits, n_q_heads, n_queries, dtype=torch.float32, device=q.device)
    _launch_attention(q, k, v, q_pos, k_pos, sliding_window, parts, part_lse, split_len, n_splits)
    if lse is None:
        lse = common.alloc(n_q_heads, n_queries, dtype=torch.float32, device=q.device)
    merge(parts, part_lse, out, lse)


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     sliding_window: int | None = None, split_size: int | None = None) -> torch.Tensor:
    """As `attention_reference`: [Hq, T, D] in q's dtype; fp32 softmax and accumulation.
    split_size (a multiple of BLOCK_N) forces the key splits, for tests; None picks them."""
    check_attention(q, k, v, q_pos, k_pos)
    out = common.alloc(*q.shape, dtype=q.dtype, device=q.device)
    _attend(q, k, v, q_pos, k_pos, sliding_window, split_size, out, None)
    return out


def attention_partial_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                             k_pos: torch.Tensor, sliding_window: int | None = None,
                             split_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As `attention_partial_reference`: (out [Hq, T, D] fp32, lse [Hq, T] fp32) over one slab."""
    check_attention(q, k, v, q_pos, k_pos)
    n_q_heads, n_queries, head_dim = q.shape
    out = common.alloc(n_q_heads, n_queries, head_dim, dtype=torch.float32, device=q.device)
    lse = common.alloc(n_q_heads, n_queries, dtype=torch.float32, device=q.device)
    _attend(q, k, v, q_pos, k_pos, sliding_window, split_size, out, lse)
    return out, lse
