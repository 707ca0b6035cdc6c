"""The tokens of one growing context and the target's caches that hold them (L3 full, L2 retrieval).

`tokens` is the truth. The full cache holds a prefix of it: every token after a catch-up,
all but the newest during generation (the newest token's K/V is written by the next L3
pass). `catch_up` is the one prefill dispatch: layer-major when the cache asks for it
(each host-resident layer crosses the link once, and the retrieval selection is built
on the way), token chunks otherwise. With a KV store (kv_store.py) the rows of a cached
prefix are read from disk first and new full blocks are saved after the prefill. After an interruption `truncate(len(tokens))` keeps
only rows that match committed tokens; the next catch-up refeeds the rest.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from .caches.base import FullKVCache
from .caches.retrieval import RetrievalCache
from .caches.selection import SCORERS
from .kv_store import KVStore
from .model import CausalLM
from .prefill import PREFILL_CHUNK, prefill_layer_major
from .settings import EngineSettings
from .stats import Stats

ProgressCallback = Callable[[int, int], None]  # (tokens done, tokens total)


class ContextCaches:
    def __init__(self, target: CausalLM, full: FullKVCache, settings: EngineSettings, stats: Stats,
                 progress: ProgressCallback | None = None) -> None:
        self.target, self.full, self.settings, self.stats, self.progress = target, full, settings, stats, progress
        self.tokens: list[int] = []
        self.retrieval: RetrievalCache | None = None  # L2, in TriForce mode only
        self.logits: torch.Tensor | None = None  # target logits after the last cached token
        self.reselect = True  # rebuild the retrieval selection at the next catch-up (new question)
        self.store: KVStore | None = None  # rows of cached prefixes on disk (--kv-store)

    @property
    def max_tokens(self) -> int:
        """Tokens this context can hold: the model's context, or the planned size of a fixed cache."""
        limit = self.target.cfg.max_position_embeddings
        return min(limit, self.full.capacity) if self.full.fixed_size else limit

    def use_retrieval(self, on: bool) -> None:
        """L2 on (built from the full cache at the next catch-up) or off (no L2 work)."""
        if not on:
            self.retrieval = None
        elif self.retrieval is None:
            t, s = self.target, self.settings
            self.retrieval = RetrievalCache(t.cfg, t.device, t.dtype, s.budget, s.chunk_size,
                                            scorer=SCORERS[s.selection])
            self.reselect = True

    def truncate(self, length: int) -> None:
        """Keep tokens[:length] and the cache rows of committed tokens; logits and L2 are redone at
        the next catch-up (also the recovery after an interruption: length = len(tokens))."""
        self.tokens = self.tokens[:length]
        self.full.truncate(min(self.full.length, max(len(self.tokens) - 1, 0)))
        self.logits = None
        self.reselect = True

    def catch_up(self) -> bool:
        """Feed the tokens the full cache lacks and bring L2 in line (a new selection after a new
        question or a mode switch, else the new rows). True when a new selection was built."""
        full, l2 = self.full, self.retrieval
        if self.logits is None and full.length >= len(self.tokens) > 0:
            full.truncate(len(self.tokens) - 1)  # (after an interruption) refeed the newest token for its logits
        if self.store is not None and full.length < len(self.tokens) - 1:  # the newest is fed: its logits
            self.stats.restored_tokens += self.store.restore(full, self.tokens, len(self.tokens) - 1)
        todo = self.tokens[full.length:]
        reselect = l2 is not None and (self.reselect or l2.length < l2.base)
        built = self._prefill(todo, reselect) if todo else False
        if todo and self.store is not None:
            self.store.save(full, self.tokens)
        assert self.logits is not None, "the logits of the newest context token are known after a catch-up"
        if l2 is None:
            return False
        if reselect:
            if not built:
                self.select(full.length, -1)
            else:
                self.stats.retrieval_builds += 1
            self.reselect = False
        elif l2.length != full.length:
            l2.write_rows(full, min(l2.length, full.length), full.length)
        return reselect

    def select(self, length: int, query_row: int) -> None:
        """Rebuild the retrieval selection over rows [0, length) with each layer's recent query row
        `query_row` (an index from the end of the kept query rows)."""
        assert self.retrieval is not None
        self.retrieval.build(self.full, length, [rows[:, query_row] for rows in self.full.recent_queries])
        self.stats.retrieval_builds += 1

    def keep(self, base: int, keep: int) -> None:
        """After an L3 pass from row `base`: keep rows [0, keep) (the accepted ones) and copy the pass's
        true K/V of rows [base, keep) into L2."""
        self.full.truncate(keep)
        if self.retrieval is not None:
            self.retrieval.write_rows(self.full, base, keep)

    def _prefill(self, todo: list[int], reselect: bool) -> bool:
        """The one prefill dispatch; True when it built the retrieval selection on the way."""
        target, full = self.target, self.full
        tokens = torch.tensor(todo, device=target.device)
        full.begin_prefill()
        t0, done = time.perf_counter(), 0
        try:
            if full.layer_major:  # each layer's K/V crosses the link once; the selection is built on the way
                on_layer = None
                if reselect:  # (allocated outside inference mode: later forwards update its buffers)
                    self.retrieval.begin_build(full.length + len(todo))
                    on_layer = self.retrieval.build_layer
                self.logits = prefill_layer_major(target, tokens, full, on_layer)[-1]
                done = len(todo)
            else:  # token chunks bound the activations of a long prompt
                for start in range(0, len(todo), PREFILL_CHUNK):
                    chunk = tokens[start:start + PREFILL_CHUNK]
                    self.logits = target(chunk, full, last_only=True)[-1]
                    done += chunk.shape[0]
                    if self.progress:
                        self.progress(done, len(todo))
        except BaseException:
            self.logits = None
            raise
        finally:
            if target.device.type == "cuda":
                torch.cuda.synchronize()  # the prefill's time, not its launch's
            self.stats.prefilled_tokens += done
            self.stats.prefills += 1
            self.stats.time["prefill"] += time.perf_counter() - t0
        full.end_prefill()  # this prefill's traffic is reported apart from the decode's
        return full.layer_major and reselect
