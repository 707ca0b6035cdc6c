"""Triton merge of partial attentions over disjoint key sets (their outputs and log-sum-exps).

It joins the key splits of one attention call (triton_attention.py), and `merge_partials_triton`
(the signature of `merge_partials_reference`) joins partials over slabs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .support import merge_reason


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


def merge(parts: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fill out [Hq, T, D] and lse [Hq, T] from parts [S, Hq, T, D] and their part_lse [S, Hq, T]."""
    n_splits, n_q_heads, n_queries, head_dim = parts.shape
    if n_q_heads * n_queries == 0:
        return
    _merge_kernel[(n_q_heads, n_queries)](
        parts, part_lse, out, lse,
        *parts.stride(), *part_lse.stride(), *out.stride(), *lse.stride(),
        n_splits, head_dim,
        BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_D=common.block_d(head_dim),
    )


def merge_partials_triton(outs: torch.Tensor, lses: torch.Tensor,
                          out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """As `merge_partials_reference`: outs [S, Hq, T, D], lses [S, Hq, T] -> (out, lse)."""
    if outs.dim() != 4 or lses.shape != outs.shape[:3]:
        raise ValueError(f"merge needs outs [S, Hq, T, D] and lses [S, Hq, T], got {tuple(outs.shape)}, {tuple(lses.shape)}")
    reason = merge_reason(outs, lses, out_dtype)
    if reason:
        raise ValueError(f"Triton merge does not support these inputs: {reason}")
    common.check_device(outs, lses)
    n_splits, n_q_heads, n_queries, head_dim = outs.shape
    out = common.alloc(n_q_heads, n_queries, head_dim, dtype=out_dtype, device=outs.device)
    lse = common.alloc(n_q_heads, n_queries, dtype=torch.float32, device=outs.device)
    if n_splits == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    merge(outs, lses, out, lse)
    return out, lse
