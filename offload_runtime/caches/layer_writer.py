"""The cache one layer sees during the layer-major prefill (CausalLM.forward_layer_major).

Chunk after chunk of new rows is written into that layer's buffers (from the full cache's
`open_layer`), and attention runs over everything up to the chunk's end.
"""
from __future__ import annotations

import torch

from ..kernels import attention
from .base import KVCache
from .full import RECENT_QUERIES


class LayerWriter(KVCache):
    def __init__(self, k: torch.Tensor, v: torch.Tensor, start: int, window: int | None) -> None:
        self.k, self.v, self.length, self.window = k, v, start, window
        self.recent: torch.Tensor | None = None  # the last RECENT_QUERIES query rows

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a, b = self.length, self.length + k.shape[1]
        self.k[:, a:b] = k
        self.v[:, a:b] = v
        recent = q if self.recent is None else torch.cat([self.recent, q], dim=1)
        self.recent = recent[:, -RECENT_QUERIES:].clone()
        pos = torch.arange(b, device=q.device)
        self.length = b
        return attention(q, self.k[:, :b], self.v[:, :b], pos[a:], pos, self.window)

    def truncate(self, length: int) -> None:
        raise NotImplementedError("a layer writer only appends")
