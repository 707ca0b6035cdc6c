"""The transfer scheduler and the offloaded cache on CUDA (pinned memory, copy stream, events).

Marked `cuda`: skipped without a CUDA device (CPU CI); bench/gpu_check.sh runs them on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from offload_runtime.caches import FullCache
from offload_runtime.caches.offloaded import OffloadedCache
from offload_runtime.config import ModelConfig
from offload_runtime.cuda_streams import CpuBackend, CudaBackend, LayerPipeline, link_bandwidth
from offload_runtime.generate import generate_triforce
from offload_runtime.settings import EngineSettings
from offload_runtime.generate import generate_autoregressive
from offload_runtime.fused import fuse_projections
from offload_runtime.kv_store import BLOCK, KVStore
from offload_runtime.model import CausalLM
from offload_runtime.sampling import SamplingParams
from offload_runtime.session import Session
from offload_runtime.synthetic import hf_config, randomize

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (run bench/gpu_check.sh on a GPU machine)"),
]
ROW = (2, 4, 64)


def _pass(pipe: LayerPipeline, rows: int, new: int) -> None:
    pipe.begin_pass(rows)
    for i in range(pipe.n_layers):
        slab = pipe.acquire(i)
        slab[rows:rows + new] = float(i + 1)
        pipe.release(i, rows, rows + new)


def test_cuda_pipeline_runs_the_cpu_schedule():
    cpu, cuda = CpuBackend("cpu", trace=True), CudaBackend("cuda", trace=True)
    pipes = [LayerPipeline(b, 5, ROW, 4096, torch.float16) for b in (cpu, cuda)]
    assert cuda.page_locked(pipes[1].host) and pipes[1].slabs[0].is_cuda
    assert not cuda.page_locked(torch.empty(4))  # the check can say no
    for pipe in pipes:
        pipe.host.zero_()
        _pass(pipe, 0, 1000)
        _pass(pipe, 1000, 7)
    assert cuda.trace == cpu.trace
    a, b = cpu.collect(), cuda.collect()
    assert (a.h2d_bytes, a.d2h_bytes, a.h2d_copies) == (b.h2d_bytes, b.d2h_bytes, b.h2d_copies)
    for i in range(5):
        assert torch.equal(pipes[1].host_rows(i, 0, 1007), pipes[0].host_rows(i, 0, 1007))
    assert b.h2d_s > 0  # the copies are timed; how fast they go is measured by bench/offload_check.py (no claim here)


def test_no_device_synchronize_in_the_hot_loop(monkeypatch):
    pipe = LayerPipeline(CudaBackend("cuda"), 4, ROW, 2048, torch.float16)
    _pass(pipe, 0, 512)

    def forbidden(*a, **k):
        raise AssertionError("device-wide synchronize in the L3 pass")

    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    monkeypatch.setattr(torch.cuda.Event, "synchronize", forbidden)
    _pass(pipe, 512, 7)


def _model(layers: int = 3, device: str = "cuda") -> CausalLM:
    cfg = ModelConfig.from_hf(hf_config("llama", 320, num_hidden_layers=layers, hidden_size=128,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = CausalLM(cfg)
    randomize(model)
    model.tie_weights()
    model.rope.to(device)  # not an nn.Module: moved by hand, as loading does
    return fuse_projections(model.to(device).eval().requires_grad_(False))  # as loading.load leaves it


@pytest.mark.parametrize("on_chip", [0, 1, 3])
@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_cuda_offloaded_logits_equal_full_cache(on_chip, kernels, monkeypatch):
    """The offloaded L3 attends through the kernel dispatch: the references, or Triton (auto on CUDA)."""
    model = _model()
    ids = torch.randint(0, 320, (300,), generator=torch.Generator().manual_seed(0)).cuda()
    monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", "reference")
    full = FullCache(model.cfg, "cuda", torch.float32)
    chunks = (ids[:250], ids[250:257], ids[257:258], ids[258:259])
    want = [model(chunk, full) for chunk in chunks]
    monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", kernels)
    off = OffloadedCache(model.cfg, "cuda", torch.float32, 400, on_chip)
    for chunk, ref in zip(chunks, want):
        assert (model(chunk, off) - ref).abs().max() < 1e-3


@pytest.mark.parametrize("mode", ["autoregressive", "triforce"])
def test_cuda_offloaded_tokens_equal(mode):
    model = _model()
    ids = torch.randint(0, 320, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams()
    settings = EngineSettings(budget=64, chunk_size=8, gamma=4, draft_gamma=2, sinks=4, window=64)
    cache = OffloadedCache(model.cfg, "cuda", torch.float32, 200 + 24 + 5, 1, link_gbps=link_bandwidth("cuda"))
    if mode == "autoregressive":
        want = generate_autoregressive(model, ids, 24, params, [])
        got = generate_autoregressive(model, ids, 24, params, [], cache=cache)
    else:
        want = generate_triforce(model, None, ids, 24, params, [], settings)
        got = generate_triforce(model, None, ids, 24, params, [], settings, cache=cache)
    assert got.token_ids == want.token_ids
    assert got.stats["h2d_bytes"] > 0 and got.stats["link_gbps"] > 0.5
    print(mode, {k: got.stats[k] for k in ("h2d_bytes_per_token", "h2d_gbps", "copy_wait_fraction_of_l3", "link_fraction")})


def test_link_probe_measures():
    gbps = link_bandwidth("cuda", refresh=True)
    assert 0.5 < gbps < 1000
    assert link_bandwidth("cuda") == gbps  # cached


def restore_round_trip(model: CausalLM, store_dir, offloaded: bool) -> tuple[list[int], list[int], int]:
    """(cold tokens, tokens after a restart that restores the document from the KV store, rows restored)."""
    ids = torch.randint(0, 320, (2 * BLOCK + 40,), generator=torch.Generator().manual_seed(2)).tolist()
    settings = EngineSettings(budget=64, chunk_size=8, gamma=4, sinks=4, window=64)
    runs = []
    for _ in range(2):  # cold (the blocks are saved), then as a fresh process would (they are restored)
        capacity = len(ids) + 24
        cache = OffloadedCache(model.cfg, model.device, torch.float32, capacity, 1) if offloaded else None
        session = Session(model, None, SamplingParams(), [], settings, torch.Generator(model.device), "triforce",
                          cache=cache, capacity=capacity, kv_store=KVStore(store_dir, model))
        session.extend(ids)
        result = session.generate(16)
        runs.append((result.token_ids, result.stats["restored_tokens"]))
    assert runs[0][1] == 0
    return runs[0][0], runs[1][0], runs[1][1]


@pytest.mark.parametrize("offloaded", [False, True])
def test_cuda_restore_from_the_kv_store_gives_the_cold_tokens(offloaded, tmp_path):
    """A document's blocks restored into a CUDA cache (the on-device one, or pinned host rows) give the
    cold prefill's tokens."""
    cold, warm, restored = restore_round_trip(_model(), tmp_path, offloaded)
    assert restored == 2 * BLOCK and warm == cold
