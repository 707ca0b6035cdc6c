"""Prefill: the prompt into the full cache (and the retrieval selection), layer-major when offloaded.

Layer-major: all prompt tokens go through layer l (in token chunks, to bound activation
memory), layer l's K/V is written to the host once and its retrieval selection is built
while it is still on the device, then layer l+1. Each layer's K/V crosses the link once,
instead of once per token chunk as a token-chunk-major prefill over an offloaded cache
would. The numbers equal a normal forward up to fp32 summation order.
"""
from __future__ import annotations

import sys
import torch
from tqdm import tqdm

from .caches.base import KVCache
from .caches.full import RECENT_QUERIES, FullCache
from .caches.offloaded import AttentionFn, OffloadedCache, attention_for
from .caches.retrieval import RetrievalCache
from .model import CausalLM

PREFILL_CHUNK = 1024  # prompt tokens per chunk within a layer (at most)
MASK_BYTES = 512 << 20  # bound on one chunk's attention mask (SDPA): fewer tokens per chunk at long contexts
PROGRESS_MIN_TOKENS = 8192  # show a progress bar (stderr, layers x tokens) from this prompt length on


class _LayerWriter(KVCache):
    """The cache one layer sees during the layer-major prefill: chunk after chunk of new rows
    written into that layer's buffers, attention over everything up to the chunk's end."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, start: int, window: int | None, attn: AttentionFn) -> None:
        self.k, self.v, self.length, self.window, self.attn = k, v, start, window, attn
        self.recent: torch.Tensor | None = None  # the last RECENT_QUERIES query rows

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a, b = self.length, self.length + k.shape[1]
        self.k[:, a:b] = k
        self.v[:, a:b] = v
        recent = q if self.recent is None else torch.cat([self.recent, q], dim=1)
        self.recent = recent[:, -RECENT_QUERIES:].clone()
        pos = torch.arange(b, device=q.device)
        self.length = b
        return self.attn(q, self.k[:, :b], self.v[:, :b], pos[a:], pos, self.window)

    def truncate(self, length: int) -> None:
        raise NotImplementedError


def prefill_layer_major(model: CausalLM, tokens: torch.Tensor, cache: FullCache | OffloadedCache,
                        retrieval: RetrievalCache | None = None, chunk_tokens: int | None = None,
                        progress: bool | None = None, attention_fn: AttentionFn | None = None,
                        retrieval_generated: int = 0) -> torch.Tensor:
    """Append `tokens` [T] to `cache` one layer at a time; build `retrieval` over the whole context
    (rows [0, length + T)) per layer on the way. Returns fp32 logits of the last token, [1, V]."""
    n = tokens.shape[0]
    if chunk_tokens is None:
        chunk_tokens = prefill_chunk(model.cfg.kv_groups, cache.length + n)
    if retrieval is not None:  # outside inference mode: its buffers are updated by later forwards
        retrieval.begin_build(cache.length + n, retrieval_generated)
    if progress is None:
        progress = n >= PROGRESS_MIN_TOKENS
    with torch.inference_mode():
        return _layer_major(model, tokens, cache, retrieval, chunk_tokens, progress,
                            attention_fn or attention_for(tokens.device))


def _layer_major(model: CausalLM, tokens: torch.Tensor, cache: FullCache | OffloadedCache,
                 retrieval: RetrievalCache | None, chunk_tokens: int, progress: bool, attn: AttentionFn) -> torch.Tensor:
    n = tokens.shape[0]
    start, end = cache.length, cache.length + n
    x = model.model.embed_tokens(tokens)
    cos, sin = model.rope.cos_sin(cache.positions(n, tokens.device), x.dtype)
    layers = model.model.layers
    bar = tqdm(total=len(layers) * n, desc="prefill", unit="tok", unit_scale=True, file=sys.stderr,
               disable=not progress, leave=False)  # layers x tokens
    for i, layer in enumerate(layers):
        k_buf, v_buf = cache.open_layer(i, n)
        writer = _LayerWriter(k_buf, v_buf, start, model.cfg.sliding_windows[i], attn)
        bar.set_postfix_str(f"layer {i + 1}/{len(layers)}", refresh=False)
        for a in range(0, n, chunk_tokens):
            b = min(n, a + chunk_tokens)
            x[a:b] = layer(x[a:b], cos[a:b], sin[a:b], writer)
            bar.update(b - a)
        cache.recent_queries[i] = writer.recent
        if retrieval is not None:
            retrieval.build_layer(i, k_buf[:, :end], v_buf[:, :end], writer.recent[:, -1])
        cache.close_layer(i, start, end)
    bar.close()
    cache.advance(n)
    return model.lm_head(model.model.norm(x[-1:])).float()


def prefill_chunk(kv_groups: int, context: int) -> int:
    """Tokens per chunk: PREFILL_CHUNK, fewer when one chunk's mask (G*chunk x context, bool and
    its float bias) would pass MASK_BYTES."""
    return max(64, min(PREFILL_CHUNK, MASK_BYTES // (3 * kv_groups * max(context, 1))))


def prefill(model: CausalLM, prompt_ids: list[int], cache: KVCache, retrieval: RetrievalCache | None = None,
            layer_major: bool | None = None, retrieval_generated: int = 0) -> torch.Tensor:
    """Prefill `cache` (and build `retrieval`) with the prompt; logits of the last token [1, V].
    layer_major None: layer-major for an offloaded cache, a normal forward otherwise."""
    tokens = torch.tensor(prompt_ids, device=model.device)
    if layer_major is None:
        layer_major = isinstance(cache, OffloadedCache)
    if layer_major:
        logits = prefill_layer_major(model, tokens, cache, retrieval, retrieval_generated=retrieval_generated)
    else:  # token chunks bound the activations of a long prompt
        for start in range(0, tokens.shape[0], PREFILL_CHUNK):
            logits = model(tokens[start:start + PREFILL_CHUNK], cache, last_only=True)
        if retrieval is not None:
            retrieval.build(cache, cache.length, [q[:, -1] for q in cache.recent_queries])
    if isinstance(cache, OffloadedCache):
        cache.mark_prefill_done()
    return logits
