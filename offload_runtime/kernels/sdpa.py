"""Attention by positions on torch's fused scaled_dot_product_attention.

The contract of `attention_reference` (q [Hq, T, D], k/v [Hkv, L, D], key positions [L]
or [Hkv, L]) on SDPA's fused kernels: no fp32 copy of the layer, no repeat of K/V for GQA,
no [queries x keys] fp32 score blocks in Python. The query heads of a KV head are folded
into its rows ([1, Hkv, G*T, D]), as the reference does, because SDPA's enable_gqa with a
mask falls back to the math kernel. It is the CPU fast path (about 4x the reference on a
prefill block) and tested against the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                   sliding_window: int | None = None) -> torch.Tensor:
    hq, t, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    if t == 0:
        return torch.empty_like(q)
    kp = k_pos if k_pos.dim() == 2 else k_pos[None, :]  # [Hkv or 1, L]
    qp = q_pos[None, :, None]  # [1, T, 1]
    allowed = kp[:, None, :] <= qp  # [Hkv or 1, T, L]
    if sliding_window is not None:
        allowed = allowed & (qp - kp[:, None, :] < sliding_window)
    allowed = allowed.repeat(1, g, 1)  # row g*T + i of a KV group is query i
    out = F.scaled_dot_product_attention(q.reshape(1, hkv, g * t, d), k[None], v[None], attn_mask=allowed[None])
    return out.reshape(hq, t, d)
