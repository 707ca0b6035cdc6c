"""Offloaded and not offloaded give identical tokens and logits, for both engine modes (CPU, fp32)."""
from __future__ import annotations

import pytest
import torch

from offload_runtime import loading
from offload_runtime.caches import FullKVCache
from offload_runtime.caches.offloaded import OffloadedCache
from offload_runtime.cuda_streams import CpuBackend
from offload_runtime.generate import generate_triforce
from offload_runtime.settings import EngineSettings
from offload_runtime.generate import generate_autoregressive
from offload_runtime.sampling import SamplingParams

SETTINGS = EngineSettings(budget=48, chunk_size=8, gamma=4, draft_gamma=2, sinks=4, window=64)
N_PROMPT, N_NEW, LAYERS = 120, 12, 3


@pytest.fixture(scope="module")
def models(checkpoint):
    target = loading.load(str(checkpoint("llama", num_hidden_layers=LAYERS)), torch.device("cpu"), with_tokenizer=False)
    draft = loading.load(str(checkpoint("llama", seed=1, num_hidden_layers=1)), torch.device("cpu"), with_tokenizer=False)
    return target.model, draft.model


@pytest.fixture(scope="module")
def prompt(tokenizer, long_text):
    return tokenizer(long_text)["input_ids"][:N_PROMPT]


def run(mode, target, draft, prompt, monkeypatch, on_chip=None, layer_major=None, params=SamplingParams(), seed=0):
    """Tokens, the L3 logits of every full-cache forward, and the stats."""
    l3_logits = []
    forward = type(target).forward

    def recording(tokens, cache, last_only=False, run_layer=None):
        out = forward(target, tokens, cache, last_only, run_layer)
        if isinstance(cache, FullKVCache):
            l3_logits.append(out.clone())
        return out

    monkeypatch.setattr(target, "forward", recording)
    cache = None
    if on_chip is not None:
        cache = OffloadedCache(target.cfg, "cpu", torch.float32, N_PROMPT + N_NEW + SETTINGS.gamma + 1, on_chip,
                               backend=CpuBackend("cpu"))
        if layer_major is not None:
            cache.layer_major = layer_major  # the cache states how it is prefilled
    gen = torch.Generator().manual_seed(seed)
    if mode == "autoregressive":
        res = generate_autoregressive(target, prompt, N_NEW, params, [], gen, cache=cache)
    else:
        res = generate_triforce(target, draft if mode == "triforce-3" else None, prompt, N_NEW, params, [],
                                SETTINGS, gen, cache=cache)
    monkeypatch.undo()
    return res.token_ids, l3_logits, res.stats


@pytest.mark.parametrize("mode", ["autoregressive", "triforce-2", "triforce-3"])
def test_offloaded_equals_on_device(mode, models, prompt, monkeypatch):
    target, draft = models
    want_tokens, want_logits, _ = run(mode, target, draft, prompt, monkeypatch)
    assert len(want_tokens) == N_NEW and len(set(want_tokens)) > 3
    for on_chip in (0, 1, LAYERS):
        # same prefill path: bit-identical logits, only where the rows live differs
        tokens, logits, stats = run(mode, target, draft, prompt, monkeypatch, on_chip, layer_major=False)
        assert tokens == want_tokens, on_chip
        assert len(logits) == len(want_logits)
        assert all(torch.equal(a, b) for a, b in zip(logits, want_logits)), on_chip
        assert stats["offloaded_layers"] == LAYERS - on_chip
    # the default for an offloaded cache: layer-major prefill (fp32 summation order differs slightly)
    tokens, logits, stats = run(mode, target, draft, prompt, monkeypatch, on_chip=1)
    assert tokens == want_tokens
    assert len(logits) == len(want_logits)  # the layer-major prefill is a forward too (with a layer runner)
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(logits, want_logits))
    assert stats["h2d_bytes"] > 0 and stats["prefill_h2d_bytes"] == 0
    assert stats["prefill_d2h_bytes"] == (LAYERS - 1) * N_PROMPT * 2 * 2 * 16 * 4


def test_offloaded_sampling_matches(models, prompt, monkeypatch):
    target, draft = models
    params = SamplingParams(temperature=0.8, top_p=0.95)
    want, _, _ = run("triforce-3", target, draft, prompt, monkeypatch, params=params, seed=3)
    got, _, _ = run("triforce-3", target, draft, prompt, monkeypatch, on_chip=1, layer_major=False, params=params, seed=3)
    assert got == want


def test_decode_bytes_per_token(models, prompt, monkeypatch):
    """Autoregressive over an offloaded cache streams the offloaded layers' whole K/V per token."""
    target, draft = models
    _, _, stats = run("autoregressive", target, draft, prompt, monkeypatch, on_chip=1)
    row = 2 * target.cfg.num_kv_heads * target.cfg.head_dim * 4
    lengths = range(N_PROMPT, N_PROMPT + N_NEW - 1)  # one pass per token after the first
    assert stats["h2d_bytes"] == sum((LAYERS - 1) * n * row for n in lengths)
    assert stats["d2h_bytes"] == (LAYERS - 1) * (N_NEW - 1) * row


def test_offloaded_with_selection_refresh(models, prompt, monkeypatch):
    """Rebuilding the retrieval selection reads the offloaded layers' rows back from host memory."""
    target, _ = models
    import dataclasses

    settings = dataclasses.replace(SETTINGS, refresh_every=2)
    want = generate_triforce(target, None, prompt, N_NEW, SamplingParams(), [], settings)
    got = generate_triforce(target, None, prompt, N_NEW, SamplingParams(), [], settings,
                            cache=OffloadedCache(target.cfg, "cpu", torch.float32, N_PROMPT + N_NEW + 8, 1))
    assert got.token_ids == want.token_ids and got.stats["l3_passes"] >= 2
