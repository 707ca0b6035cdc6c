"""Every Triton kernel equals its PyTorch reference; the dispatch picks and refuses as documented.

On a machine without CUDA the kernels run in Triton's interpreter: the `tk` fixture sets
TRITON_INTERPRET=1 for this module before the kernels are first imported. With CUDA the
same tests run the compiled kernels on the GPU (bench/gpu_check.sh).
Outputs are allocated NaN-filled (the kernels' `triton_common.alloc` is replaced), so a test
fails if any element is left unwritten.
"""
from __future__ import annotations

import pytest
import torch

from offload_runtime import kernels
from offload_runtime.kernels import reference as ref
from offload_runtime.kernels.decode import attention_decode
from offload_runtime.kernels.sdpa import attention_sdpa

pytest.importorskip("triton")  # (not installed on macOS or Windows: the references are all there is)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# On CUDA, fp16/bf16 operands go to tl.dot as they are (softmax weights rounded to the input dtype
# before P@V, as flash attention does); the interpreter computes in fp32 throughout.
_HALF = 2.0 if DEVICE.type == "cuda" else 1.0
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=2e-3 * _HALF, rtol=2e-3 * _HALF),
       torch.bfloat16: dict(atol=2e-2 * _HALF, rtol=2e-2 * _HALF)}


def common():
    """kernels/triton_common.py (imported through the `tk` fixture, after TRITON_INTERPRET is set)."""
    from offload_runtime.kernels import triton_common

    return triton_common


@pytest.fixture(scope="module")
def tk():
    """The Triton kernel module, interpreted on CPU, with NaN-poisoned output buffers."""
    mp = pytest.MonkeyPatch()
    if DEVICE.type == "cpu":
        mp.setenv("TRITON_INTERPRET", "1")
    module = kernels.load_triton()
    if DEVICE.type == "cpu" and not module.INTERPRETED:
        pytest.fail("the Triton kernels were imported before TRITON_INTERPRET=1 was set")

    def poisoned(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    mp.setattr(common(), "alloc", poisoned)  # every kernel module allocates through it
    yield module
    mp.undo()


def _inputs(hq, hkv, t, length, d, dtype, seed, per_head_pos=False, gap=0):
    """Random q/k/v; keys at positions 0..length-1 (or a random sorted subset of 0..2*length per
    head, as the retrieval cache holds); the queries at the last t positions (a forward's own new
    rows, so the causal mask cuts inside the keys), shifted by `gap`."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, t, d, generator=g).to(dtype)
    k = torch.randn(hkv, length, d, generator=g).to(dtype)
    v = torch.randn(hkv, length, d, generator=g).to(dtype)
    if per_head_pos:
        k_pos = torch.stack([torch.randperm(2 * length + 1, generator=g)[:length].sort().values for _ in range(hkv)])
        top = 2 * length + 1
    else:
        k_pos = torch.arange(length)
        top = length
    q_pos = torch.arange(top - t, top) + gap
    to = dict(device=DEVICE)
    return q.to(**to), k.to(**to), v.to(**to), q_pos.to(**to), k_pos.to(**to)


def _assert_written_close(got, want, dtype):
    assert not torch.isnan(got).any(), "output has unwritten (NaN) elements"
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), **TOL[dtype])


def _assert_lse_close(got, want):
    assert not torch.isnan(got).any(), "lse has unwritten (NaN) elements"
    assert torch.equal(torch.isinf(got).cpu(), torch.isinf(want).cpu())
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].cpu(), want[finite].cpu(), atol=1e-4, rtol=1e-4)


# (Hq, Hkv, T, L, D, sliding_window, per-head positions, split_size): GQA ratios 1, 4 and 8,
# lengths off the 64-key tile, 1 and 0 keys, head_dim not a power of two, several key splits.
ATTENTION_CASES = [
    (2, 2, 1, 1, 16, None, False, None),
    (4, 4, 3, 0, 16, None, False, None),
    (8, 2, 1, 70, 32, None, False, None),
    (8, 2, 7, 70, 32, 20, False, 64),
    (8, 1, 5, 130, 16, None, True, 64),
    (16, 2, 4, 37, 24, None, True, None),
    (8, 1, 2, 200, 64, 50, False, 64),
    (4, 1, 16, 65, 16, None, False, None),
    (4, 1, 40, 150, 16, 30, True, 64),  # more than SKIP_TILES_ABOVE queries: invisible key tiles skipped
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "hq{}-hkv{}-t{}-l{}-d{}-w{}-ph{}-s{}".format(*c))
def test_attention_matches_reference(tk, case, dtype):
    hq, hkv, t, length, d, window, per_head, split = case
    q, k, v, q_pos, k_pos = _inputs(hq, hkv, t, length, d, dtype, seed=length + t, per_head_pos=per_head)
    got = tk.attention_triton(q, k, v, q_pos, k_pos, window, split_size=split)
    assert got.dtype == dtype and got.shape == q.shape
    _assert_written_close(got, ref.attention_reference(q, k, v, q_pos, k_pos, window), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "hq{}-hkv{}-t{}-l{}-d{}-w{}-ph{}-s{}".format(*c))
def test_attention_partial_matches_reference(tk, case, dtype):
    hq, hkv, t, length, d, window, per_head, split = case
    q, k, v, q_pos, k_pos = _inputs(hq, hkv, t, length, d, dtype, seed=length * 3 + t, per_head_pos=per_head)
    # slab of later keys: the first queries see none of it (out 0, lse -inf)
    q_pos = q_pos - (t // 2) - (k_pos.max().item() if length else 0) // 2
    out, lse = tk.attention_partial_triton(q, k, v, q_pos, k_pos, window, split_size=split)
    want_out, want_lse = ref.attention_partial_reference(q, k, v, q_pos, k_pos, window)
    assert out.dtype == torch.float32 and lse.shape == (hq, t)
    _assert_written_close(out, want_out, dtype)
    _assert_lse_close(lse, want_lse)


def test_bfloat16_attention_matches_reference(tk):
    q, k, v, q_pos, k_pos = _inputs(8, 2, 3, 45, 16, torch.bfloat16, seed=5)
    _assert_written_close(tk.attention_triton(q, k, v, q_pos, k_pos, None),
                          ref.attention_reference(q, k, v, q_pos, k_pos, None), torch.bfloat16)


def test_strided_views(tk):
    """The caches hand views (k/v rows of a larger buffer, positions rows of a [Hkv, cap] table)."""
    q, k, v, q_pos, k_pos = _inputs(8, 2, 3, 90, 16, torch.float32, seed=11)
    k_big, v_big = torch.randn(2, 128, 16, device=DEVICE), torch.randn(2, 128, 16, device=DEVICE)
    k_big[:, :90], v_big[:, :90] = k, v
    pos_table = torch.stack([k_pos, k_pos]).repeat_interleave(2, dim=1)[:, ::2]  # [2, 90], stride 2 in dim 1
    q_pos_view = torch.stack([q_pos, q_pos], dim=1)[:, 0]  # stride 2
    got = tk.attention_triton(q.transpose(0, 1).contiguous().transpose(0, 1), k_big[:, :90], v_big[:, :90],
                              q_pos_view, pos_table, 40)
    _assert_written_close(got, ref.attention_reference(q, k, v, q_pos, k_pos, 40), torch.float32)


def test_query_that_sees_no_key_outputs_zeros(tk):
    q, k, v, _, k_pos = _inputs(4, 1, 2, 10, 16, torch.float32, seed=1)
    q_pos = torch.tensor([-1, 3], device=DEVICE)  # first query precedes every key
    got = tk.attention_triton(q, k, v, q_pos, k_pos + 0, None)
    assert torch.all(got[:, 0] == 0)
    _assert_written_close(got, ref.attention_reference(q, k, v, q_pos, k_pos, None), torch.float32)


def test_no_queries(tk):
    q, k, v, q_pos, k_pos = _inputs(4, 2, 0, 10, 16, torch.float32, seed=2)
    assert tk.attention_triton(q, k, v, q_pos, k_pos).shape == (4, 0, 16)
    out, lse = tk.attention_partial_triton(q, k, v, q_pos, k_pos)
    assert out.shape == (4, 0, 16) and lse.shape == (4, 0)


@pytest.mark.parametrize("n_splits", [0, 1, 3, 5])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_merge_matches_reference(tk, n_splits, out_dtype):
    g = torch.Generator().manual_seed(n_splits)
    outs = torch.randn(n_splits, 8, 3, 24, generator=g)
    lses = torch.randn(n_splits, 8, 3, generator=g) * 4
    if n_splits:
        lses[:, 0, 0] = float("-inf")  # a query that saw no key in any split
        lses[0, 1, :] = float("-inf")  # a split where some queries saw nothing
        outs[0, 1, :] = 0.0
    outs, lses = outs.to(DEVICE), lses.to(DEVICE)
    out, lse = tk.merge_partials_triton(outs, lses, out_dtype)
    want_out, want_lse = ref.merge_partials_reference(outs, lses, out_dtype)
    assert out.dtype == out_dtype
    _assert_written_close(out, want_out, torch.float16 if out_dtype == torch.float16 else torch.float32)
    _assert_lse_close(lse, want_lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,window,per_head", [(8, 1, None, False), (8, 2, 30, False), (4, 4, None, True)])
def test_streamed_attention_equals_whole_cache(tk, dtype, hq, hkv, window, per_head):
    """Slabs of any sizes (empty, 1 row, off the tile size), merged, equal attention over the whole cache."""
    q, k, v, q_pos, k_pos = _inputs(hq, hkv, 4, 150, 16, dtype, seed=hq + hkv, per_head_pos=per_head)
    bounds = [0, 0, 1, 38, 101, 150]
    slabs = [(k[:, a:b], v[:, a:b], k_pos[..., a:b]) for a, b in zip(bounds, bounds[1:])]
    want = ref.attention_reference(q, k, v, q_pos, k_pos, window)
    triton_pair = (tk.attention_partial_triton, tk.merge_partials_triton)
    _assert_written_close(ref.merge_streamed(q, iter(slabs), q_pos, window, *triton_pair), want, dtype)
    _assert_written_close(ref.streamed_attention_reference(q, slabs, q_pos, window), want, dtype)
    assert torch.all(ref.merge_streamed(q, [], q_pos, window, *triton_pair) == 0)


def _assert_selection_ok(got, scores, n_select):
    """Same chunks as the reference, up to near-ties: every kept chunk scores at least as well as
    every dropped one (within fp32 rounding), chunk 0 always kept, ascending."""
    n_chunks = scores.shape[1]
    assert got.shape == (scores.shape[0], min(n_select, n_chunks))
    if got.numel() == 0:
        return
    assert torch.all(got[:, 0] == 0) and torch.all(got[:, 1:] > got[:, :-1])
    for head in range(scores.shape[0]):
        kept = set(got[head].tolist()) - {0}
        dropped = set(range(1, n_chunks)) - kept
        if kept and dropped:
            worst_kept = min(scores[head, i].item() for i in kept)
            best_dropped = max(scores[head, i].item() for i in dropped)
            assert worst_kept >= best_dropped - 1e-4 * (1 + abs(best_dropped))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,n_chunks,d", [(2, 2, 1, 16), (8, 2, 37, 32), (8, 1, 100, 16), (16, 2, 0, 16),
                                               (4, 4, 5, 24)])
def test_chunk_scores_and_selection_match_reference(tk, dtype, hq, hkv, n_chunks, d):
    g = torch.Generator().manual_seed(n_chunks + hq)
    chunk_keys = torch.randn(hkv, n_chunks, d, generator=g).to(dtype).to(DEVICE)
    query = torch.randn(hq, d, generator=g).to(dtype).to(DEVICE)
    scores = tk.chunk_scores_triton(chunk_keys, query)
    want = ref.chunk_scores_reference(chunk_keys, query)
    _assert_written_close(scores, want, torch.float32)
    for n_select in (1, 3, n_chunks, n_chunks + 4):
        got = tk.select_chunks_triton(chunk_keys, query, n_select)
        expected = ref.select_chunks_reference(chunk_keys, query, n_select)
        assert got.shape == expected.shape
        _assert_selection_ok(got.cpu(), want.cpu(), n_select)


def test_chunk_scores_of_strided_keys(tk):
    """The retrieval cache scores views; the kernel takes strides, not contiguous copies."""
    base = torch.randn(3, 40, 16).to(DEVICE)
    chunk_keys = base.transpose(0, 1)[:20].transpose(0, 1)  # [3, 20, 16], non-contiguous
    query = torch.randn(6, 16).to(DEVICE)
    _assert_written_close(tk.chunk_scores_triton(chunk_keys, query), ref.chunk_scores_reference(chunk_keys, query),
                          torch.float32)


# ---- dispatch and bad input --------------------------------------------------------------------


def test_mode_reference_and_bad_mode(tk, monkeypatch):
    q, k, v, q_pos, k_pos = _inputs(4, 2, 2, 10, 16, torch.float32, seed=3)
    monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", "reference")
    monkeypatch.setattr(tk, "attention_triton", None)  # would fail if called
    assert torch.equal(kernels.attention(q, k, v, q_pos, k_pos), ref.attention_reference(q, k, v, q_pos, k_pos))
    monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", "fast")
    with pytest.raises(ValueError, match="OFFLOAD_RUNTIME_KERNELS='fast'"):
        kernels.attention(q, k, v, q_pos, k_pos)


def test_forced_triton_runs_triton(tk, monkeypatch):
    q, k, v, q_pos, k_pos = _inputs(4, 2, 2, 10, 16, torch.float32, seed=4)
    calls = []
    real = tk.attention_triton
    monkeypatch.setattr(tk, "attention_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", "triton")
    _assert_written_close(kernels.attention(q, k, v, q_pos, k_pos), ref.attention_reference(q, k, v, q_pos, k_pos),
                          torch.float32)
    assert calls == [1]


def test_forced_triton_refuses_unsupported_dtype_and_auto_falls_back(tk, monkeypatch):
    q, k, v, q_pos, k_pos = _inputs(4, 2, 2, 10, 16, torch.float64, seed=6)
    monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", "triton")
    with pytest.raises(ValueError, match="torch.float64"):
        kernels.attention(q, k, v, q_pos, k_pos)
    with pytest.raises(ValueError, match="torch.float64"):
        kernels.select_chunks(k, q[:, 0], 2)
    with pytest.raises(ValueError, match="torch.float64"):
        tk.attention_triton(q, k, v, q_pos, k_pos)
    monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", "auto")  # falls back: SDPA on CPU tensors
    assert torch.allclose(kernels.attention(q, k, v, q_pos, k_pos), ref.attention_reference(q, k, v, q_pos, k_pos),
                          atol=1e-10)


def test_bad_shapes_are_named(tk):
    q, k, v, q_pos, k_pos = _inputs(6, 4, 2, 10, 16, torch.float32, seed=7)
    with pytest.raises(ValueError, match="6 query heads are not a multiple of 4 KV heads"):
        tk.attention_triton(q, k, v, q_pos, k_pos)
    q, k, v, q_pos, k_pos = _inputs(4, 2, 2, 10, 16, torch.float32, seed=7)
    with pytest.raises(ValueError, match="k_pos must be"):
        tk.attention_triton(q, k, v, q_pos, k_pos[:5])
    with pytest.raises(ValueError, match="split_size must be a positive multiple"):
        tk.attention_triton(q, k, v, q_pos, k_pos, split_size=10)
    with pytest.raises(ValueError, match="chunk scores need"):
        tk.chunk_scores_triton(k, q)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CPU-only dispatch rule")
def test_forced_triton_on_cpu_needs_interpreter(tk, monkeypatch):
    q, k, v, q_pos, k_pos = _inputs(4, 2, 2, 10, 16, torch.float32, seed=8)
    monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.attention(q, k, v, q_pos, k_pos)
    monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", "auto")  # auto on CPU, few queries: kernels/decode.py
    got = kernels.attention(q, k, v, q_pos, k_pos)
    assert torch.equal(got, attention_decode(q, k, v, q_pos, k_pos))
    assert torch.allclose(got, ref.attention_reference(q, k, v, q_pos, k_pos), atol=1e-5)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("per_head,window", [(False, None), (True, None), (False, 5), (True, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sdpa_fast_path_equals_reference(hq, hkv, per_head, window, dtype):
    """The CPU fast path (torch SDPA) against the reference: decode and prefill shapes, per-head positions."""
    for t, length in [(1, 37), (5, 37), (37, 37), (0, 9)]:
        q, k, v, q_pos, k_pos = _inputs(hq, hkv, t, length, 16, dtype, seed=t + length)
        if per_head:  # the retrieval cache's rows: each KV head has its own (sorted, distinct) positions
            g = torch.Generator().manual_seed(length)
            prompt = [torch.randperm(100, generator=g)[: length - t].sort().values for _ in range(hkv)]
            k_pos = torch.stack([torch.cat([p, torch.arange(100, 100 + t)]) for p in prompt]).to(q.device)
            q_pos = torch.arange(100, 100 + t, device=q.device)
        want = ref.attention_reference(q, k, v, q_pos, k_pos, window)
        got = attention_sdpa(q, k, v, q_pos, k_pos, window)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        assert got.shape == want.shape
        assert torch.allclose(got.float(), want.float(), atol=tol, rtol=0)


@pytest.mark.parametrize("window", [None, 24])
def test_prefill_sized_attention_runs_triton(tk, monkeypatch, window):
    """A causal prefill (queries = the keys' own rows, several query tiles, skipped key tiles)."""
    q, k, v, q_pos, k_pos = _inputs(4, 2, 100, 100, 16, torch.float32, seed=9)
    calls = []
    real = tk.attention_triton
    monkeypatch.setattr(tk, "attention_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", "triton")
    _assert_written_close(kernels.attention(q, k, v, q_pos, k_pos, window),
                          ref.attention_reference(q, k, v, q_pos, k_pos, window), torch.float32)
    assert calls == [1]


def test_tensors_beyond_32_bit_offsets_are_refused(tk):
    huge = torch.empty(2, 2**30, 4, device="meta")  # no memory: only the shape is checked
    with pytest.raises(ValueError, match="32-bit offsets"):
        common().check_offsets(k=huge)
    common().check_offsets(k=torch.empty(2, 2**20, 4, device="meta"))


# ---- the engine with the kernels on ----------------------------------------------------------


def test_engine_greedy_tokens_unchanged_with_triton_kernels(tk, monkeypatch, checkpoint, long_text):
    """TriForce (draft + retrieval + full cache) with every kernel forced to Triton (interpreted
    on CPU) emits the greedy tokens of autoregressive decoding with the reference kernels."""
    from offload_runtime import loading
    from offload_runtime.generate import generate_triforce
    from offload_runtime.settings import EngineSettings
    from offload_runtime.generate import generate_autoregressive
    from offload_runtime.sampling import SamplingParams

    target = loading.load(str(checkpoint("llama")), DEVICE, "float32")  # 4 query heads, 2 KV heads
    draft = loading.load(str(checkpoint("llama", seed=1, num_hidden_layers=1)), DEVICE, "float32")
    prompt = target.tokenizer(long_text)["input_ids"][:100]
    params, n_new = SamplingParams(temperature=0.0), 16
    # mean-key: the selection that scores chunks with the chunk_scores kernel (the engine's best-key is a matmul)
    settings = EngineSettings(budget=32, chunk_size=4, gamma=4, draft_gamma=2, sinks=4, window=32,
                              selection="mean-key")

    monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", "reference")
    want = generate_autoregressive(target.model, prompt, n_new, params, eos_ids=[]).token_ids

    calls = {"attention": 0, "chunk_scores": 0}
    for name, fn in (("attention", tk.attention_triton), ("chunk_scores", tk.chunk_scores_triton)):
        def counted(*args, _name=name, _fn=fn, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(tk, f"{name}_triton", counted)
    monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", "triton")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's threads waking between interpreted kernels cost more than they save here
    try:
        got = generate_triforce(target.model, draft.model, prompt, n_new, params, [], settings)
    finally:
        torch.set_num_threads(threads)
    assert got.token_ids == want
    assert got.stats["retrieval_rows"] < len(prompt), "the retrieval cache should hold a selection"
    assert calls["chunk_scores"] == target.model.cfg.num_layers
    assert calls["attention"] > 0


@pytest.mark.parametrize("hq,hkv,t,length", [(8, 2, 5, 37), (8, 2, 37, 37), (4, 4, 16, 100), (8, 1, 1, 9)])
def test_prefill_block_is_attended_without_a_mask(monkeypatch, hq, hkv, t, length):
    """A prefill block (queries = the last rows of contiguous keys) takes the maskless split: the
    flash kernel twice (once when the block is the whole context), merged by log-sum-exp, equal to
    the reference; per-head positions, a window or a gap in the positions keep the masked path."""
    from offload_runtime.kernels import sdpa

    calls = []
    real = sdpa._FLASH
    monkeypatch.setattr(sdpa, "_FLASH", lambda *a: calls.append(a[4]) or real(*a))
    q, k, v, q_pos, k_pos = _inputs(hq, hkv, t, length, 16, torch.float32, seed=t)
    q, k, v, q_pos, k_pos = (x.cpu() for x in (q, k, v, q_pos, k_pos))
    want = ref.attention_reference(q, k, v, q_pos, k_pos)
    assert torch.allclose(attention_sdpa(q, k, v, q_pos, k_pos), want, atol=1e-5, rtol=0)
    assert calls == ([True] if t == length else [True, False])  # own rows causal, earlier rows unmasked
    calls.clear()
    assert torch.allclose(attention_sdpa(q, k, v, q_pos, k_pos, 4), ref.attention_reference(q, k, v, q_pos, k_pos, 4),
                          atol=1e-5, rtol=0)
    gap = k_pos.clone()
    gap[0] = -1  # not 0..L-1: the masked path, still exact
    assert torch.allclose(attention_sdpa(q, k, v, q_pos, gap), ref.attention_reference(q, k, v, q_pos, gap),
                          atol=1e-5, rtol=0)
    assert calls == []
