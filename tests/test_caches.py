"""Unit checks of the L1 and L2 caches: StreamingLLM eviction and retrieval selection."""
from __future__ import annotations

import torch

from offload_runtime import loading
from offload_runtime.caches import FullCache
from offload_runtime.caches.retrieval import RetrievalCache
from offload_runtime.caches.selection import mean_key_scores
from offload_runtime.caches.streaming import StreamingCache


def test_eviction_rerotates_kept_keys(checkpoint):
    """After eviction the cache looks like sinks + recent tokens fed contiguously (layer 0 K/V,
    which depend only on the token and its position, match exactly)."""
    model = loading.load(str(checkpoint("llama")), torch.device("cpu"), with_tokenizer=False).model
    tokens = torch.randint(0, model.cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    sinks, window = 4, 24
    cache = StreamingCache(model.cfg, "cpu", torch.float32, sinks, window, model.rope)
    model(tokens[:30], cache)
    model(tokens[30:], cache)
    cache.evict()
    assert cache.length == window and cache.evicted == 16
    fresh = StreamingCache(model.cfg, "cpu", torch.float32, sinks, 64, model.rope)
    model(torch.cat([tokens[:sinks], tokens[-(window - sinks):]]), fresh)
    assert torch.allclose(cache.k[0][:, :window], fresh.k[0][:, :window], atol=1e-5)
    assert torch.allclose(cache.v[0][:, :window], fresh.v[0][:, :window], atol=1e-5)


def test_retrieval_selection_keeps_sinks_best_chunks_and_tail(checkpoint):
    model = loading.load(str(checkpoint("llama")), torch.device("cpu"), with_tokenizer=False).model
    cfg = model.cfg  # 4 query heads, 2 KV heads, head_dim 16
    full = FullCache(cfg, "cpu", torch.float32)
    n, c = 45, 4  # 11 full chunks + a tail of 1
    k = torch.zeros(cfg.num_kv_heads, n, cfg.head_dim)
    k[0, 5 * c:6 * c, 0] = 1.0  # head 0 prefers chunk 5, then chunk 9
    k[0, 9 * c:10 * c, 0] = 0.5
    k[1, 2 * c:3 * c, 1] = 1.0  # head 1 prefers chunk 2, then chunk 7
    k[1, 7 * c:8 * c, 1] = 0.5
    v = torch.arange(n, dtype=torch.float32)[None, :, None].expand(cfg.num_kv_heads, n, cfg.head_dim)
    k_swapped = k[[1, 0]][:, :, [1, 0] + list(range(2, cfg.head_dim))]  # layer 1: the heads' preferences swap
    for layer in range(cfg.num_layers):
        full.attend(layer, torch.zeros(cfg.num_heads, n, cfg.head_dim), k if layer == 0 else k_swapped, v.clone())
    full.advance(n)
    query = torch.zeros(cfg.num_heads, cfg.head_dim)
    query[:2, 0] = 1.0  # query heads 0-1 share KV head 0
    query[2:, 1] = 1.0
    # the cache's mechanics with TriForce's mean-key scores (the engine's best-key: tests/test_selection.py)
    ret = RetrievalCache(cfg, "cpu", torch.float32, budget=13, chunk_size=c, scorer=mean_key_scores)  # 3 chunks + tail
    ret.build(full, n, [query] * cfg.num_layers)
    assert ret.selected == 13 and ret.length == n
    rows0 = list(range(0, 4)) + list(range(20, 24)) + list(range(36, 40)) + [44]
    rows1 = list(range(0, 4)) + list(range(8, 12)) + list(range(28, 32)) + [44]
    assert ret.pos[0, 0, :13].tolist() == rows0 and ret.pos[0, 1, :13].tolist() == rows1
    assert ret.pos[1, 0, :13].tolist() == rows1 and ret.pos[1, 1, :13].tolist() == rows0  # each layer its own rows
    assert ret.v[0][0, :13, 0].tolist() == rows0  # the V rows travel with their keys
    # generated rows land after the selection, truncation is a length
    out = ret.attend(0, torch.zeros(cfg.num_heads, 2, cfg.head_dim), torch.ones(2, 2, cfg.head_dim),
                     torch.full((2, 2, cfg.head_dim), 100.0))
    # zero queries weigh every visible key alike: each output row is the mean of the V rows it may see,
    # here the 13 selected rows (V = their position) and, causally, the new rows (V = 100) up to its own
    for heads, rows in ((slice(0, 2), rows0), (slice(2, 4), rows1)):  # query heads 0-1 read KV head 0
        want = torch.tensor([(sum(rows) + 100) / 14, (sum(rows) + 200) / 15])[:, None].expand(2, cfg.head_dim)
        assert torch.allclose(out[heads], want.expand(2, 2, cfg.head_dim), atol=1e-4), out[heads, :, 0]
    ret.advance(2)
    assert ret.length == n + 2 and ret.pos[:, :, 13:15].tolist() == [[[45, 46], [45, 46]]] * cfg.num_layers
    ret.truncate(n + 1)
    assert ret.length == n + 1


def test_short_prompt_is_kept_whole(checkpoint):
    model = loading.load(str(checkpoint("llama")), torch.device("cpu"), with_tokenizer=False).model
    full = FullCache(model.cfg, "cpu", torch.float32)
    model(torch.arange(30), full)
    ret = RetrievalCache(model.cfg, "cpu", torch.float32, budget=64, chunk_size=8)
    ret.build(full, 30, [q[:, -1] for q in full.recent_queries])
    assert ret.selected == 30
    assert torch.equal(ret.k[1][:, :30], full.k[1][:, :30])
