"""The server with several documents: 3 documents x 3 questions interleaved, over stories260K.
With --context-ram-gb each document keeps a context in RAM (a question prefills only itself); with
--kv-store alone a document's blocks come back from disk; the answers equal a cold server's (one
context, no store, every request prefilled as it comes), and usage reports the reused tokens."""
from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from serve_harness import StatusRecorder

from offload_runtime import serve, trained

ASSETS = Path(__file__).resolve().parents[1] / "offload_runtime" / "assets"
QUESTIONS = ["What did Lily see?", "Who came to the park?", "What happened at the end?"]


def documents() -> list[str]:
    """Three different ~300-token stories: the demo's sentences in three orders."""
    sentences = [s.strip() + "." for s in trained.story_prompt().split(".") if s.strip()]
    return [" ".join(sentences[k:] + sentences[:k])[:1300] for k in (0, 7, 15)]


def requests() -> list[str]:
    docs = documents()
    return [f"{docs[d]}\n\nQuestion: {q}\nAnswer:" for q in QUESTIONS for d in range(3)]  # interleaved


def run(extra: list[str]) -> list[dict]:
    args = serve.parse_args(["--model", str(ASSETS / "stories260K"), "--device", "cpu", "--mode", "autoregressive",
                             "--max-new-tokens", "6", "--model-name", "stories", *extra])
    app, worker = serve.build(args)
    recorder = StatusRecorder(app)

    async def send() -> list[dict]:
        transport = httpx.ASGITransport(app=recorder, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as client:
            out = []
            for prompt in requests():
                r = await client.post("/v1/completions", json={"model": "stories", "prompt": prompt, "max_tokens": 6,
                                                               "temperature": 0})
                assert r.status_code == 200, r.text
                out.append(r.json())
            return out

    try:
        answers = asyncio.run(send())
        assert not recorder.failures
        return answers
    finally:
        worker.close()


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
    (["--context-ram-gb", "nan"], "--context-ram-gb must be a number >= 0, got nan"),
    (["--context-ram-gb", "1", "--emulate-link", "1"], "--context-ram-gb keeps several contexts on CPU only")])
def test_bad_context_ram_is_one_line(capsys, argv, message):
    args = ["--model", str(ASSETS / "stories260K"), "--device", "cpu", "--port", "0", *argv]
    assert serve.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
