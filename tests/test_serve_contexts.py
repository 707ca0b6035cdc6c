"""The server with several documents: 3 documents x 3 questions interleaved, over stories260K.
With --context-ram-gb each document keeps a context in RAM (a question prefills only itself), also
with a host-resident full cache (--offload on, --emulate-link: each context owns one, as the memory
plan counted them); with --kv-store alone a document's blocks come back from disk; the answers equal
a cold server's (one context, no store, every request prefilled as it comes), and usage reports the
reused tokens. Past the budget contexts are taken over, least recently used first, and no copy-engine
thread outlives the server."""
from __future__ import annotations

import asyncio
import threading
import types
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
import torch
from serve_harness import StatusRecorder

from offload_runtime import loading, planner, serve, trained
from offload_runtime.caches.full import FullCache
from offload_runtime.config import ModelConfig
from offload_runtime.launch import prepare
from offload_runtime.planner import Resources, host_usable
from offload_runtime.server import engine

ASSETS = Path(__file__).resolve().parents[1] / "offload_runtime" / "assets"
QUESTIONS = ["What did Lily see?", "Who came to the park?", "What happened at the end?"]


def documents() -> list[str]:
    """Three different ~300-token stories: the demo's sentences in three orders."""
    sentences = [s.strip() + "." for s in trained.story_prompt().split(".") if s.strip()]
    return [" ".join(sentences[k:] + sentences[:k])[:1300] for k in (0, 7, 15)]


def prompt(doc: int, question: int) -> str:
    return f"{documents()[doc]}\n\nQuestion: {QUESTIONS[question]}\nAnswer:"


def requests() -> list[str]:
    return [prompt(d, q) for q in range(len(QUESTIONS)) for d in range(3)]  # interleaved


ARGV = ["--model", str(ASSETS / "stories260K"), "--device", "cpu", "--mode", "autoregressive", "--max-new-tokens",
        "6", "--model-name", "stories"]


def run(extra: list[str], prompts: list[str] | None = None,
        watch: Callable[[Any, bool], None] | None = None) -> list[dict]:
    """The answers to `prompts` (default: requests()), sent one after the other; `watch(worker, closed)`
    is called after each answer and once more after the worker is closed."""
    app, worker = serve.build(serve.parse_args([*ARGV, *extra]))
    recorder = StatusRecorder(app)

    async def send() -> list[dict]:
        transport = httpx.ASGITransport(app=recorder, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as client:
            out = []
            for text in prompts or requests():
                r = await client.post("/v1/completions", json={"model": "stories", "prompt": text, "max_tokens": 6,
                                                               "temperature": 0})
                assert r.status_code == 200, r.text
                out.append(r.json())
                if watch:
                    watch(worker, False)
            return out

    try:
        answers = asyncio.run(send())
        assert not recorder.failures
        return answers
    finally:
        worker.close()
        if watch:
            watch(worker, True)


@pytest.fixture(scope="module")
def cold() -> list[dict]:
    return run([])


def prefilled(answers: list[dict]) -> list[int]:
    return [a["offload_runtime"]["prefilled_tokens"] for a in answers]


def test_several_contexts_in_ram(cold):
    warm = run(["--context-ram-gb", "1"])
    assert [a["choices"][0]["text"] for a in warm] == [a["choices"][0]["text"] for a in cold]
    assert warm[-1]["offload_runtime"]["contexts"] == 3
    assert prefilled(warm)[:3] == prefilled(cold)[:3]  # each document once
    later = [a["usage"] for a in warm[3:]]
    assert all(u["prompt_tokens_details"]["cached_tokens"] > 250 for u in later)  # the document was in RAM
    assert sum(prefilled(warm)[3:]) < sum(prefilled(cold)[3:]) / 10  # the questions alone


def test_one_context_and_the_disk_store(cold, tmp_path):
    warm = run(["--kv-store", str(tmp_path)])
    assert [a["choices"][0]["text"] for a in warm] == [a["choices"][0]["text"] for a in cold]
    restored = [a["offload_runtime"]["restored_tokens"] for a in warm]
    assert restored[:3] == [0, 0, 0] and all(r == 256 for r in restored[3:])  # a whole block from disk
    assert all(a["usage"]["prompt_tokens_details"]["cached_tokens"] >= 256 for a in warm[3:])


def test_a_budget_below_one_more_context_keeps_one(cold):
    """A budget smaller than a context: no second one is made; the least recently used context (the
    only one) serves each document in turn, cut back and prefilled, as without the flag."""
    warm = run(["--context-ram-gb", "0.0001"])
    assert [a["choices"][0]["text"] for a in warm] == [a["choices"][0]["text"] for a in cold]
    assert warm[-1]["offload_runtime"]["contexts"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--context-ram-gb", "-1"], "--context-ram-gb must be a number >= 0, got -1.0"),
    (["--context-ram-gb", "nan"], "--context-ram-gb must be a number >= 0, got nan")])
def test_bad_context_ram_is_one_line(capsys, argv, message):
    args = ["--model", str(ASSETS / "stories260K"), "--device", "cpu", "--port", "0", *argv]
    assert serve.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


# -- a host-resident full cache per context (--offload on, --emulate-link) -------------------------

def texts(answers: list[dict]) -> list[str]:
    return [a["choices"][0]["text"] for a in answers]


def cached(answers: list[dict]) -> list[int]:
    return [a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers]


def one_context(extra: list[str]) -> Any:
    """The plan of one context (no --context-ram-gb) on this machine, for budgets in contexts."""
    return prepare(serve.parse_args([*ARGV, *extra]).run, None, None, torch.device("cpu")).plan


def budget_gb(extra: list[str], contexts: float) -> str:
    """--context-ram-gb for `contexts` contexts' host caches."""
    return repr(contexts * one_context(extra).context_ram / 2**30)


def copy_engines() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "emulated-copy-engine" and t.is_alive()]


@pytest.mark.parametrize("flags", [["--offload", "on"], ["--emulate-link", "50"]])
def test_offloaded_contexts_in_ram(cold, flags):
    """Each document keeps its own host-resident cache: the questions after the first round prefill
    only themselves, and the answers are a cold server's."""
    owned = []

    def watch(worker: Any, closed: bool) -> None:
        if not closed:
            owned.append(len({id(s.full) for s in worker.pool.sessions}) == len(worker.pool.sessions))

    warm = run([*flags, "--context-ram-gb", "1"], watch=watch)
    assert texts(warm) == texts(cold)
    assert warm[-1]["offload_runtime"]["contexts"] == 3 and all(owned)  # three contexts, three caches
    assert prefilled(warm)[:3] == prefilled(cold)[:3]  # each document once
    assert all(c > 250 for c in cached(warm[3:]))  # the document was in RAM
    assert sum(prefilled(warm)[3:]) < sum(prefilled(cold)[3:]) / 10  # the questions alone


EVICTION = [(0, 0), (1, 0), (0, 1), (2, 0), (0, 2), (1, 1)]  # with room for 2: document 2 takes 1's context
LINK = ["--emulate-link", "50"]


def check_eviction(cold: list[dict], budget: str) -> None:
    """Room for two contexts: the third document takes the least recently used one's place (document 1's),
    so document 1 comes back prefilled; one copy-engine thread per context, none left after the server."""
    before = set(copy_engines())
    held = []

    def watch(worker: Any, closed: bool) -> None:
        held.append((len(worker.pool.sessions), len(copy_engines()), closed))

    warm = run([*LINK, "--context-ram-gb", budget], [prompt(d, q) for d, q in EVICTION], watch)
    answer = dict(zip(requests(), texts(cold)))
    assert texts(warm) == [answer[prompt(d, q)] for d, q in EVICTION]
    assert [a["offload_runtime"]["contexts"] for a in warm] == [1, 2, 2, 2, 2, 2]
    hits = [c > 250 for c in cached(warm)]
    assert hits == [False, False, True, False, True, False], cached(warm)  # the last: document 1 evicted
    assert all(engines <= contexts for contexts, engines, closed in held if not closed), held
    assert not set(copy_engines()) - before, "a copy-engine thread outlived the server"


def test_contexts_past_the_budget_are_evicted(cold):
    check_eviction(cold, budget_gb(LINK, 2.5))


@pytest.mark.parametrize("forgetful", [
    lambda session: 0,  # the host caches not counted at all
    lambda session: session.full.length * 5 * 2 * 4 * 8 * 4,  # their used rows, not their planned bytes
], ids=["uncounted", "used-rows"])
def test_eviction_check_catches_a_pool_that_forgets_the_host_caches(cold, monkeypatch, forgetful):
    """Sabotage: a pool that does not count the host caches' planned bytes keeps a third context."""
    monkeypatch.setattr(engine, "context_bytes", forgetful)
    with pytest.raises(AssertionError, match=r"\[1, 2, 2, 3, 3, 3\]|False, True, False"):
        check_eviction(cold, budget_gb(LINK, 2.5))


def test_thread_check_catches_a_server_that_leaves_a_context_open(cold, monkeypatch):
    """Sabotage: a pool that closes only its newest context leaves the others' copy engines running."""
    monkeypatch.setattr(engine.ContextPool, "close", lambda pool: pool.sessions[-1].full.close())
    with pytest.raises(AssertionError, match="a copy-engine thread outlived the server"):
        check_eviction(cold, budget_gb(LINK, 2.5))


def test_the_pool_counts_what_the_planner_counted():
    """One context's host bytes as the pool counts them (its cache as built) are the plan's context_ram."""
    for flags in (["--offload", "on"], LINK, ["--on-chip-layers", "2", "--offload", "on"]):
        app, worker = serve.build(serve.parse_args([*ARGV, *flags, "--context-ram-gb", "1"]))
        try:
            assert engine.context_bytes(worker.session) == one_context(flags).context_ram > 0, flags
        finally:
            worker.close()


class ClosedCache(FullCache):
    """A growing CPU cache that records its close()."""
    closed = False

    def close(self) -> None:
        self.closed = True


def test_contexts_that_outgrow_the_budget_are_dropped_and_closed():
    """A growing (CPU) cache can outgrow the budget after its context was made: at the next request the
    least recently used contexts are dropped, their caches closed, until the others fit."""
    cfg = ModelConfig.from_hf(loading.load_hf_config(ASSETS / "stories260K"))
    target = types.SimpleNamespace(cfg=cfg, dtype=torch.float32)

    def context(tokens: list[int], rows: int) -> Any:
        return types.SimpleNamespace(context=tokens, full=ClosedCache(cfg, "cpu", torch.float32, rows), target=target)

    a, b = context([1] * 100, 256), context([2] * 100, 256)  # 256 rows x 5 layers x 256 bytes each
    pool = engine.ContextPool(a, lambda: context([], 0), 2 * 256 * 5 * 256)
    pool.sessions.append(b)
    assert pool.pick([2] * 100 + [5]) is b and pool.sessions == [a, b]  # the budget holds both
    b.full.capacity = 512  # b grew (a long answer): the two outgrow the budget
    assert pool.pick([3] * 100) is a  # another document: the least recently used context, a, taken over
    assert pool.sessions == [a] and b.full.closed and not a.full.closed  # b, now the least recent, dropped


def test_a_machine_that_holds_fewer_contexts_keeps_fewer(monkeypatch, capsys):
    """The budget asks for 5 contexts, the host holds 3: a note says so and the pool keeps 3."""
    one = one_context(LINK)
    room = one.host_needed + 2 * (one.host_needed - one.weights - one.activations) + one.context_ram // 2
    monkeypatch.setattr(planner, "probe_resources", lambda device: Resources("cpu", room * 20 // 19 + 20))
    assert host_usable(room * 20 // 19 + 20) >= room
    app, worker = serve.build(serve.parse_args([*ARGV, *LINK, "--context-ram-gb", budget_gb(LINK, 5)]))
    try:
        assert worker.pool.max_bytes == 3 * one.context_ram
    finally:
        worker.close()
    assert capsys.readouterr().err == ("note: --context-ram-gb asks for up to 5 contexts; this machine's memory "
                                       "holds 3 (0.0 GiB of full cache in host memory each): keeping at most 3\n")


def test_the_plan_refuses_a_pool_when_two_contexts_do_not_fit(monkeypatch, capsys):
    one = one_context(LINK)
    room = one.host_needed + one.context_ram // 2  # one context and half of a second one's cache
    monkeypatch.setattr(planner, "probe_resources", lambda device: Resources("cpu", room * 20 // 19 + 20))
    assert serve.main([*ARGV, *LINK, "--port", "0", "--context-ram-gb", budget_gb(LINK, 4)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --context-ram-gb "), err
    assert (f" asks for 4 contexts of 0.0 GiB, but two need 0.0 GiB of host memory for {one.context} tokens each, "
            f"0.0 GiB available; serve one context (no --context-ram-gb) or plan shorter ones (--max-context)") in err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (run bench/gpu_check.sh on a GPU machine)")
def test_contexts_with_host_resident_caches_on_cuda():
    """On a GPU --context-ram-gb keeps each context's full cache in pinned host memory (offloaded, as the
    plan says): the answers are those of one context on the same device, the documents stay in RAM."""
    cuda = ["--device", "cuda"]
    one = run([*cuda, "--offload", "on"])
    warm = run([*cuda, "--context-ram-gb", "1"])
    assert texts(warm) == texts(one)
    assert warm[-1]["offload_runtime"]["contexts"] == 3
    assert all(c > 250 for c in cached(warm[3:]))
