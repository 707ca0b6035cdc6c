"""The layer-major prefill: every prompt token through layer l, then through layer l+1.

Why: a host-resident cache (caches/offloaded.py) streams each layer's K/V over the link for every
forward; a prompt fed token chunk by token chunk would bring every layer across once per chunk.
Layer-major, each layer crosses once: its buffers are opened (`open_layer`), the whole prompt
goes through the layer in chunks of tokens (bounding activation memory), each chunk writing its
rows and attending through a `LayerWriter`, and the layer is closed (`close_layer`: its new rows
written back once). While the layer's rows are on the device `on_layer` sees them: the retrieval
selection is built on the way (context.py). It is `CausalLM.forward` with this as its layer
runner, so embedding, head and the layers' own code are the forward's; the numbers equal a
token-major forward's up to fp32 summation order (tests/test_prefill.py).
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
from tqdm import tqdm

from .caches.base import RECENT_QUERIES, FullKVCache, KVCache
from .kernels import attention
from .model import CausalLM, DecoderLayer, last_layer_rows

PREFILL_CHUNK = 1024  # prompt tokens per forward (token-major) or per chunk within a layer (layer-major), at most
MASK_BYTES = 512 << 20  # bound on one chunk's attention mask (SDPA): fewer tokens per chunk at long contexts
PROGRESS_MIN_TOKENS = 8192  # the layer-major prefill shows a progress bar (stderr) from this prompt length on
LayerHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]  # (layer, K, V, last query)


def prefill_chunk(kv_groups: int, context: int) -> int:
    """Tokens per layer-major chunk: PREFILL_CHUNK, fewer when one chunk's mask (G*chunk x context,
    bool and its float bias) would pass MASK_BYTES."""
    return max(64, min(PREFILL_CHUNK, MASK_BYTES // (3 * kv_groups * max(context, 1))))


class LayerWriter(KVCache):
    """The cache one layer sees during the layer-major prefill: chunk after chunk of new rows is
    written into that layer's buffers (from the full cache's `open_layer`), and attention runs over
    everything up to the chunk's end."""

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
        return attention(q, self.k[:, :b], self.v[:, :b], pos[b - q.shape[1]:], pos, self.window)

    def truncate(self, length: int) -> None:
        raise NotImplementedError("a layer writer only appends")


def prefill_layer_major(model: CausalLM, tokens: torch.Tensor, cache: FullKVCache, on_layer: LayerHook | None = None,
                        chunk_tokens: int | None = None, progress: bool | None = None) -> torch.Tensor:
    """Append `tokens` [T] to `cache` one layer at a time; fp32 logits of the last token, [1, V].

    Layer l's K/V is final once all tokens went through it (`close_layer`), and `on_layer(l, K, V,
    last query)` sees rows [0, end) while they are on the device, then layer l+1 runs. A progress
    bar (stderr) from PROGRESS_MIN_TOKENS tokens on, or as `progress` says."""
    n = tokens.shape[0]
    start, end = cache.length, cache.length + n
    chunk_tokens = chunk_tokens or prefill_chunk(model.cfg.kv_groups, end)
    layers, windows = model.cfg.num_layers, model.cfg.sliding_windows

    def through_layer(i: int, layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
        k_buf, v_buf = cache.open_layer(i, n)
        writer = LayerWriter(k_buf, v_buf, start, windows[i])
        bar.set_postfix_str(f"layer {i + 1}/{layers}", refresh=False)
        for a in range(0, n, chunk_tokens):
            b = min(n, a + chunk_tokens)
            # The last layer's outputs feed only the last logit, and its queries only the kept recent
            # rows: a chunk before those rows runs one query (its K/V all written), and x keeps stale rows.
            rows = last_layer_rows(a, b, n) if i == layers - 1 else b - a
            x[b - rows:b] = layer(x[a:b], cos[a:b], sin[a:b], writer, rows)
            bar.update(b - a)
        cache.recent_queries[i] = writer.recent
        if on_layer is not None:
            on_layer(i, k_buf[:, :end], v_buf[:, :end], writer.recent[:, -1])
        cache.close_layer(i, start, end)
        return x

    with tqdm(total=layers * n, desc="prefill", unit="tok", unit_scale=True, file=sys.stderr,
              disable=not (n >= PROGRESS_MIN_TOKENS if progress is None else progress),
              leave=False) as bar:  # (an interrupted prefill clears its bar before the run says `interrupted`)
        return model(tokens, cache, last_only=True, run_layer=through_layer)
