"""The retrieval cache for L2: a budget-sized sparse copy of the context, on the GPU.

Per layer and KV head, the prompt's K/V rows are split into chunks of `chunk_size`;
each chunk is scored by its best key against the current query, a chunk right after a
well-scored one as well as it (GQA: the query heads of a KV head add their scores; the
scorers are in selection.py) and the best chunks up to `budget` tokens are kept, chunk 0
(the attention sinks) always. A prompt tail shorter than a chunk is always kept. Every
generated token's K/V (as the L3 pass computed them) is appended after the selection.
Keys keep their absolute RoPE rotation, so attention over the subset keeps true
relative positions; the rows' positions are stored for causality and sliding windows.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..kernels import attention, top_chunks
from .base import FullKVCache, KVCache, allocates, grown_capacity, kv_row_bytes, regrown
from .selection import Scorer, best_key_scores

RESERVE_ROWS = 64  # rows allocated past the selection at a build (generated tokens)
BLOCK = 256  # a build allocates whole blocks of rows


class RetrievalCache(KVCache):
    @staticmethod
    def planned_bytes(cfg: ModelConfig, dtype: torch.dtype, prompt: int, budget: int, new_tokens: int,
                      tp: int = 1) -> int:
        """K/V bytes a build over `prompt` tokens allocates, with room for `new_tokens` (at most: the
        selection holds at most min(prompt, budget) rows), this rank's share under TP."""
        rows = min(prompt, budget) + new_tokens + RESERVE_ROWS
        return cfg.num_layers * (-(-rows // BLOCK) * BLOCK) * kv_row_bytes(cfg, dtype, tp)

    def __init__(self, cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype, budget: int, chunk_size: int,
                 reserve_rows: int = RESERVE_ROWS, scorer: Scorer = best_key_scores) -> None:
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        self.budget, self.chunk_size = budget, chunk_size
        self.scorer = scorer  # chunk scores per KV head (selection.py)
        self.reserve_rows = reserve_rows  # rows allocated past the selection at build (generated tokens)
        self.length = 0  # logical length: absolute position of the next token
        self.base = 0  # context length the selection was built from
        self.selected = 0  # rows of the selection (same for every head)
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.pos = torch.empty(0, 0, 0, dtype=torch.long)  # [layers, Hkv, capacity]: each layer selects its own rows

    def _slot(self, length: int) -> int:
        return self.selected + (length - self.base)

    @allocates
    def _reserve(self, rows: int, exact: bool = False) -> None:
        if rows <= self.capacity:
            return
        cap = -(-rows // BLOCK) * BLOCK if exact else grown_capacity(rows, self.capacity)
        used = self._slot(self.length)
        self.k, self.v = regrown(self.k, self.v, self.cfg, cap, used, self.device, self.dtype)
        new_pos = torch.zeros(self.cfg.num_layers, self.cfg.num_kv_heads, cap, dtype=torch.long, device=self.device)
        new_pos[:, :, :used] = self.pos[:, :, :used]
        self.pos, self.capacity = new_pos, cap

    def selection_plan(self, context: int) -> tuple[int, int, int]:
        """(full chunks in the context, chunks to keep, tail rows kept whole)."""
        c = self.chunk_size
        n_full, tail = divmod(context, c)
        if context <= self.budget:
            return n_full, n_full, tail
        keep = max(1, (self.budget - tail) // c)
        return n_full, min(keep, n_full), tail

    def build(self, full: FullKVCache, prompt_len: int, queries: list[torch.Tensor]) -> None:
        """Select from rows [0, prompt_len) of `full` with queries[layer] [Hq, D]; copy rows
        [prompt_len, full.length) (already generated tokens) after the selection."""
        self.begin_build(prompt_len, full.length - prompt_len)
        for layer in range(self.cfg.num_layers):
            self.build_layer(layer, *full.rows(layer, 0, prompt_len), queries[layer])
        if full.length > prompt_len:
            self.write_rows(full, prompt_len, full.length)

    def begin_build(self, prompt_len: int, generated: int = 0) -> None:
        """Start a selection over a context of prompt_len rows, one layer at a time (build_layer),
        so the layer-major prefill can select each layer while its K/V is still on the device."""
        n_full, keep, tail = self.selection_plan(prompt_len)
        self.base = self.length = prompt_len
        self.selected, self.capacity, self.k, self.v = 0, 0, [], []
        self.pos = torch.zeros(self.cfg.num_layers, self.cfg.num_kv_heads, 0, dtype=torch.long, device=self.device)
        self._reserve(keep * self.chunk_size + tail + generated + self.reserve_rows, exact=True)
        self.selected = keep * self.chunk_size + tail

    def build_layer(self, layer: int, k_all: torch.Tensor, v_all: torch.Tensor, query: torch.Tensor) -> None:
        """Select `layer`'s rows from its context K/V [Hkv, prompt_len, D] (device or host) with query [Hq, D]."""
        c = self.chunk_size
        n_full, keep, tail = self.selection_plan(self.base)
        hkv, d = self.cfg.num_kv_heads, self.cfg.head_dim
        all_pos = torch.arange(self.base, device=self.device)
        if keep == n_full:  # everything fits: the selection is the whole prompt
            rows = all_pos[None, :].expand(hkv, -1)
        else:
            idx = top_chunks(self.scorer(k_all[:, : n_full * c], query, c), keep).to(self.device)  # [Hkv, keep]
            rows = (idx[:, :, None] * c + torch.arange(c, device=self.device)).reshape(hkv, -1)
            rows = torch.cat([rows, all_pos[n_full * c :][None, :].expand(hkv, -1)], dim=1)
        gather = rows[:, :, None].expand(-1, -1, d).to(k_all.device)
        self.k[layer][:, : self.selected] = torch.gather(k_all, 1, gather)
        self.v[layer][:, : self.selected] = torch.gather(v_all, 1, gather)
        self.pos[layer, :, : self.selected] = rows

    def write_rows(self, full: FullKVCache, start: int, stop: int) -> None:
        """Make rows [start, stop) equal to the full cache's (the L3 pass computed them); length = stop."""
        self.truncate(start)
        self._reserve(self._slot(stop))
        a, b = self._slot(start), self._slot(stop)
        for layer in range(self.cfg.num_layers):
            k, v = full.rows(layer, start, stop)
            self.k[layer][:, a:b] = k
            self.v[layer][:, a:b] = v
        self.pos[:, :, a:b] = torch.arange(start, stop, device=self.device)
        self.length = stop

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = k.shape[1]
        a, b = self._slot(self.length), self._slot(self.length + n)
        if layer == 0:
            self._reserve(b)
            self.pos[:, :, a:b] = torch.arange(self.length, self.length + n, device=self.device)
        self.k[layer][:, a:b] = k
        self.v[layer][:, a:b] = v
        pos = self.pos[layer]
        return attention(q, self.k[layer][:, :b], self.v[layer][:, :b], pos[0, b - q.shape[1]:b], pos[:, :b],
                         self.cfg.sliding_windows[layer])

    def one_token_rows(self) -> tuple[list[torch.Tensor], list[torch.Tensor], int] | None:
        if any(w is not None for w in self.cfg.sliding_windows):  # a window may hide selected rows
            return None
        a = self._slot(self.length)
        self._reserve(a + 1)
        self.pos[:, :, a] = self.length
        return self.k, self.v, a  # every stored row is a selected or a past token: all visible

    def truncate(self, length: int) -> None:
        if not self.base <= length <= self.length:
            raise ValueError(f"cannot truncate the retrieval cache ({self.base}..{self.length}) to {length}")
        self.length = length
