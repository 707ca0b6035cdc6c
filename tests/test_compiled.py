"""The compiled one-token step (--compile): same tokens as transformers and as the eager step, taken
where it applies (autoregressive steps, TriForce's L2 steps), eager everywhere else, and a parity
check that catches a step writing the wrong cache row (sabotage)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from offload_runtime import compiled, loading
from offload_runtime.caches import FullCache
from offload_runtime.caches.offloaded import OffloadedCache
from offload_runtime.caches.retrieval import RetrievalCache
from offload_runtime.errors import UserError
from offload_runtime.fused import fuse_projections
from offload_runtime.model import MLP
from offload_runtime.generate import generate_autoregressive, generate_triforce
from offload_runtime.run import main
from offload_runtime.sampling import SamplingParams
from offload_runtime.settings import EngineSettings

GREEDY = SamplingParams(0.0, 1.0)
PROMPT = "Kamiro telan vorsi lu den. Paqui astber onul zeha? Nimtro gal esfi ward lych ment."
CPU = torch.device("cpu")


def load(path) -> torch.nn.Module:
    return loading.load(str(path), CPU, "float32", with_tokenizer=False).model


@pytest.fixture(scope="module")
def llama(checkpoint):
    """One compiled llama for the module (compiling takes seconds; the graph is reused)."""
    path = checkpoint("llama")
    return path, compiled.enable(load(path))


def prompt_ids(tokenizer, long_text, n: int) -> list[int]:
    return tokenizer(long_text)["input_ids"][:n]


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
FAMILIES = {"qwen2": ("qwen2", {}),  # the projections' biases
            "llama-yarn": ("llama", dict(max_position_embeddings=128, rope_parameters=YARN))}  # RoPE scaling != 1


@pytest.mark.parametrize("family", ["llama", *FAMILIES])
def test_compiled_greedy_equals_transformers_generate(family, checkpoint, tokenizer, llama):
    path, model = llama if family == "llama" else (checkpoint(FAMILIES[family][0], **FAMILIES[family][1]), None)
    model = model or compiled.enable(load(path))
    ids = tokenizer(PROMPT)["input_ids"]
    calls, graphs = model.one_token_step.calls, torch._dynamo.utils.counters["stats"]["unique_graphs"]
    got = generate_autoregressive(model, ids, 40, GREEDY, []).token_ids
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # enable's warm-up compiled the graph used
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=40)[0, len(ids):].tolist()
    assert got == want and len(set(want)) > 8
    assert model.one_token_step.calls - calls == 39  # every step after the prompt's own token


def step_mismatch(model, prompt: list[int], capacity: int) -> str | None:
    """Run the same one-token steps eagerly and compiled from one prefilled cache; what differs
    (logits, the cache's K/V rows or kept queries, the row count), or None."""
    step, caches = model.one_token_step, []
    for compiled_on in (False, True):
        model.one_token_step = step if compiled_on else None
        cache, logits = FullCache(model.cfg, CPU, torch.float32, capacity=capacity), []
        model(torch.tensor(prompt), cache)
        for token in (5, 9, 13, 2):  # past `capacity`: the buffers regrow between steps
            logits.append(model(torch.tensor([token]), cache))
        caches.append((cache, torch.cat(logits)))
    model.one_token_step = step
    (eager, want), (comp, got) = caches
    if eager.length != comp.length:
        return f"lengths {eager.length} != {comp.length}"
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
        return f"logits differ by {float((got - want).abs().max())}"
    for layer in range(model.cfg.num_layers):
        for a, b in zip(eager.rows(layer, 0, eager.length), comp.rows(layer, 0, comp.length)):
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
                return f"layer {layer} K/V rows differ by {float((a - b).abs().max())}"
        if not torch.allclose(eager.recent_queries[layer], comp.recent_queries[layer], rtol=1e-4, atol=1e-5):
            return f"layer {layer} kept queries differ"
    return None


def test_compiled_step_matches_eager_across_lengths_without_recompiling(llama, tokenizer, long_text):
    _, model = llama
    prompt = prompt_ids(tokenizer, long_text, 254)
    calls = model.one_token_step.calls
    assert step_mismatch(model, prompt[:30], 0) is None  # compiles here if no earlier test did
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert step_mismatch(model, prompt, 256) is None  # another length, and buffers regrown at 256
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # one graph for every length
    # 8 steps, one eager: at row 255 of a 256-row buffer the slice would be the whole buffer (another graph)
    assert model.one_token_step.calls - calls == 7


def test_first_token_of_an_empty_cache_runs_eagerly_without_a_second_graph(llama, tokenizer):
    """A one-token prompt: dynamo would specialize row 0 into a graph of its own (a second compile,
    ~1 minute on a real model) for a token that attends to itself alone; it runs eagerly."""
    _, model = llama
    ids, step = tokenizer(PROMPT)["input_ids"], model.one_token_step
    generate_autoregressive(model, ids[:5], 2, GREEDY, [])  # the graph exists (compiled here if no earlier test did)
    graphs, calls = torch._dynamo.utils.counters["stats"]["unique_graphs"], step.calls
    got = generate_autoregressive(model, ids[:1], 6, GREEDY, []).token_ids
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert step.calls - calls == 5  # every step but the prompt's own token
    model.one_token_step = None
    try:
        assert got == generate_autoregressive(model, ids[:1], 6, GREEDY, []).token_ids
    finally:
        model.one_token_step = step


def test_parity_check_catches_a_wrong_cache_row(llama, tokenizer, long_text, monkeypatch):
    """Sabotage: the compiled step writes each token's K/V one row too early."""
    _, model = llama
    rows = FullCache.one_token_rows

    def one_row_early(self):
        k, v, row = rows(self)
        return k, v, row - 1

    monkeypatch.setattr(FullCache, "one_token_rows", one_row_early)
    assert step_mismatch(model, prompt_ids(tokenizer, long_text, 30), 0) is not None


def test_the_compiled_step_is_the_models_own_layer_code(checkpoint, tokenizer, long_text, monkeypatch):
    """The graph traces DecoderLayer / Attention / MLP themselves, not a copy: a change to the layer's
    code (here the MLP's output doubled) reaches the compiled step as it reaches the eager one. A copy
    of the layer would not see it, and the parity check would report the difference."""
    mlp_forward = MLP.forward
    monkeypatch.setattr(MLP, "forward", lambda self, x: 2 * mlp_forward(self, x))
    # A shape no other test compiles: dynamo does not guard a class's methods, so a model of an
    # already compiled shape would reuse that graph (and a later one of this shape would reuse this)
    model = compiled.enable(load(checkpoint("llama", num_hidden_layers=1)))
    calls = model.one_token_step.calls
    assert step_mismatch(model, prompt_ids(tokenizer, long_text, 30), 0) is None
    assert model.one_token_step.calls - calls == 4  # the 4 steps were compiled ones


@pytest.fixture(scope="module")
def selection(llama, tokenizer, long_text) -> RetrievalCache:
    """A retrieval cache selected from a 600-token context (budget 248: 248 rows of 256 allocated)."""
    _, model = llama
    ids, full = prompt_ids(tokenizer, long_text, 600), FullCache(model.cfg, CPU, torch.float32)
    step, model.one_token_step = model.one_token_step, None
    model(torch.tensor(ids), full)
    model.one_token_step = step
    built = RetrievalCache(model.cfg, CPU, torch.float32, budget=248, chunk_size=8, reserve_rows=4)
    built.build(full, len(ids), [q[:, -1] for q in full.recent_queries])
    return built


def retrieval_mismatch(model, built: RetrievalCache) -> str | None:
    """L2's one-token steps (a rollback between) eagerly and compiled from copies of one selection:
    what differs (logits, K/V rows, their positions, the length), or None. TriForce's tokens cannot
    tell: the L3 pass corrects a wrong L2 step."""
    step, runs = model.one_token_step, []
    for compiled_on in (False, True):
        model.one_token_step, cache = step if compiled_on else None, copy.deepcopy(built)
        logits = [model(torch.tensor([t]), cache) for t in (5, 9, 13)]
        cache.truncate(cache.length - 2)  # a rejected draft
        logits += [model(torch.tensor([t]), cache) for t in range(2, 12)]  # past row 255: regrown
        runs.append((cache, torch.cat(logits)))
    model.one_token_step = step
    (eager, want), (comp, got) = runs
    n = eager._slot(eager.length)
    if (eager.length, eager.capacity) != (comp.length, comp.capacity):
        return f"length/capacity {eager.length}/{eager.capacity} != {comp.length}/{comp.capacity}"
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
        return f"logits differ by {float((got - want).abs().max())}"
    if not torch.equal(eager.pos[:, :, :n], comp.pos[:, :, :n]):
        return "row positions differ"
    for a, b in zip(eager.k + eager.v, comp.k + comp.v):
        if not torch.allclose(a[:, :n], b[:, :n], rtol=1e-4, atol=1e-5):
            return f"K/V rows differ by {float((a[:, :n] - b[:, :n]).abs().max())}"
    return None


def test_compiled_step_matches_eager_on_the_retrieval_cache(llama, selection):
    _, model = llama
    calls = model.one_token_step.calls
    assert retrieval_mismatch(model, selection) is None
    assert model.one_token_step.calls - calls == 12  # 13 steps, one eager: row 255 of a 256-row buffer


@pytest.mark.parametrize("fault", ["row", "position"])
def test_retrieval_parity_check_catches_a_wrong_row_or_position(llama, selection, fault, monkeypatch):
    """Sabotage: the step writes each token's K/V one row too early, or does not record its position."""
    _, model = llama
    rows = RetrievalCache.one_token_rows

    def faulty(self):
        if (slots := rows(self)) is None:
            return None
        k, v, row = slots
        if fault == "position":
            self.pos[:, :, row] = 0
        return k, v, row - (fault == "row")

    monkeypatch.setattr(RetrievalCache, "one_token_rows", faulty)
    assert retrieval_mismatch(model, selection) is not None


def test_triforce_l2_steps_run_compiled(llama, tokenizer, long_text):
    _, model = llama
    ids = prompt_ids(tokenizer, long_text, 600)
    step, model.one_token_step = model.one_token_step, None
    want = generate_autoregressive(model, ids, 30, GREEDY, []).token_ids
    model.one_token_step, calls = step, step.calls
    got = generate_triforce(model, None, ids, 30, GREEDY, [], EngineSettings(budget=64, chunk_size=8, gamma=4)).token_ids
    assert got == want
    assert step.calls - calls >= 20  # the L2 steps over the retrieval cache (the L3 blocks stay eager)


def test_eager_where_the_step_does_not_apply(llama, tokenizer, long_text):
    _, model = llama
    step, ids = model.one_token_step, prompt_ids(tokenizer, long_text, 40)
    calls = step.calls
    cache = FullCache(model.cfg, CPU, torch.float32)
    model(torch.tensor(ids), cache)  # a prompt chunk
    offloaded = OffloadedCache(model.cfg, CPU, torch.float32, capacity=64, on_chip_layers=0)
    model(torch.tensor(ids), offloaded)
    model(torch.tensor([5]), offloaded)  # a cache that does not give rows
    assert step.calls == calls
    attn = model.model.layers[1].self_attn
    saved = attn.q_proj.weight
    attn.q_proj.weight = torch.nn.Parameter(saved.clone(), requires_grad=False)  # the fused matrix is stale now
    try:
        model(torch.tensor([5]), cache)
        assert step.calls == calls and attn.qkv is None  # fell back (and dropped the stale matrix)
    finally:
        attn.q_proj.weight = saved
        fuse_projections(model)


def test_sliding_window_beyond_the_window_runs_eagerly(checkpoint, tokenizer, long_text):
    """A window shorter than the context hides rows: no maskless step (no graph is compiled here)."""
    model = compiled.enable(load(checkpoint("mistral", sliding_window=16)))
    ids = prompt_ids(tokenizer, long_text, 40)
    got = generate_autoregressive(model, ids, 5, GREEDY, []).token_ids
    model.one_token_step = None
    assert got == generate_autoregressive(model, ids, 5, GREEDY, []).token_ids


def test_enable_refuses_without_a_compiler_or_under_tp(llama, monkeypatch):
    path, _ = llama
    model = load(path)
    model.tp_world_size = 2
    with pytest.raises(UserError, match="tensor-parallel"):
        compiled.enable(model)
    model.tp_world_size = 1

    def broken(model):
        def step(*args):
            raise RuntimeError("fatal error: Python.h: No such file or directory\ncompilation terminated.")
        return step

    with monkeypatch.context() as patch:
        patch.setattr(compiled, "build", broken)
        with pytest.raises(UserError, match="compiling the decode step failed .RuntimeError: fatal error: Python.h"):
            compiled.enable(model, quiet=True)
    assert model.one_token_step is None
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        compiled.enable(model)


def test_cli_compile_flag_gives_the_same_tokens(llama, capsys, monkeypatch):
    path, _ = llama
    enabled, enable = [], compiled.enable
    monkeypatch.setattr(compiled, "enable", lambda model: enabled.append(enable(model)) or model)
    argv = ["--model", str(path), "--prompt", PROMPT, "--mode", "autoregressive", "--max-new-tokens", "12", "--json"]
    outs, errs = [], []
    for extra in ([], ["--compile"]):
        assert main(argv + extra) == 0
        captured = capsys.readouterr()
        outs.append(json.loads(captured.out)["token_ids"])
        errs.append(captured.err)
    assert outs[0] == outs[1]
    assert len(enabled) == 1 and enabled[0].one_token_step.calls == 1 + 11  # the warm-up step, then the answer's
    assert "compiling the one-token decode step" in errs[1] and "compiling" not in errs[0]


def test_compiled_step_runs_in_a_worker_thread(llama, tokenizer):
    """The server runs the engine in a worker thread; the graph compiled in the main thread serves it."""
    import threading

    _, model = llama
    ids, calls, out = tokenizer(PROMPT)["input_ids"], model.one_token_step.calls, {}
    want = generate_autoregressive(model, ids, 10, GREEDY, []).token_ids
    worker = threading.Thread(target=lambda: out.setdefault("got", generate_autoregressive(model, ids, 10, GREEDY, []).token_ids))
    worker.start()
    worker.join()
    assert out["got"] == want and model.one_token_step.calls - calls == 2 * 9
