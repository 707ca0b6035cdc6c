"""The full KV cache: every token, every layer. L3 of the hierarchy and the autoregressive baseline."""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..kernels import attention
from .base import RECENT_QUERIES, FullKVCache, allocates, grown_capacity, kv_row_bytes, regrown


class FullCache(FullKVCache):
    """Rows [0, length) of K (rotated) and V per layer, in one growing buffer per layer, on the device."""

    @staticmethod
    def planned_bytes(cfg: ModelConfig, dtype: torch.dtype, tokens: int, layers: int | None = None, tp: int = 1) -> int:
        """Memory of `layers` (default: all) layers' K/V for `tokens` rows (this rank's share under TP)."""
        return (cfg.num_layers if layers is None else layers) * tokens * kv_row_bytes(cfg, dtype, tp)

    def __init__(self, cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype, capacity: int = 0) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.length = 0
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.recent_queries: list[torch.Tensor | None] = [None] * cfg.num_layers
        self._reserve(capacity)

    @allocates
    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity and self.k:
            return
        cap = grown_capacity(needed, self.capacity)
        self.k, self.v = regrown(self.k, self.v, self.cfg, cap, self.length, self.device, self.dtype)
        self.capacity = cap

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = k.shape[1]
        end = self.length + n
        if layer == 0:
            self._reserve(end)
        self.k[layer][:, self.length : end] = k
        self.v[layer][:, self.length : end] = v
        self.recent_queries[layer] = q[:, -RECENT_QUERIES:].clone()
        k_pos = torch.arange(end, device=q.device)
        return attention(
            q, self.k[layer][:, :end], self.v[layer][:, :end], k_pos[end - q.shape[1] :], k_pos,
            self.cfg.sliding_windows[layer],
        )

    def one_token_rows(self) -> tuple[list[torch.Tensor], list[torch.Tensor], int] | None:
        row = self.length  # the token at position `row` sees rows 0..row unless a window ends before row 0
        if any(w is not None and row >= w for w in self.cfg.sliding_windows):
            return None
        self._reserve(row + 1)
        return self.k, self.v, row

    def one_token_queries(self, queries: torch.Tensor) -> None:
        self.recent_queries = list(queries.unbind(0))  # as attend keeps them: this forward's queries

    def open_layer(self, layer: int, n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == 0:
            self._reserve(self.length + n_new)
        return self.k[layer], self.v[layer]

    def close_layer(self, layer: int, start: int, stop: int) -> None:
        pass  # nothing to write back: the buffer is the cache

    def rows(self, layer: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][:, start:stop], self.v[layer][:, start:stop]

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} rows to {length}")
        self.length = length
