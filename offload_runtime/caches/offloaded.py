"""The L3 full cache with host-resident layers: the first `on_chip_layers` layers on the
device, the others in (pinned, on CUDA) host memory, streamed through the transfer
scheduler one layer at a time. Same interface as FullCache, so the engine and the
autoregressive baseline take either.

Every layer stores rows token-major, [capacity, 2 (K, V), Hkv, D]: a row range is one
contiguous block, so a pass copies rows [0, length) of a layer in one DMA and writes
back only the new rows [length, length + n) in another. Everything is allocated once
for the planned capacity and never zeroed (rows at and past `length` are garbage).
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..cuda_streams import SLABS, Backend, LayerPipeline, TransferStats, make_backend
from ..errors import UserError
from ..kernels import attention
from .base import RECENT_QUERIES, FullKVCache, kv_row_bytes

KEEP_NEW_ROWS = 64  # a forward of at most this many tokens keeps its K/V on the device for rows()
__all__ = ["OffloadedCache", "kv_row_bytes", "KEEP_NEW_ROWS"]


class OffloadedCache(FullKVCache):
    fixed_size = True  # allocated once for the planned capacity
    layer_major = True  # a prefill brings each offloaded layer in once, not once per token chunk

    @staticmethod
    def planned_bytes(cfg: ModelConfig, dtype: torch.dtype, capacity: int, on_chip_layers: int,
                      tp: int = 1) -> tuple[int, int, int]:
        """(on-chip K/V, slabs, host K/V) bytes this cache allocates (this rank's share under TP)."""
        layer = capacity * kv_row_bytes(cfg, dtype, tp)
        n_off = cfg.num_layers - on_chip_layers
        return on_chip_layers * layer, min(SLABS, n_off) * layer, n_off * layer

    def __init__(self, cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype, capacity: int,
                 on_chip_layers: int, backend: Backend | None = None, n_slabs: int = SLABS,
                 link_gbps: float | None = None) -> None:
        """link_gbps: the measured host-to-device link, for the reports' link fraction."""
        if not 0 <= on_chip_layers <= cfg.num_layers:
            raise UserError(f"--on-chip-layers {on_chip_layers} must be between 0 and the model's "
                            f"{cfg.num_layers} layers")
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.capacity, self.on_chip_layers = capacity, on_chip_layers
        self.length, self._pass_begun = 0, False  # _pass_begun: layer_ready(0) started the next pass's copies
        self.backend, self.link_gbps = backend if backend is not None else make_backend(self.device), link_gbps
        row = (2, cfg.num_kv_heads, cfg.head_dim)
        n_off = cfg.num_layers - on_chip_layers
        self.on_chip, self.pipeline = [], None  # list[Tensor], LayerPipeline | None
        try:
            self.on_chip = [torch.empty((capacity,) + row, dtype=dtype, device=self.device)
                            for _ in range(on_chip_layers)]
            if n_off:
                self.pipeline = LayerPipeline(self.backend, n_off, row, capacity, dtype, n_slabs)
        except RuntimeError as exc:  # out of device or pinned memory: leave nothing half-allocated
            self.on_chip, self.pipeline = [], None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            gib = kv_row_bytes(cfg, dtype) * capacity * cfg.num_layers / 2**30
            raise UserError(f"cannot allocate the {gib:.1f} GiB full KV cache for {capacity} tokens "
                            f"({on_chip_layers} layers on the device, {n_off} in host memory): "
                            f"{str(exc).splitlines()[0]}") from None
        self.recent_queries: list[torch.Tensor | None] = [None] * cfg.num_layers
        self._new: list[tuple[int, torch.Tensor, torch.Tensor] | None] = [None] * cfg.num_layers
        self.prefill_start = self.prefill_end = self._prefill_from = TransferStats()  # counters around the last prefill

    @property
    def offloaded_layers(self) -> int:
        return self.cfg.num_layers - self.on_chip_layers

    def bytes_per_pass(self, length: int) -> int:
        """Host-to-device bytes of one pass over a cache of `length` rows: the offloaded layers' K/V."""
        return self.offloaded_layers * length * kv_row_bytes(self.cfg, self.dtype)

    def _begin_pass(self, n_new: int) -> None:
        """Layer 0 starts a pass, once (layer_ready(0) may start it before open_layer(0))."""
        if not self._pass_begun:
            if self.length + n_new > self.capacity:
                raise UserError(f"context of {self.length + n_new} tokens is longer than the {self.capacity} "
                                f"tokens the cache was planned for (--max-context)")
            if self.pipeline is not None:
                self.pipeline.begin_pass(self.length)
        self._pass_begun = True

    def layer_ready(self, layer: int, n_new: int) -> bool:
        if layer == 0:
            self._begin_pass(n_new)
        return layer < self.on_chip_layers or self.pipeline.ready_now(layer - self.on_chip_layers)

    def copy_pending(self) -> bool:
        return self.pipeline is not None and self.pipeline.copying()

    def open_layer(self, layer: int, n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Device views (an on-chip buffer, or the slab the layer was streamed into)."""
        if layer == 0:
            self._begin_pass(n_new)
            self._pass_begun = False  # the next layer 0 starts the next pass
        self._new[layer] = None  # rows at and after `length` are being rewritten
        if layer < self.on_chip_layers:
            buf = self.on_chip[layer]
        else:
            buf = self.pipeline.acquire(layer - self.on_chip_layers)
        return buf[:, 0].transpose(0, 1), buf[:, 1].transpose(0, 1)

    def close_layer(self, layer: int, start: int, stop: int) -> None:
        """Rows [start, stop) of `layer` are final: write them back (offloaded layers only)."""
        if layer >= self.on_chip_layers:
            self.pipeline.release(layer - self.on_chip_layers, start, stop)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = k.shape[1]
        start, end = self.length, self.length + n
        k_buf, v_buf = self.open_layer(layer, n)
        k_buf[:, start:end] = k
        v_buf[:, start:end] = v
        self.recent_queries[layer] = q[:, -RECENT_QUERIES:].clone()
        self._new[layer] = (start, k.clone(), v.clone()) if n <= KEEP_NEW_ROWS else None  # not views of q/k/v
        k_pos = torch.arange(end, device=q.device)
        out = attention(q, k_buf[:, :end], v_buf[:, :end], k_pos[end - q.shape[1]:], k_pos,
                             self.cfg.sliding_windows[layer])
        self.close_layer(layer, start, end)
        return out

    def rows(self, layer: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows [start, stop) of a layer, [Hkv, n, D]. Rows of the last short forward come
        from the device (no host read); other rows of offloaded layers are host views."""
        if layer < self.on_chip_layers:
            buf = self.on_chip[layer][start:stop]
        else:
            new = self._new[layer]
            if new is not None and new[0] <= start and stop <= new[0] + new[1].shape[1]:
                a, b = start - new[0], stop - new[0]
                return new[1][:, a:b], new[2][:, a:b]
            buf = self.pipeline.host_rows(layer - self.on_chip_layers, start, stop)
        return buf[:, 0].transpose(0, 1), buf[:, 1].transpose(0, 1)

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} rows to {length}")
        self.length, self._pass_begun = length, False  # (a stepped pass abandoned before layer 0: restart)

    def close(self) -> None:
        self.backend.close(cancel=True)

    # -- reports ------------------------------------------------------------------------------------
    def begin_prefill(self) -> None:
        self._prefill_from = self.backend.collect()  # (an interrupted prefill leaves the last report as it was)

    def end_prefill(self) -> None:
        self.prefill_start, self.prefill_end = self._prefill_from, self.backend.collect()

    def report(self, new_tokens: int, l3_seconds: float | None) -> dict:
        """Offload stats for a result dict: prefill and decode bytes, bytes/token, GB/s, copy waits."""
        pre = self.prefill_end.minus(self.prefill_start)
        dec = self.backend.collect().minus(self.prefill_end)
        gbps, link = dec.h2d_gbps, self.link_gbps or getattr(self.backend, "link_gbps", None)  # (emulated: its own)
        return {
            "offload_backend": self.backend.name,
            "on_chip_layers": self.on_chip_layers,
            "offloaded_layers": self.offloaded_layers,
            "cache_capacity_tokens": self.capacity,
            "host_cache_bytes": self.pipeline.host_bytes if self.pipeline else 0,
            "slab_bytes": self.pipeline.slab_bytes if self.pipeline else 0,
            "prefill_h2d_bytes": pre.h2d_bytes, "prefill_d2h_bytes": pre.d2h_bytes,
            "h2d_bytes": dec.h2d_bytes, "d2h_bytes": dec.d2h_bytes,
            "h2d_bytes_per_token": dec.h2d_bytes / new_tokens if new_tokens else None,
            "h2d_gbps": gbps, "copy_wait_s": dec.wait_s,
            "copy_wait_fraction_of_l3": dec.wait_s / l3_seconds if l3_seconds else None,
            "link_gbps": link,
            "link_fraction": gbps / link if gbps and link else None,
        }
