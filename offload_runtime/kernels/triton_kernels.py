"""Triton kernels: chunk scoring, attention over a KV set (split-K), partial attention and merging.

Each public function here has the signature of its `*_reference` twin in reference.py.
They run compiled on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set
before this module was imported (the tests). Loads are cast to fp32 in interpreter mode
(the interpreter computes bf16 arithmetic wrongly) and for fp32 inputs; on CUDA, fp16 and
bf16 operands feed tl.dot directly with fp32 accumulation, as flash attention does.

GQA: the G query heads of one KV head and the T queries are packed into G*T rows that
share each K/V tile, so K/V are read once per KV head and never repeated per query head.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .reference import top_chunks
from .support import attention_reason, chunk_scores_reason, merge_reason

BLOCK_N = 64  # keys per tile
MAX_SPLITS = 128  # key splits of one attention call (flash-decoding); merged by _merge_kernel
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


@triton.jit
def _merge_kernel(
    PART, PLSE, OUT, LSE,
    stride_ps, stride_ph, stride_pt, stride_pd,
    stride_ls, stride_lh, stride_lt,
    stride_oh, stride_ot, stride_od,
    stride_eh, stride_et,
    n_splits, head_dim,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (query head, query): weight each split's output by exp(lse - max)."""
    h = tl.program_id(0)
    t = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < n_splits
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    lse = tl.load(PLSE + s * stride_ls + h * stride_lh + t * stride_lt, mask=s_ok, other=float("-inf")).to(tl.float32)
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)  # 0 for splits that saw no key
    total = tl.sum(w, 0)
    parts = tl.load(PART + s[:, None] * stride_ps + h * stride_ph + t * stride_pt + d[None, :] * stride_pd,
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    total_safe = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(w[:, None] * parts, 0) / total_safe
    tl.store(OUT + h * stride_oh + t * stride_ot + d * stride_od, out.to(OUT.dtype.element_ty), mask=d_ok)
    tl.store(LSE + h * stride_eh + t * stride_et, tl.where(total == 0.0, float("-inf"), m_safe + tl.log(total_safe)))


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


# Triton decides compiled or interpreted when a function is decorated, i.e. at import, from
# TRITON_INTERPRET; triton.language's own helpers (tl.sum's combine function...) were decorated
# when triton was first imported, so both must agree.
INTERPRETED = type(_attention_kernel).__name__ == "InterpretedFunction"
_HELPER = getattr(getattr(tl, "standard", None), "_sum_combine", None)
if _HELPER is not None and INTERPRETED != (type(_HELPER).__name__ == "InterpretedFunction"):
    raise ImportError("triton was first imported with a different TRITON_INTERPRET than the offload_runtime "
                      "kernels: set TRITON_INTERPRET=1 before anything imports triton")


# ---------------------------------------------------------------------------------------------
# Host side: argument checks, launch configuration.


def _alloc(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and scratch buffer comes from here (tests replace it with NaN-filled buffers)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.arange needs a power of two, tl.dot >= 16


def _block_m(rows: int) -> int:
    return min(64, max(16, triton.next_power_of_2(rows)))


def _check_offsets(**tensors: torch.Tensor) -> None:
    """Offsets are computed in 32-bit integers inside the kernels: refuse larger tensors."""
    for name, t in tensors.items():
        extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)
        if extent >= 2**31:
            raise ValueError(f"{name} {tuple(t.shape)} spans {extent} elements: the Triton kernels index with "
                             "32-bit offsets (< 2**31); split it into slabs")


def _check_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"Triton kernels need all tensors on one device, got {sorted(map(str, devices))}")
    device = tensors[0].device
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("Triton kernels got CPU tensors but were not built in interpreter mode: "
                           "set TRITON_INTERPRET=1 before the first kernel call, or use the reference kernels")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Triton kernels run on CUDA (or CPU in interpreter mode), not on {device.type}")


def _check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
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
    _check_device(q, k, v, q_pos, k_pos)
    _check_offsets(q=q, k=k, v=v, k_pos=k_pos)


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
    block_m = _block_m(rows)
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
        GROUPS=groups, HAS_WINDOW=sliding_window is not None, UPCAST=INTERPRETED or q.dtype == torch.float32,
        WRITE_LSE=lse is not None, SKIP_TILES=n_queries > SKIP_TILES_ABOVE,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=_block_d(head_dim),
        # fp32 tiles need fewer pipeline stages to fit shared memory (head_dim 256: 345 KB at 3 stages)
        num_stages=(1 if _block_d(head_dim) > 128 else 2) if q.dtype == torch.float32 else 3,
    )


def _split_plan(q: torch.Tensor, k: torch.Tensor, split_size: int | None) -> tuple[int, int]:
    """(split_len, n_splits): split_len a multiple of BLOCK_N."""
    n_q_heads, n_queries, _ = q.shape
    n_kv_heads, n_keys = k.shape[0], k.shape[1]
    if split_size is None:
        rows = (n_q_heads // n_kv_heads) * n_queries
        row_blocks = triton.cdiv(rows, _block_m(rows))
        n_splits = _num_splits(n_kv_heads, row_blocks, n_keys, q.device)
        split_len = triton.cdiv(triton.cdiv(n_keys, n_splits), BLOCK_N) * BLOCK_N
    else:
        if split_size <= 0 or split_size % BLOCK_N:
            raise ValueError(f"split_size must be a positive multiple of {BLOCK_N}, got {split_size}")
        split_len = split_size
    return split_len, max(1, triton.cdiv(n_keys, split_len))


def _merge(parts: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    n_splits, n_q_heads, n_queries, head_dim = parts.shape
    if n_q_heads * n_queries == 0:
        return
    _merge_kernel[(n_q_heads, n_queries)](
        parts, part_lse, out, lse,
        *parts.stride(), *part_lse.stride(), *out.stride(), *lse.stride(),
        n_splits, head_dim,
        BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_D=_block_d(head_dim),
    )


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
    parts = _alloc(n_splits, n_q_heads, n_queries, head_dim, dtype=torch.float32, device=q.device)
    part_lse = _alloc(n_splits, n_q_heads, n_queries, dtype=torch.float32, device=q.device)
    _launch_attention(q, k, v, q_pos, k_pos, sliding_window, parts, part_lse, split_len, n_splits)
    if lse is None:
        lse = _alloc(n_q_heads, n_queries, dtype=torch.float32, device=q.device)
    _merge(parts, part_lse, out, lse)


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     sliding_window: int | None = None, split_size: int | None = None) -> torch.Tensor:
    """As `attention_reference`: [Hq, T, D] in q's dtype; fp32 softmax and accumulation.
    split_size (a multiple of BLOCK_N) forces the key splits, for tests; None picks them."""
    _check_attention(q, k, v, q_pos, k_pos)
    out = _alloc(*q.shape, dtype=q.dtype, device=q.device)
    _attend(q, k, v, q_pos, k_pos, sliding_window, split_size, out, None)
    return out


def attention_partial_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                             k_pos: torch.Tensor, sliding_window: int | None = None,
                             split_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As `attention_partial_reference`: (out [Hq, T, D] fp32, lse [Hq, T] fp32) over one slab."""
    _check_attention(q, k, v, q_pos, k_pos)
    n_q_heads, n_queries, head_dim = q.shape
    out = _alloc(n_q_heads, n_queries, head_dim, dtype=torch.float32, device=q.device)
    lse = _alloc(n_q_heads, n_queries, dtype=torch.float32, device=q.device)
    _attend(q, k, v, q_pos, k_pos, sliding_window, split_size, out, lse)
    return out, lse


def merge_partials_triton(outs: torch.Tensor, lses: torch.Tensor,
                          out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """As `merge_partials_reference`: outs [S, Hq, T, D], lses [S, Hq, T] -> (out, lse)."""
    if outs.dim() != 4 or lses.shape != outs.shape[:3]:
        raise ValueError(f"merge needs outs [S, Hq, T, D] and lses [S, Hq, T], got {tuple(outs.shape)}, {tuple(lses.shape)}")
    reason = merge_reason(outs, lses, out_dtype)
    if reason:
        raise ValueError(f"Triton merge does not support these inputs: {reason}")
    _check_device(outs, lses)
    n_splits, n_q_heads, n_queries, head_dim = outs.shape
    out = _alloc(n_q_heads, n_queries, head_dim, dtype=out_dtype, device=outs.device)
    lse = _alloc(n_q_heads, n_queries, dtype=torch.float32, device=outs.device)
    if n_splits == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    _merge(outs, lses, out, lse)
    return out, lse


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
    _check_device(chunk_keys, query)
    _check_offsets(chunk_keys=chunk_keys)
    out = _alloc(n_kv_heads, n_chunks, dtype=torch.float32, device=chunk_keys.device)
    if n_chunks == 0:
        return out
    block_n = 32
    _chunk_scores_kernel[(n_kv_heads, triton.cdiv(n_chunks, block_n))](
        chunk_keys, query, out,
        *chunk_keys.stride(), *query.stride(), *out.stride(),
        n_chunks, head_dim,
        GROUPS=query.shape[0] // n_kv_heads, BLOCK_N=block_n, BLOCK_D=_block_d(head_dim),
    )
    return out


def select_chunks_triton(chunk_keys: torch.Tensor, query: torch.Tensor, n_select: int) -> torch.Tensor:
    """As `select_chunks_reference`: Triton scores, then torch's top-k (chunk 0 always kept)."""
    return top_chunks(chunk_scores_triton(chunk_keys, query), n_select)

