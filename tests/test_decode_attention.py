"""The CPU decode attention (offload_runtime/kernels/decode.py) equals the reference; the dispatch routes few queries to it."""
from __future__ import annotations

import pytest
import torch

from offload_runtime import kernels
from offload_runtime.kernels import decode
from offload_runtime.kernels.decode import attention_decode
from offload_runtime.kernels.reference import attention_reference
from offload_runtime.kernels.sdpa import attention_sdpa


def _inputs(hq, hkv, t, length, d=16, dtype=torch.float32, per_head=False, gap=0, seed=0):
    """q/k/v; keys at 0..length-1 (or, per_head, each KV head's own sorted subset of 0..2*length, as the
    retrieval cache holds, then the forward's own new rows); queries at the last t positions + gap."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, t, d, generator=g).to(dtype)
    k = torch.randn(hkv, length, d, generator=g).to(dtype)
    v = torch.randn(hkv, length, d, generator=g).to(dtype)
    if per_head and length >= t:
        old = [torch.randperm(2 * length, generator=g)[: length - t].sort().values for _ in range(hkv)]
        k_pos = torch.stack([torch.cat([p, torch.arange(2 * length, 2 * length + t)]) for p in old])
        q_pos = torch.arange(2 * length, 2 * length + t) + gap
    else:
        k_pos = torch.arange(length)
        q_pos = torch.arange(length - t, length) + gap
    return q, k, v, q_pos, k_pos


def _check(q, k, v, q_pos, k_pos, window=None):
    got = attention_decode(q, k, v, q_pos, k_pos, window)
    want = attention_reference(q.float(), k.float(), v.float(), q_pos, k_pos, window)  # fp32 oracle
    assert got.shape == q.shape and got.dtype == q.dtype
    assert not torch.isnan(got).any()
    tol = 1e-5 if q.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (16, 2)])  # GQA ratios 1, 4, 8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_equals_reference(hq, hkv, dtype, per_head, window):
    for t, length in [(1, 1), (1, 37), (3, 37), (7, 64), (16, 129), (1, 0), (0, 9)]:
        _check(*_inputs(hq, hkv, t, length, dtype=dtype, per_head=per_head, seed=t * 100 + length), window)


@pytest.mark.parametrize("gap", [-3, 2])
def test_queries_before_keys_and_after_them(gap):
    """gap -3: the first queries see no key at all (output zeros, as the reference); gap 2: all visible."""
    _check(*_inputs(8, 2, 4, 3, gap=gap, seed=5))
    _check(*_inputs(8, 2, 4, 40, gap=gap, seed=6), 4)


def test_every_key_visible_builds_no_mask(monkeypatch):
    """The decode step's common case (queries past every key, no window) calls SDPA with no mask."""
    def masked(*args):
        raise AssertionError("the masked path was taken although every key is visible")

    monkeypatch.setattr(decode, "attention_sdpa", masked)
    _check(*_inputs(8, 2, 1, 300, seed=7))
    _check(*_inputs(4, 4, 2, 50, gap=1, seed=8))  # two queries, both past every key
    _check(*_inputs(8, 2, 1, 30, seed=12), 30)  # a window that still covers every key


def test_the_reference_comparison_catches_a_missing_mask(monkeypatch):
    """Sabotage: treating every key as visible (no causal mask over a block's own rows, no window)
    fails the check."""
    monkeypatch.setattr(decode, "every_key_visible", lambda *args: True)
    with pytest.raises(AssertionError):
        _check(*_inputs(8, 2, 5, 40, seed=9))
    with pytest.raises(AssertionError):
        _check(*_inputs(8, 2, 1, 40, seed=9), 8)


@pytest.mark.parametrize("window,want", [(None, True), (11, True), (10, False)])
def test_every_key_visible(window, want):
    k_pos, q_pos = torch.arange(10), torch.tensor([9, 10])
    assert decode.every_key_visible(k_pos, q_pos, window) == want
    assert not decode.every_key_visible(k_pos, torch.tensor([8, 9]), None)
    assert not decode.every_key_visible(torch.tensor([[0, 1], [0, 5]]), torch.tensor([4]), None)  # per-head positions


def test_dispatch_routes_few_queries_to_decode(monkeypatch):
    monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", "auto")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    few = _inputs(8, 2, decode.DECODE_MAX_QUERIES, 50, seed=10)
    many = _inputs(8, 2, decode.DECODE_MAX_QUERIES + 1, 50, seed=11)
    assert torch.equal(kernels.attention(*few), attention_decode(*few))
    assert torch.equal(kernels.attention(*many), attention_sdpa(*many))
    monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", "reference")
    assert torch.equal(kernels.attention(*few), attention_reference(*few))
