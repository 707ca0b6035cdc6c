"""The cache interfaces: what the model forward talks to (KVCache), and what L3 owns (FullKVCache).

A forward of T new tokens asks the cache for their rotary positions, then each layer
hands its rotated q/k and v to `attend`, which stores the new rows and returns attention
over everything the cache holds for that layer; `advance` then makes the rows part of
the cache. Rollback after a rejected speculation is `truncate` (a length, no copy).

FullKVCache is the contract of the L3 full cache (on the device: FullCache; host-resident:
OffloadedCache), so the engine, the prefill and the planner never ask which one they hold.
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

RECENT_QUERIES = 64  # query rows kept per layer, for (re-)building the retrieval selection


class KVCache(ABC):
    length: int

    def positions(self, n: int, device: torch.device) -> torch.Tensor:
        """Rotary positions of the next n tokens (absolute positions by default)."""
        return torch.arange(self.length, self.length + n, device=device)

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k/v [Hkv, T, D] as rows length..length+T of `layer`; return attention of q [Hq, Tq, D],
        the queries of the last Tq <= T of those rows (a prompt's last layer needs only its last rows)."""

    def one_token_rows(self) -> tuple[list[torch.Tensor], list[torch.Tensor], int] | None:
        """For the compiled one-token step (compiled.py): every layer's K and V buffers [Hkv, rows, D]
        and the row the next token's K/V goes to (reserved), when that token attends to rows
        [0, row] of each buffer with no mask; None (the default) when this cache cannot say so."""
        return None

    def one_token_queries(self, queries: torch.Tensor) -> None:
        """The compiled step's rotated queries, [layers, Hq, 1, D] (what `attend` would have seen)."""

    def advance(self, n: int) -> None:
        """Called once per forward, after every layer has attended."""
        self.length += n

    @abstractmethod
    def truncate(self, length: int) -> None:
        """Forget rows at and after `length` (rollback of rejected tokens)."""


def grown_capacity(needed: int, current: int, block: int = 256) -> int:
    """Geometric growth in whole blocks, so appends are amortised O(1)."""
    cap = max(current, block)
    while cap < needed:
        cap *= 2
    return -(-cap // block) * block


def regrown(k: list[torch.Tensor], v: list[torch.Tensor], cfg: Any, rows: int, keep: int,
            device: torch.device, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """New per-layer K and V buffers [Hkv, rows, D] holding the first `keep` rows of the old ones
    (a cache outgrowing its allocation)."""
    shape = (cfg.num_kv_heads, rows, cfg.head_dim)
    new_k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
    new_v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
    for old, new in zip(k + v, new_k + new_v):
        new[:, :keep].copy_(old[:, :keep])
    return new_k, new_v


def allocates(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Make a cache's buffers outside inference mode. A buffer created while a forward runs
    (under torch.inference_mode) would be an inference tensor, and the engine's updates
    between forwards (rows written back, evictions) could not write into it."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False):
            return fn(*args, **kwargs)
    return wrapper


def kv_row_bytes(cfg: Any, dtype: torch.dtype, tp: int = 1) -> int:
    """Bytes of one token's K and V in one layer (this rank's share of the KV heads under TP)."""
    return 2 * (cfg.num_kv_heads // tp) * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()


class FullKVCache(KVCache):
    """The L3 cache: every context row of every layer, readable back (`rows`) for the retrieval
    selection, writable a layer at a time (`open_layer`/`close_layer`) for the layer-major prefill.

    - `capacity`: rows allocated; `fixed_size`: True when it cannot grow past them (a context is
      then limited to `capacity` tokens).
    - `recent_queries[layer]`: the last RECENT_QUERIES query rows [Hq, n, D] (re-retrieval).
    - `layer_major`: whether a prefill should go layer by layer (each layer's K/V crosses the link once).
    - `begin_prefill`/`end_prefill` bracket a prefill, so `report` tells its traffic apart from the
      decode's; `report` is empty for a cache without traffic.
    """

    capacity: int
    fixed_size: bool = False
    layer_major: bool = False
    recent_queries: list[torch.Tensor | None]

    @abstractmethod
    def rows(self, layer: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows [start, stop) of a layer, [Hkv, n, D]."""

    @abstractmethod
    def open_layer(self, layer: int, n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V buffers [Hkv, capacity, D] of `layer` with rows [0, length) in place, for writing rows
        [length, length + n_new); close_layer ends the access. Layer 0 starts a pass."""

    def layer_ready(self, layer: int, n_new: int) -> bool:
        """Would open_layer(layer) run without waiting for a copy? (never blocks; on-device caches: always)"""
        return True

    def copy_pending(self) -> bool:
        """Is a copy into the device still in flight, so work the host does now does not hold the pass up
        (the link stays busy)? Never blocks; on-device caches: no copies."""
        return False

    @abstractmethod
    def close_layer(self, layer: int, start: int, stop: int) -> None:
        """Rows [start, stop) of `layer` are final."""

    def begin_prefill(self) -> None:
        """A prefill starts (transfer counters are marked)."""

    def end_prefill(self) -> None:
        """The prefill is done: later traffic is the decode's."""

    def close(self) -> None:
        """The cache's last use: stop what it runs beside the compute (a copy engine) now, in order,
        before the interpreter exits. Copies not yet run are dropped."""

    def report(self, new_tokens: int, l3_seconds: float | None) -> dict:
        """Traffic statistics for an answer's result (none for an on-device cache)."""
        return {}
