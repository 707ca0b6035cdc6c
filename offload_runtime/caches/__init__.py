"""The per-layer K/V caches attention runs against: full (L3), retrieval (L2), streaming (L1)."""
from .base import FullKVCache, KVCache
from .full import FullCache

__all__ = ["KVCache", "FullKVCache", "FullCache"]
