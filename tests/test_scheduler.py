"""The transfer scheduler on the CPU backend: order of copies and computes, slab reuse, bytes."""
from __future__ import annotations

import json

import pytest
import torch

from offload_runtime.caches.offloaded import OffloadedCache, kv_row_bytes
from offload_runtime.cuda_streams import CpuBackend, LayerPipeline, probe
from offload_runtime.synthetic import hf_config
from offload_runtime.config import ModelConfig

ROW = (2, 2, 4)  # K/V, heads, head dim
ROW_BYTES = 2 * 2 * 4 * 4  # fp32


def run_pass(pipe: LayerPipeline, rows: int, new: int) -> None:
    """What a forward does: every layer acquired, new rows written, released in order."""
    pipe.begin_pass(rows)
    for i in range(pipe.n_layers):
        slab = pipe.acquire(i)
        slab[rows:rows + new] = float(i)
        pipe.release(i, rows, rows + new)


def test_order_of_copies_and_computes():
    backend = CpuBackend("cpu", trace=True)
    pipe = LayerPipeline(backend, 4, ROW, capacity=32, dtype=torch.float32, n_slabs=2)
    run_pass(pipe, rows=10, new=3)
    assert backend.trace == [
        ("h2d", 0, 0, 10), ("h2d", 1, 1, 10),  # begin_pass fills both slabs
        ("compute", 0, 0), ("d2h", 0, 0, 10, 13), ("free", 0, 0),
        ("h2d", 2, 0, 10),  # layer 2 goes into slab 0 once layer 0 freed it, before layer 1 computes
        ("compute", 1, 1), ("d2h", 1, 1, 10, 13), ("free", 1, 1),
        ("h2d", 3, 1, 10),
        ("compute", 2, 0), ("d2h", 2, 0, 10, 13), ("free", 2, 0),
        ("compute", 3, 1), ("d2h", 3, 1, 10, 13), ("free", 3, 1),
    ]


def test_prefetch_depth_follows_ring_size():
    backend = CpuBackend("cpu", trace=True)
    pipe = LayerPipeline(backend, 5, ROW, capacity=8, dtype=torch.float32, n_slabs=3)
    run_pass(pipe, rows=4, new=1)
    events = [e for e in backend.trace if e[0] in ("h2d", "compute")]
    # with 3 slabs, layer i+2 is in flight while layer i computes
    assert events[:4] == [("h2d", 0, 0, 4), ("h2d", 1, 1, 4), ("h2d", 2, 2, 4), ("compute", 0, 0)]
    assert events.index(("h2d", 3, 0, 4)) < events.index(("compute", 1, 1))
    for i in range(5):  # never overwrite a slab before its previous layer was freed
        if i >= 3:
            assert backend.trace.index(("free", i - 3, i % 3)) < backend.trace.index(("h2d", i, i % 3, 4))


def test_slabs_are_reused_not_reallocated():
    backend = CpuBackend("cpu")
    pipe = LayerPipeline(backend, 6, ROW, capacity=16, dtype=torch.float32, n_slabs=2)
    ptrs = [s.data_ptr() for s in pipe.slabs]
    host = pipe.host.data_ptr()
    for step in range(3):
        run_pass(pipe, rows=4 + step, new=1)
        assert [s.data_ptr() for s in pipe.slabs] == ptrs and pipe.host.data_ptr() == host
    assert len(pipe.slabs) == 2
    assert pipe.slab_bytes == 2 * 16 * ROW_BYTES


def test_byte_accounting_and_round_trip():
    backend = CpuBackend("cpu")
    pipe = LayerPipeline(backend, 3, ROW, capacity=16, dtype=torch.float32)
    run_pass(pipe, rows=0, new=5)  # prefill: nothing to bring in, 5 rows per layer written back
    assert backend.stats.h2d_bytes == 0 and backend.stats.d2h_bytes == 3 * 5 * ROW_BYTES
    before = backend.stats.copy()
    run_pass(pipe, rows=5, new=2)  # one step of 2 tokens
    step = backend.stats.minus(before)
    assert step.h2d_bytes == 3 * 5 * ROW_BYTES  # every offloaded layer's rows for the current length
    assert step.d2h_bytes == 3 * 2 * ROW_BYTES  # only the new rows go back
    assert step.h2d_copies == 3 and step.d2h_copies == 3
    for i in range(3):  # the host holds what the computes wrote
        assert torch.equal(pipe.host_rows(i, 0, 7), torch.full((7,) + ROW, float(i)))


def test_pipeline_rejects_bad_shapes():
    with pytest.raises(ValueError):
        LayerPipeline(CpuBackend("cpu"), 2, ROW, capacity=8, dtype=torch.float32, n_slabs=1)
    pipe = LayerPipeline(CpuBackend("cpu"), 2, ROW, capacity=8, dtype=torch.float32)
    with pytest.raises(ValueError):
        pipe.begin_pass(9)


def _cfg(layers: int = 4) -> ModelConfig:
    return ModelConfig.from_hf(hf_config("llama", 64, num_hidden_layers=layers, hidden_size=32,
                                         num_attention_heads=4, num_key_value_heads=2))


@pytest.mark.parametrize("on_chip", [0, 1, 3, 4])
def test_offloaded_cache_bytes_per_pass(on_chip):
    """Bytes per L3 pass = the offloaded layers' K/V for the current length; written back = new rows only."""
    cfg = _cfg(4)
    backend = CpuBackend("cpu", trace=True)
    cache = OffloadedCache(cfg, "cpu", torch.float32, capacity=64, on_chip_layers=on_chip, backend=backend)
    row = kv_row_bytes(cfg, torch.float32)
    gen = torch.Generator().manual_seed(0)

    def forward(n: int) -> None:
        for layer in range(cfg.num_layers):
            q = torch.randn(cfg.num_heads, n, cfg.head_dim, generator=gen)
            k = torch.randn(cfg.num_kv_heads, n, cfg.head_dim, generator=gen)
            cache.attend(layer, q, k, k.clone())
        cache.advance(n)

    forward(20)
    off = 4 - on_chip
    assert backend.stats.h2d_bytes == 0 and backend.stats.d2h_bytes == off * 20 * row
    for length, n in [(20, 7), (27, 1)]:
        before = backend.stats.copy()
        forward(n)
        step = backend.stats.minus(before)
        assert step.h2d_bytes == cache.bytes_per_pass(length) == off * length * row
        assert step.d2h_bytes == off * n * row
    cache.truncate(25)  # rollback is a length: the next pass reads 25 rows
    before = backend.stats.copy()
    forward(3)
    assert backend.stats.minus(before).h2d_bytes == off * 25 * row
    computes = [e[1] for e in backend.trace if e[0] == "compute"]
    assert computes == list(range(off)) * 4  # every offloaded layer once per forward, in order


def test_capacity_is_the_plan():
    from offload_runtime.errors import UserError

    cache = OffloadedCache(_cfg(2), "cpu", torch.float32, capacity=8, on_chip_layers=1)
    q = torch.zeros(4, 9, 8)
    with pytest.raises(UserError, match="longer than the 8 tokens"):
        cache.attend(0, q, torch.zeros(2, 9, 8), torch.zeros(2, 9, 8))
    with pytest.raises(UserError, match="between 0 and the model's 2 layers"):
        OffloadedCache(_cfg(2), "cpu", torch.float32, capacity=8, on_chip_layers=3)


def test_link_probe_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_RUNTIME_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(probe, "measure_h2d", lambda device: calls.append(device) or 24.5)
    monkeypatch.setattr(probe, "device_key", lambda device: "host|RTX 4090|0000:01:00")
    assert probe.link_bandwidth("cpu") is None  # no link on CPU
    dev = torch.device("cuda", 0)
    assert probe.link_bandwidth(dev) == 24.5
    assert probe.link_bandwidth(dev) == 24.5
    assert len(calls) == 1
    assert json.loads((tmp_path / "link_bandwidth.json").read_text()) == {"host|RTX 4090|0000:01:00": 24.5}
    assert probe.link_bandwidth(dev, refresh=True) == 24.5 and len(calls) == 2


def test_cuda_host_buffers_are_exact_page_locked_blocks(monkeypatch):
    """CudaBackend.host_empty registers a page-aligned block of exactly the size asked (checked with a fake cudart)."""
    import gc
    import types

    from offload_runtime.cuda_streams import CudaBackend

    calls = []
    fake = types.SimpleNamespace(cudaHostRegister=lambda ptr, size, flags: calls.append(("reg", ptr, size)) or 0,
                                 cudaHostUnregister=lambda ptr: calls.append(("unreg", ptr)) or 0)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    backend = types.SimpleNamespace(copy_stream=types.SimpleNamespace(synchronize=lambda: calls.append(("sync",))),
                                    _registered={})
    t = CudaBackend.host_empty(backend, (3, 1000, 2, 2, 4), torch.float16)
    assert t.shape == (3, 1000, 2, 2, 4) and t.dtype == torch.float16
    (kind, ptr, size), = calls
    assert ptr == t.data_ptr() and ptr % 4096 == 0 and size == -(-t.numel() * 2 // 4096) * 4096
    t[2, 999] = 1.0  # the whole block is addressable
    # page_locked knows the registered block (torch's is_pinned() does not, from torch 2.11), a view
    # inside it too, and nothing else
    assert CudaBackend.page_locked(backend, t) and CudaBackend.page_locked(backend, t[1, 5:9])
    assert not CudaBackend.page_locked(backend, torch.empty(8))
    del t
    gc.collect()
    assert calls[-2:] == [("sync",), ("unreg", ptr)]  # no copy may still target the pages when they are released
    assert backend._registered == {}  # released: no longer reported page-locked
    fake.cudaHostRegister = lambda ptr, size, flags: 2  # cudaErrorMemoryAllocation
    with pytest.raises(RuntimeError, match="cudaHostRegister of .* GiB failed"):
        CudaBackend.host_empty(backend, (1000,), torch.float32)
