"""Layer-major prefill equals a normal (token-major) forward: cache contents, first token, retrieval."""
from __future__ import annotations

import pytest
import torch

from offload_runtime import loading
from offload_runtime.caches import FullCache
from offload_runtime.caches.offloaded import OffloadedCache
from offload_runtime.context import ContextCaches
from offload_runtime.kernels import attention_reference
from offload_runtime.kernels.sdpa import attention_sdpa as sdpa_attention
from offload_runtime.prefill import prefill_layer_major
from offload_runtime.settings import EngineSettings
from offload_runtime.stats import Stats

TOL = 1e-4
CASES = {
    "llama-gqa": ("llama", dict(num_hidden_layers=3)),
    "mistral-sliding": ("mistral", dict(num_hidden_layers=2, sliding_window=12)),
    "qwen2-bias": ("qwen2", dict(num_hidden_layers=2)),
}


def _model(checkpoint, case):
    model_type, overrides = CASES[case]
    return loading.load(str(checkpoint(model_type, **overrides)), torch.device("cpu"), with_tokenizer=False).model


def _ids(tokenizer, long_text, n):
    ids = tokenizer(long_text)["input_ids"][:n]
    assert len(ids) == n
    return ids


def _prefill_with_selection(model, ids, full):
    """The engine's one prefill dispatch (layer-major when the cache asks for it), building L2."""
    caches = ContextCaches(model, full, EngineSettings(budget=48, chunk_size=8), Stats())
    caches.use_retrieval(True)
    caches.tokens.extend(ids)
    caches.catch_up()
    return caches.retrieval


def _assert_same_cache(a, b, length, layers):
    assert a.length == b.length == length
    for layer in range(layers):
        ka, va = a.rows(layer, 0, length)
        kb, vb = b.rows(layer, 0, length)
        assert (ka - kb).abs().max() < TOL and (va - vb).abs().max() < TOL, layer
        qa, qb = a.recent_queries[layer], b.recent_queries[layer]
        m = min(qa.shape[1], qb.shape[1])  # a forward keeps the queries of its own tokens only
        assert (qa[:, -m:] - qb[:, -m:]).abs().max() < TOL


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("on_chip", [None, 0, 1])  # None: FullCache
def test_layer_major_equals_normal_prefill(case, on_chip, checkpoint, tokenizer, long_text):
    model = _model(checkpoint, case)
    cfg, n = model.cfg, 150
    ids = _ids(tokenizer, long_text, n)
    ref = FullCache(cfg, "cpu", torch.float32)
    ref_logits = model(torch.tensor(ids), ref)[-1:]
    cache = (FullCache(cfg, "cpu", torch.float32) if on_chip is None
             else OffloadedCache(cfg, "cpu", torch.float32, capacity=200, on_chip_layers=on_chip))
    logits = prefill_layer_major(model, torch.tensor(ids), cache, chunk_tokens=64)  # 64 + 64 + 22
    assert (logits - ref_logits).abs().max() < TOL
    assert logits.argmax() == ref_logits.argmax()  # the first token
    _assert_same_cache(cache, ref, n, cfg.num_layers)
    assert all(q.shape[1] == 64 for q in cache.recent_queries)  # the last 64 rows' queries, every layer


def test_layer_major_builds_the_same_retrieval_selection(checkpoint, tokenizer, long_text):
    model = _model(checkpoint, "llama-gqa")
    cfg, n = model.cfg, 150
    ids = _ids(tokenizer, long_text, n)
    ref_r = _prefill_with_selection(model, ids, FullCache(cfg, "cpu", torch.float32))  # token-major
    cache = OffloadedCache(cfg, "cpu", torch.float32, capacity=160, on_chip_layers=1)
    assert cache.layer_major  # an offloaded cache asks for the layer-major prefill
    got_r = _prefill_with_selection(model, ids, cache)
    assert got_r.selected == ref_r.selected < n  # a real selection, not the whole prompt
    assert torch.equal(got_r.pos[:, :, : got_r.selected], ref_r.pos[:, :, : ref_r.selected])
    for layer in range(cfg.num_layers):
        diff = (got_r.k[layer][:, : got_r.selected] - ref_r.k[layer][:, : ref_r.selected]).abs().max()
        assert diff < TOL, layer
    # and the next step over both gives the same logits
    nxt = torch.tensor(ids[-1:])
    assert (model(nxt, got_r) - model(nxt, ref_r)).abs().max() < TOL


def test_layer_major_on_top_of_existing_rows(checkpoint, tokenizer, long_text):
    """A second prompt appended layer-major (a chat turn) equals one normal forward of both."""
    model = _model(checkpoint, "llama-gqa")
    ids = _ids(tokenizer, long_text, 120)
    ref = FullCache(model.cfg, "cpu", torch.float32)
    ref_logits = model(torch.tensor(ids), ref)[-1:]
    cache = OffloadedCache(model.cfg, "cpu", torch.float32, capacity=128, on_chip_layers=1)
    prefill_layer_major(model, torch.tensor(ids[:70]), cache, chunk_tokens=32)
    logits = prefill_layer_major(model, torch.tensor(ids[70:]), cache, chunk_tokens=32)
    assert (logits - ref_logits).abs().max() < TOL
    _assert_same_cache(cache, ref, 120, model.cfg.num_layers)


@pytest.mark.parametrize("window", [None, 5])
def test_sdpa_attention_equals_reference(window):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(8, 7, 16, generator=gen)
    k, v = torch.randn(2, 30, 16, generator=gen), torch.randn(2, 30, 16, generator=gen)
    pos = torch.arange(30)
    want = attention_reference(q, k, v, pos[23:], pos, window)
    got = sdpa_attention(q, k, v, pos[23:], pos, window)
    assert (got - want).abs().max() < 1e-5


def test_progress_bar_on_stderr(checkpoint, tokenizer, long_text, capsys):
    model = _model(checkpoint, "llama-gqa")
    ids = _ids(tokenizer, long_text, 40)
    cache = OffloadedCache(model.cfg, "cpu", torch.float32, capacity=64, on_chip_layers=1)
    prefill_layer_major(model, torch.tensor(ids), cache, chunk_tokens=16, progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "prefill" in captured.err and "/120" in captured.err  # 3 layers x 40 tokens


def test_rows_after_rollback_and_layer_major_rewrite(checkpoint, tokenizer, long_text):
    """Rows rewritten after a rollback are read back as rewritten (no stale device copy of old rows)."""
    model = _model(checkpoint, "llama-gqa")
    ids = _ids(tokenizer, long_text, 100)
    ref = FullCache(model.cfg, "cpu", torch.float32)
    model(torch.tensor(ids), ref)
    cache = OffloadedCache(model.cfg, "cpu", torch.float32, capacity=128, on_chip_layers=1)
    model(torch.tensor(ids[:60]), cache)
    model(torch.tensor([5, 6, 7]), cache)  # a rejected speculation at rows 60..62
    cache.truncate(60)
    prefill_layer_major(model, torch.tensor(ids[60:]), cache, chunk_tokens=16)
    _assert_same_cache(cache, ref, 100, model.cfg.num_layers)
    for layer in range(model.cfg.num_layers):  # exactly the rows the rejected forward had written
        assert (cache.rows(layer, 60, 63)[0] - ref.rows(layer, 60, 63)[0]).abs().max() < TOL


class _FirstRowsCache(FullCache):
    """Sabotage: a cache that reads a short query block as the first rows of the forward (the
    contract before `attend` took fewer queries than new rows)."""

    def attend(self, layer, q, k, v):
        end = self.length + k.shape[1]
        self._reserve(end) if layer == 0 else None
        self.k[layer][:, self.length:end], self.v[layer][:, self.length:end] = k, v
        self.recent_queries[layer] = q[:, -64:].clone()
        pos = torch.arange(end)
        return attention_reference(q, self.k[layer][:, :end], self.v[layer][:, :end],
                                   pos[self.length:self.length + q.shape[1]], pos, self.cfg.sliding_windows[layer])


def _last_only_gap(model, ids, cache_type):
    """Largest gap between a last-only forward and a full forward (last row, cache rows, recent queries)."""
    ref, cache = FullCache(model.cfg, "cpu", torch.float32), cache_type(model.cfg, "cpu", torch.float32)
    want = model(torch.tensor(ids), ref)[-1:]
    got = model(torch.tensor(ids), cache, last_only=True)
    gap = (got - want).abs().max().item()
    for layer in range(model.cfg.num_layers):
        for a, b in zip(cache.rows(layer, 0, len(ids)), ref.rows(layer, 0, len(ids))):
            gap = max(gap, (a - b).abs().max().item())
        assert cache.recent_queries[layer].shape == ref.recent_queries[layer].shape  # the same rows are kept
        gap = max(gap, (cache.recent_queries[layer] - ref.recent_queries[layer]).abs().max().item())
    return gap


@pytest.mark.parametrize("case", sorted(CASES))
def test_last_only_runs_the_last_layer_for_the_last_rows_only(case, checkpoint, tokenizer, long_text):
    """With last_only the last layer's attention and MLP run for the kept query rows only (its K/V
    for every token): the logit, the cache and the kept queries equal a full forward's."""
    model = _model(checkpoint, case)
    ids = _ids(tokenizer, long_text, 150)
    rows_seen = []
    hook = model.model.layers[-1].mlp.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[0]))
    try:
        assert _last_only_gap(model, ids, FullCache) < TOL
    finally:
        hook.remove()
    assert rows_seen == [150, 64]  # the full forward, then the last-only one (RECENT_QUERIES rows)
    # sabotage: a cache that places the short query block at the forward's first rows is caught
    assert _last_only_gap(model, ids, _FirstRowsCache) > 100 * TOL
