"""Races in the layer pipeline, caught on the emulated link (a real asynchronous copy engine).

A slow link, small copy pieces (the bytes of a copy land over its whole duration) and random
sleeps in compute between layers; many forwards of random lengths, rewrites after truncations.
Outputs and host rows must stay byte-identical to FullCache. Two sabotage tests prove the
harness bites: without the wait in `acquire`, or with a slab refilled before its write-back
is issued, the same harness fails.
"""
from __future__ import annotations

import random
import time

import pytest
import torch

from offload_runtime import loading, trained
from offload_runtime.caches import FullCache
from offload_runtime.caches.offloaded import OffloadedCache
from offload_runtime.cuda_streams import EmulatedLinkBackend, LayerPipeline

LINK_GBPS = 0.02  # 256-byte rows: a 200-row layer takes ~2.6 ms on this link
PIECE_BYTES = 512  # two rows per time slot: a write-back of 3+ rows spans several slots
JITTER_S = 300e-6  # compute sleeps up to this long before each layer
CAPACITY = 512
PASSES = 30


@pytest.fixture(scope="module", autouse=True)
def tiny_model_on_one_thread():
    with trained.one_thread():
        yield


@pytest.fixture(scope="module")
def model():
    return loading.load(str(trained.TARGET), torch.device("cpu"), "float32", with_tokenizer=False).model


def jittered(cache: OffloadedCache, rng: random.Random) -> None:
    """Random compute time between layers: the copy engine sees every kind of interleaving."""
    attend = cache.attend

    def slow_attend(layer, q, k, v):
        time.sleep(rng.random() * JITTER_S)
        return attend(layer, q, k, v)

    cache.attend = slow_attend


def check_host_rows(off: OffloadedCache, full: FullCache, where: str) -> None:
    for layer in range(full.cfg.num_layers):
        host = off.pipeline.host_rows(layer, 0, full.length)
        k, v = full.rows(layer, 0, full.length)
        assert torch.equal(host[:, 0].transpose(0, 1), k) and torch.equal(host[:, 1].transpose(0, 1), v), \
            f"{where}: host rows of layer {layer} differ from FullCache"


def race(model, seed: int, passes: int = PASSES) -> None:
    """Random forwards through FullCache and an all-offloaded cache on the emulated link: equal bytes."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    full = FullCache(cfg, "cpu", torch.float32, CAPACITY)
    backend = EmulatedLinkBackend("cpu", LINK_GBPS, piece_bytes=PIECE_BYTES)
    off = OffloadedCache(cfg, "cpu", torch.float32, CAPACITY, on_chip_layers=0, backend=backend)
    jittered(off, rng)
    try:
        for p in range(passes):
            if p and rng.random() < 0.3:  # rewrite: drop the last rows, the next forward writes new ones there
                keep = rng.randint(max(1, full.length - 24), full.length - 1)
                full.truncate(keep)
                off.truncate(keep)
            n = rng.randint(120, 200) if p == 0 else rng.choice([1, 1, 2, 3, 4, 6, 8, 12, 16])
            n = min(n, CAPACITY - full.length)
            tokens = torch.randint(0, cfg.vocab_size, (n,), generator=gen)
            want = model(tokens, full)
            got = model(tokens, off)
            assert torch.equal(got, want), f"seed {seed} pass {p}: outputs differ from FullCache"
            if rng.random() < 0.3:  # sometimes let copies of several passes pile up before looking
                check_host_rows(off, full, f"seed {seed} pass {p}")
        check_host_rows(off, full, f"seed {seed} end")
        stats = backend.collect()
        assert stats.h2d_bytes > 0 and stats.d2h_bytes > 0 and stats.wait_s > 0
    finally:
        backend.close()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pipeline_has_no_race_on_a_slow_link(model, seed):
    race(model, seed)


def acquire_without_wait(self: LayerPipeline, i: int) -> torch.Tensor:
    """Sabotage: compute may start before the layer's copy-in finished."""
    self.prefetch(i + len(self.slabs))
    return self.slabs[self.slab_of(i)]


def release_freeing_first(self: LayerPipeline, i: int, start: int, stop: int) -> None:
    """Sabotage: the slab is freed and refilled with the next layer before its write-back is issued."""
    s = self.slab_of(i)
    self.free[s] = self.backend.record()
    self.prefetch(i + 1 + len(self.slabs))
    if stop > start:
        self.written[i] = self.backend.copy(self.host[i, start:stop], self.slabs[s][start:stop], "d2h",
                                            after=self.backend.record())


@pytest.mark.parametrize("sabotage", [("acquire", acquire_without_wait), ("release", release_freeing_first)],
                         ids=["no-wait-in-acquire", "slab-freed-before-write-back"])
def test_sabotage_makes_the_race_test_fail(model, monkeypatch, sabotage):
    name, broken = sabotage
    monkeypatch.setattr(LayerPipeline, name, broken)
    with pytest.raises(AssertionError, match="differ from FullCache"):
        race(model, seed=0, passes=2 * PASSES)  # fails at the first forward or within a few, by timing
