"""Attention for a few queries (decode, verification blocks) on CPU, at the cache's read bandwidth.

The contract of `attention_reference` (q [Hq, T, D], k/v [Hkv, L, D], key positions [L] or
[Hkv, L], causal by positions, optional sliding window, fp32 softmax), shaped for T small:
- GQA without repeating K/V: the G query heads of a KV head are folded into its rows,
  q [Hkv, G*T, D] @ k^T [Hkv, D, L], one batched matmul that reads K once (the transpose is a
  view: BLAS reads K as it is stored), then probs @ V reads V once;
- no mask at all when every key is visible to every query (the common decode step: all keys
  at or before every query and no window). Otherwise an additive -inf mask over the span of
  keys that some query cannot see (a decode step's own new rows: the last T-1 keys), not over L;
- fp32 inputs are used in place (no copy of the cache); other dtypes are read into fp32 once.
SDPA (`sdpa.py`) stays the path for prefill blocks, where its tiled kernel wins.
"""
from __future__ import annotations

import torch

DECODE_MAX_QUERIES = 16  # T up to which the dispatch takes this path on CPU (gamma + 1 verification blocks)


def _hidden_span(kp: torch.Tensor, q_pos: torch.Tensor, window: int | None) -> tuple[int, int] | None:
    """[start, stop) of the keys that at least one query cannot see (None: every key is visible).
    kp: [Hkv or 1, L]. One pass over the positions (8 bytes a key, against 2*D*4 of K and V);
    the common decode case (no window, every key at or before every query) costs two reductions."""
    q_lo, q_hi = int(q_pos.min()), int(q_pos.max())
    if window is None and int(kp.max()) <= q_lo:
        return None
    hidden = kp > q_lo
    if window is not None:
        hidden |= kp <= q_hi - window
    hidden = hidden.any(0)
    if not bool(hidden.any()):
        return None
    where = hidden.nonzero()
    return int(where[0]), int(where[-1]) + 1


def _span_bias(kp: torch.Tensor, q_pos: torch.Tensor, window: int | None, groups: int) -> torch.Tensor:
    """Additive mask [Hkv or 1, G*T, S] (0 visible, -inf hidden) for key positions kp [Hkv or 1, S];
    row g*T + i of a KV head is query i, as in the folded q."""
    qp = q_pos[None, :, None]
    hidden = kp[:, None, :] > qp
    if window is not None:
        hidden |= qp - kp[:, None, :] >= window
    bias = torch.zeros(hidden.shape, dtype=torch.float32, device=kp.device).masked_fill_(hidden, float("-inf"))
    return bias.repeat(1, groups, 1)


def attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention by positions for few queries; same arguments and result as `attention_reference`."""
    hq, t, d = q.shape
    hkv, length = k.shape[0], k.shape[1]
    groups = hq // hkv
    if t == 0 or length == 0:
        return torch.zeros_like(q)
    kf, vf = (k, v) if k.dtype == torch.float32 else (k.float(), v.float())
    qf = q.float().reshape(hkv, groups * t, d) * d ** -0.5  # scale the few queries, not the L scores
    scores = torch.matmul(qf, kf.transpose(1, 2))  # [Hkv, G*T, L], fp32
    kp = k_pos if k_pos.dim() == 2 else k_pos[None, :]
    span = _hidden_span(kp, q_pos, sliding_window)
    if span is not None:
        a, b = span
        scores[:, :, a:b] += _span_bias(kp[:, a:b], q_pos, sliding_window, groups)
    probs = torch.softmax(scores, dim=-1)
    if span is not None:
        probs = probs.nan_to_num_(nan=0.0)  # a query that sees no key outputs zeros
    out = torch.matmul(probs, vf)  # [Hkv, G*T, D]
    return out.reshape(hq, t, d).to(q.dtype)
