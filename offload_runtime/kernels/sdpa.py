"""Attention by positions on torch's fused scaled_dot_product_attention.

The contract of `attention_reference` (q [Hq, T, D], k/v [Hkv, L, D], key positions [L]
or [Hkv, L]) on SDPA's fused kernels: no fp32 copy of the layer, no repeat of K/V for GQA,
no [queries x keys] fp32 score blocks in Python. The query heads of a KV head are folded
into its rows ([1, Hkv, G*T, D]), as the reference does, because SDPA's enable_gqa with a
mask falls back to the math kernel. It is the CPU fast path (about 4x the reference on a
prefill block) and tested against the reference.

A prefill block (keys at positions 0..L-1, queries the last T of them, no window) needs no mask:
the earlier keys are all visible and the block's own keys are causal. Both halves go through
the CPU flash kernel, which also returns each row's log-sum-exp, and are merged exactly
(`attention_contiguous`): no [G*T, L] mask to build and convert (~30% of a 1K-token block at 2K).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)  # (out, logsumexp)


def is_prefill_block(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     sliding_window: int | None) -> bool:
    """Keys at 0..L-1 and the queries at the last T of them, no window: `attention_contiguous` applies."""
    t, n = q.shape[1], k.shape[1]
    if _FLASH is None or sliding_window is not None or k_pos.dim() != 1 or q.is_cuda or not 0 < t <= n:
        return False
    return (int(k_pos[0]) == 0 and int(k_pos[-1]) == n - 1 and int(q_pos[0]) == n - t and int(q_pos[-1]) == n - 1
            and bool((k_pos[1:] > k_pos[:-1]).all()) and bool((q_pos[1:] > q_pos[:-1]).all()))


def attention_contiguous(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of q [Hq, T, D] (the last T of k/v's L rows) without a mask: the first L-T
    keys unmasked (query heads folded into their KV head's rows), the last T causal (K/V of those T
    rows repeated per query head), merged by their log-sum-exps."""
    hq, t, d = q.shape
    hkv, n = k.shape[0], k.shape[1]
    g, past = hq // hkv, n - t
    kc = k[:, past:].repeat_interleave(g, 0)[None] if g > 1 else k[None, :, past:]
    vc = v[:, past:].repeat_interleave(g, 0)[None] if g > 1 else v[None, :, past:]
    own, own_lse = _FLASH(q[None], kc, vc, 0.0, True)
    if past == 0:
        return own[0]
    early, early_lse = _FLASH(q.reshape(1, hkv, g * t, d), k[None, :, :past], v[None, :, :past], 0.0, False)
    acc = torch.promote_types(q.dtype, torch.float32)  # the merge in fp32 at least (fp64 stays fp64)
    early, early_lse = early.reshape(hq, t, d), early_lse.reshape(hq, t, 1).to(acc)
    own_lse = own_lse[0, :, :, None].to(acc)
    top = torch.maximum(early_lse, own_lse)
    w_early, w_own = torch.exp(early_lse - top), torch.exp(own_lse - top)
    return ((early.to(acc) * w_early + own[0].to(acc) * w_own) / (w_early + w_own)).to(q.dtype)


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                   sliding_window: int | None = None) -> torch.Tensor:
    hq, t, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    if t == 0:
        return torch.empty_like(q)
    if is_prefill_block(q, k, q_pos, k_pos, sliding_window):
        return attention_contiguous(q, k, v)
    kp = k_pos if k_pos.dim() == 2 else k_pos[None, :]  # [Hkv or 1, L]
    qp = q_pos[None, :, None]  # [1, T, 1]
    allowed = kp[:, None, :] <= qp  # [Hkv or 1, T, L]
    if sliding_window is not None:
        allowed = allowed & (qp - kp[:, None, :] < sliding_window)
    allowed = allowed.repeat(1, g, 1)  # row g*T + i of a KV group is query i
    out = F.scaled_dot_product_attention(q.reshape(1, hkv, g * t, d), k[None], v[None], attn_mask=allowed[None])
    return out.reshape(hq, t, d)
