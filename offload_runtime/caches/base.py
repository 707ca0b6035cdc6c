"""The cache interface the model forward talks to.

A forward of T new tokens asks the cache for their rotary positions, then each layer
hands its rotated q/k and v to `attend`, which stores the new rows and returns attention
over everything the cache holds for that layer; `advance` then makes the rows part of
the cache. Rollback after a rejected speculation is `truncate` (a length, no copy).
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch


class KVCache(ABC):
    length: int

    def positions(self, n: int, device: torch.device) -> torch.Tensor:
        """Rotary positions of the next n tokens (absolute positions by default)."""
        return torch.arange(self.length, self.length + n, device=device)

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k/v [Hkv, T, D] as rows length..length+T of `layer`; return attention of q [Hq, T, D]."""

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


def allocates(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Make a cache's buffers outside inference mode. A buffer created while a forward runs
    (under torch.inference_mode) would be an inference tensor, and the engine's updates
    between forwards (rows written back, evictions) could not write into it."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False):
            return fn(*args, **kwargs)
    return wrapper
