"""Attention for a few queries (decode steps, verification blocks) on CPU: no mask when none is needed.

The contract of `attention_reference` (q [Hq, T, D], k/v [Hkv, L, D], key positions [L] or
[Hkv, L], causal by positions, optional sliding window, fp32 softmax). In the common decode
step every key is visible to every query (all keys at or before every query, no window): then
the attention is torch's fused SDPA kernel with no mask at all, the G query heads of a KV
head folded into its rows (q [1, Hkv, G*T, D] against k/v [1, Hkv, L, D]: K and V read once,
in place, never repeated for GQA). Otherwise (a block's own new rows, windows, per-head
positions hiding keys) it is `attention_sdpa` with its boolean mask ([Hkv or 1, G*T, L]:
1 byte per key and query row, against the 2*D*4 bytes of K and V per key).
Measured (bench/decode_floor.py, README "CPU decoding against the bandwidth floor"): a
batched-matmul formulation (q [Hkv, G*T, D] @ k^T, fp32 softmax, @ v, an additive mask over
the hidden tail only) was no faster than SDPA at one query and slower at 5 and 16 queries,
and the masked SDPA call costs ~20% more than the maskless one at one query over 2K keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .sdpa import attention_sdpa

DECODE_MAX_QUERIES = 16  # T up to which the dispatch takes this path on CPU (gamma + 1 verification blocks)


def every_key_visible(k_pos: torch.Tensor, q_pos: torch.Tensor, window: int | None) -> bool:
    """Whether every query sees every key: two reductions over the positions (three with a window)."""
    q_lo = int(q_pos.min())
    if int(k_pos.max()) > q_lo:
        return False
    return window is None or int(k_pos.min()) > int(q_pos.max()) - window


def attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention by positions for few queries; same arguments and result as `attention_reference`."""
    hq, t, d = q.shape
    hkv = k.shape[0]
    if t == 0 or k.shape[1] == 0:
        return torch.zeros_like(q)
    if not every_key_visible(k_pos, q_pos, sliding_window):
        return attention_sdpa(q, k, v, q_pos, k_pos, sliding_window)
    out = F.scaled_dot_product_attention(q.reshape(1, hkv, hq // hkv * t, d), k[None], v[None])
    return out.reshape(hq, t, d)
