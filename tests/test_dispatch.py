"""Every attention of the engine goes through the kernel dispatch (kernels.attention), the offloaded
L3 and the layer-major prefill included: OFFLOAD_RUNTIME_KERNELS reaches them."""
from __future__ import annotations

import pytest
import torch

from offload_runtime.caches import FullCache
from offload_runtime.caches.offloaded import OffloadedCache
from offload_runtime.caches.retrieval import RetrievalCache
from offload_runtime.config import ModelConfig
from offload_runtime.model import CausalLM
from offload_runtime.prefill import prefill_layer_major
from offload_runtime.synthetic import hf_config, randomize


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.from_hf(hf_config("llama", 64, num_hidden_layers=2, hidden_size=32,
                                        num_attention_heads=4, num_key_value_heads=2))
    m = CausalLM(cfg)
    randomize(m)
    m.tie_weights()
    return m.eval().requires_grad_(False)


def _caches(cfg):
    retrieval = RetrievalCache(cfg, "cpu", torch.float32, 16, 4)
    retrieval.begin_build(0)  # an empty selection: the tokens are appended after it
    return {"full": FullCache(cfg, "cpu", torch.float32),
            "offloaded": OffloadedCache(cfg, "cpu", torch.float32, 64, on_chip_layers=1), "retrieval": retrieval}


@pytest.mark.parametrize("kind", ["full", "offloaded", "retrieval", "layer-major"])
def test_forced_triton_on_cpu_reaches_every_cache(kind, model, monkeypatch):
    """Triton forced without a GPU or the interpreter raises in the dispatch: a cache that called torch
    directly would not notice. So each path below provably asks kernels.attention."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", "triton")
    tokens = torch.arange(10)
    cache = _caches(model.cfg)["offloaded" if kind == "layer-major" else kind]
    with pytest.raises(RuntimeError, match="OFFLOAD_RUNTIME_KERNELS=triton"):
        if kind == "layer-major":
            prefill_layer_major(model, tokens, cache)
        else:
            model(tokens, cache)


@pytest.mark.parametrize("kind", ["offloaded", "layer-major"])
def test_offloaded_reference_and_auto_agree(kind, model, monkeypatch):
    """The offloaded L3 under the reference kernels equals it under the default dispatch."""
    tokens = torch.arange(20) % 64
    out = {}
    for mode in ("reference", "auto"):
        monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", mode)
        cache = OffloadedCache(model.cfg, "cpu", torch.float32, 64, on_chip_layers=0)
        first = prefill_layer_major(model, tokens[:12], cache) if kind == "layer-major" else model(tokens[:12], cache)
        out[mode] = (first, model(tokens[12:], cache))
    for a, b in zip(out["reference"], out["auto"]):
        assert (a - b).abs().max() < 1e-4
