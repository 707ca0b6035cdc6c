"""The StreamingLLM cache for the L1 draft: attention-sink rows + a window of recent rows.

Rotary positions are positions within the cache (as StreamingLLM does): when old rows
are evicted, the kept recent rows move down and their keys are rotated back by the
same number of positions, so the cache always looks like a contiguous sequence.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..kernels import attention
from ..rope import RotaryEmbedding
from .base import KVCache, allocates, grown_capacity, kv_row_bytes, regrown

SPARE_ROWS = 64  # rows past the window: a round's tokens before the eviction
BLOCK = 64


class StreamingCache(KVCache):
    @staticmethod
    def planned_bytes(cfg: ModelConfig, dtype: torch.dtype, window: int) -> int:
        """K/V bytes the cache allocates for a window."""
        return cfg.num_layers * grown_capacity(window + SPARE_ROWS, 0, BLOCK) * kv_row_bytes(cfg, dtype)

    def __init__(self, cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype,
                 sinks: int, window: int, rope: RotaryEmbedding) -> None:
        if not 0 <= sinks < window:
            raise ValueError(f"need 0 <= sinks ({sinks}) < window ({window})")
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.sinks, self.window, self.rope = sinks, window, rope
        self.length = 0
        self.evicted = 0  # rows dropped so far (statistics)
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._reserve(window + SPARE_ROWS)

    @allocates
    def _reserve(self, rows: int) -> None:
        if rows <= self.capacity:
            return
        cap = grown_capacity(rows, self.capacity, block=BLOCK)
        self.k, self.v = regrown(self.k, self.v, self.cfg, cap, self.length, self.device, self.dtype)
        self.capacity = cap

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = k.shape[1]
        end = self.length + n
        if layer == 0:
            self._reserve(end)
        self.k[layer][:, self.length : end] = k
        self.v[layer][:, self.length : end] = v
        k_pos = torch.arange(end, device=q.device)
        return attention(q, self.k[layer][:, :end], self.v[layer][:, :end], k_pos[end - q.shape[1] :], k_pos, None)

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a streaming cache of {self.length} rows to {length}")
        self.length = length

    def evict(self) -> None:
        """Bring the cache back to `window` rows: keep the sinks and the most recent rows."""
        excess = self.length - self.window
        if excess <= 0:
            return
        s, end = self.sinks, self.length
        for layer in range(self.cfg.num_layers):
            kept_k = self.k[layer][:, s + excess : end]
            self.k[layer][:, s : self.window] = self.rope.shift(kept_k, -excess)
            self.v[layer][:, s : self.window] = self.v[layer][:, s + excess : end].clone()
        self.length = self.window
        self.evicted += excess
