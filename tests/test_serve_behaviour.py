"""The server's behaviour off the happy path (issue 27), through the official `openai` client over loopback:
seeded sampling reproducible and equal to the CLI's, one request's sampling parameters not leaking into
the next, a generation failing mid-answer (a fault injected by monkeypatching) leaving the server serving,
clients leaving while queued and during prefill, a stop string and a cancel with the cache host-resident
(the emulated link, where --pipeline auto switches pipelining on), and serve.py's --api-key and
--max-body-mb. Every wait is on an event or a state, with a generous safety timeout: no timing claims."""
from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import httpx
import openai
import pytest
import uvicorn

from serve_harness import greedy_answerer, served_models

from offload_runtime import serve, synthetic
from offload_runtime.server import engine as server_engine
from offload_runtime.caches import FullCache
from offload_runtime.caches.offloaded import OffloadedCache
from offload_runtime.run import main as run_main
from offload_runtime.sampling import SamplingParams

SAFETY_S = 120  # a missing event fails the test after this long; nothing is expected to take it
KEY = "behaviour-key"
MODEL = "tiny-chat"
# fixed gammas: the sampled draws do not depend on the adaptive controller's timing
ENGINE = ["--budget", "64", "--chunk-size", "8", "--gamma", "3", "--draft-gamma", "2", "--device", "cpu"]
DOCUMENT = synthetic.synthetic_text(200, seed=4)
SYSTEM = {"role": "system", "content": "Answer questions about this document.\n\n" + DOCUMENT}
MAX_BODY_MB = 0.05
LIMIT = int(MAX_BODY_MB * (1 << 20))  # 52428 bytes


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll a state until it holds (safety timeout only)."""
    deadline = time.monotonic() + SAFETY_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@dataclass
class Served:
    base: str
    worker: Any  # the EngineWorker (in this process: its session and counters can be read)


@contextlib.contextmanager
def running(args: Any) -> Iterator[Served]:
    """serve.build (the real wiring) of parsed flags under uvicorn on an ephemeral loopback port."""
    app, worker = serve.build(args)
    web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    wait_for(lambda: web.started or not thread.is_alive(), "the server to start")
    assert web.started, "the server did not start"
    try:
        yield Served(f"http://127.0.0.1:{web.servers[0].sockets[0].getsockname()[1]}", worker)
    finally:
        web.should_exit = True
        thread.join(SAFETY_S)
        worker.close()


@pytest.fixture(scope="module")
def models(checkpoint, tmp_path_factory):
    return served_models(checkpoint, tmp_path_factory.mktemp("behaviour"))


@pytest.fixture(scope="module")
def server(models):
    """The cache on the device; the API key from $OFFLOAD_RUNTIME_API_KEY, a body limit of 0.05 MB."""
    target, draft = models
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OFFLOAD_RUNTIME_API_KEY", KEY)
        args = serve.parse_args(["--model", str(target), "--draft", str(draft), *ENGINE, "--max-new-tokens", "8",
                                 "--model-name", MODEL, "--max-body-mb", str(MAX_BODY_MB)])
    with running(args) as served:
        yield served


@pytest.fixture(scope="module")
def reference(models):
    """(tokenizer, greedy answer of the target alone for token ids, ids of a chat / a completion prompt)."""
    target, _ = models
    tok, answer = greedy_answerer(target)

    def chat_ids(messages: list[dict]) -> list[int]:
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(rendered, add_special_tokens=False)["input_ids"]

    return tok, answer, chat_ids


def client(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=SAFETY_S)


def health(base: str) -> dict:
    r = httpx.get(base + "/health", timeout=SAFETY_S)
    assert r.status_code == 200
    return r.json()


def cli_text(models, tmp_path, prompt: str, n: int, flags: list[str]) -> str:
    """`run --prompt-file --json` in-process (stdout captured here, so any fixture may call it)."""
    target, draft = models
    path = tmp_path / "prompt.txt"
    path.write_text(prompt)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_main(["--model", str(target), "--draft", str(draft), "--prompt-file", str(path), "--json",
                         "--max-new-tokens", str(n), *ENGINE, *flags])
    assert code == 0
    return json.loads(out.getvalue())["text"]


# -- sampling --------------------------------------------------------------------------------------------

PROMPT = "Once upon a time"
OTHER = "Dragons fly over the hills."  # shares no token with PROMPT nor with a chat prompt
QUESTION = [SYSTEM, {"role": "user", "content": "Tell me something about it."}]


def start_over(api: openai.OpenAI, prompt: str = PROMPT) -> None:
    """A request sharing no prefix with the next one: the session starts that one afresh, as the CLI does."""
    api.completions.create(model=MODEL, prompt=prompt, max_tokens=1)


def ask(api: openai.OpenAI, seed: int, stream: bool = False) -> str:
    """QUESTION at temperature 1, top-p 0.9, with a seed."""
    reply = api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=1.0, top_p=0.9,
                                        seed=seed, stream=stream)
    if stream:
        return "".join(e.choices[0].delta.content or "" for e in reply if e.choices)
    return reply.choices[0].message.content


def test_seeded_sampling_is_reproducible_and_equals_the_cli(server, models, reference, tmp_path):
    tok, answer, chat_ids = reference
    api = client(server.base)
    assert server_engine.common_prefix(tok(PROMPT)["input_ids"], chat_ids(QUESTION)) == 0  # start_over works
    answers = []
    for seed, stream in ((7, False), (7, True), (8, False)):
        start_over(api)
        answers.append(ask(api, seed, stream))
    first, streamed, other = answers
    assert first == streamed != other  # the same seed, streamed or not: the same draws; another seed: others
    assert first != answer(chat_ids(QUESTION), 12)  # sampled, not the greedy answer
    rendered = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert cli_text(models, tmp_path, rendered, 12, ["--temperature", "1", "--top-p", "0.9", "--seed", "7"]) == first


def test_a_seeded_answer_does_not_depend_on_the_previous_request(server):
    """(Was a strict xfail: the draft's window depended on how earlier requests had fed it.)"""
    api = client(server.base)
    start_over(api)
    first = ask(api, 7)
    ask(api, 8)  # the same conversation: the next request reuses its prefix
    assert ask(api, 7) == first


@pytest.fixture(scope="module")
def default_top_p_answer(models, tmp_path_factory) -> str:
    """The CLI's answer at temperature 1, top-p 1 (the default), seed 5."""
    return cli_text(models, tmp_path_factory.mktemp("cli"), PROMPT, 10, ["--temperature", "1", "--seed", "5"])


def isolation_answers(base: str) -> tuple[str, str]:
    """A hot, narrow request (temperature 2, top-p 0.3), then a greedy one; the same, then a seeded one at
    top-p 1. Neither names top_p (the server's default is 1) nor shares a prefix with the hot one."""
    api = client(base)
    api.completions.create(model=MODEL, prompt=OTHER, max_tokens=10, temperature=2.0, top_p=0.3, seed=1)
    greedy = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10).choices[0].text
    api.completions.create(model=MODEL, prompt=OTHER, max_tokens=10, temperature=1.0, top_p=0.3, seed=1)
    seeded = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=5)
    return greedy, seeded.choices[0].text


def test_sampling_parameters_do_not_leak_into_the_next_request(server, reference, default_top_p_answer):
    tok, answer, _ = reference
    assert server_engine.common_prefix(tok(OTHER)["input_ids"], tok(PROMPT)["input_ids"]) == 0
    greedy, seeded = isolation_answers(server.base)
    assert greedy == answer(tok(PROMPT)["input_ids"], 10)  # the server's default: temperature 0
    assert seeded == default_top_p_answer  # top-p 1, not the previous request's 0.3


def test_isolation_check_catches_a_leaking_top_p(server, monkeypatch, default_top_p_answer):
    """Sabotage: a request that leaves top_p at its default keeps the previous request's."""
    real = server_engine.set_sampling

    def leaky(session, params, generator):
        top_p = params.top_p if params.top_p < 1 else session.sampler.params.top_p
        real(session, SamplingParams(params.temperature, top_p), generator)

    monkeypatch.setattr(server_engine, "set_sampling", leaky)
    assert isolation_answers(server.base)[1] != default_top_p_answer


# -- a failure mid-answer --------------------------------------------------------------------------------

def inject_fault(monkeypatch, session, failures: int) -> None:
    """The next `failures` generations fail in their second round, after scribbling over every cached
    V row (what a round dying half-way may leave): RuntimeError("injected fault")."""
    real, left, rounds = session._round, [failures], [0]

    def faulty(*args):
        rounds[0] += 1
        if left[0] and rounds[0] == 2:
            left[0] -= 1
            rounds[0] = 0
            for v in session.full.v:
                v.normal_()
            raise RuntimeError("injected fault")
        return real(*args)

    monkeypatch.setattr(session, "_round", faulty)


def after_two_faults(base: str, session, monkeypatch) -> tuple[list[str], Any, dict]:
    """A streamed and a plain request each failing mid-answer: (the streamed text before the error,
    the plain request's APIStatusError, the next request's answer with its stats)."""
    api = client(base)
    inject_fault(monkeypatch, session, failures=2)
    received = []
    with pytest.raises(openai.APIError, match="generation failed: injected fault"):
        for event in api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, stream=True):
            received.append(event.choices[0].text)
    with pytest.raises(openai.InternalServerError) as failed:
        api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10)
    after = httpx.post(base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=SAFETY_S,
                       json={"model": MODEL, "prompt": PROMPT, "max_tokens": 10}).json()
    return received, failed.value, after


def test_a_generation_failing_mid_answer_leaves_the_server_serving(server, reference, monkeypatch):
    tok, answer, _ = reference
    before = health(server.base)
    received, failed, after = after_two_faults(server.base, server.worker.session, monkeypatch)
    assert "".join(received)  # the stream had sent text before the error event came
    error = failed.body.get("error", failed.body)
    assert failed.status_code == 500 and error["type"] == "server_error" and "injected fault" in error["message"]
    now = health(server.base)
    assert now["failed"] == before["failed"] + 2 and now["completed"] == before["completed"] + 1
    # the cache was emptied after each failure: the next answer prefilled everything and is the right one
    ids = tok(PROMPT)["input_ids"]
    assert after["offload_runtime"]["reused_prefix_tokens"] == 0
    assert after["offload_runtime"]["prefilled_tokens"] == len(ids)
    assert after["choices"][0]["text"] == answer(ids, 10)


def test_failure_check_catches_a_server_that_keeps_its_cache(server, reference, monkeypatch):
    """Sabotage: the worker's reset after a failure (truncate(0)) does nothing; the scribbled rows are
    reused and the next answer is wrong, which the test above would report."""
    tok, answer, _ = reference
    session = server.worker.session
    with monkeypatch.context() as m:
        truncate = session.truncate
        m.setattr(session, "truncate", lambda n: None if n == 0 else truncate(n))
        _, _, after = after_two_faults(server.base, session, m)
    session.truncate(0)  # (the engine is idle) leave an honest session to the next test
    assert after["offload_runtime"]["reused_prefix_tokens"] > 0
    assert after["choices"][0]["text"] != answer(tok(PROMPT)["input_ids"], 10)


# -- clients leaving before their answer -----------------------------------------------------------------

class Engine:
    """Hooks on the worker's session, put in by monkeypatching: `hold` keeps the next prefill waiting
    (the engine busy) until `release`; `submitted` lists the engine requests in arrival order."""

    def __init__(self, worker, monkeypatch) -> None:
        self.worker, self.session = worker, worker.session
        self.submitted: list = []
        self.held, self.release, self.holding = threading.Event(), threading.Event(), False
        submit, extend = worker.submit, self.session.extend
        monkeypatch.setattr(worker, "submit", lambda request: (self.submitted.append(request), submit(request))[1])

        def held_extend(tokens):
            if self.holding:
                self.holding = False
                self.held.set()
                assert self.release.wait(SAFETY_S), "never released"
            return extend(tokens)

        monkeypatch.setattr(self.session, "extend", held_extend)

    def arrivals(self, n: int) -> None:
        wait_for(lambda: len(self.submitted) >= n, f"{n} requests at the engine")


def leave_after_sending(base: str, body: dict) -> socket.socket:
    """A plain (non-streamed) request sent on a raw socket, to be closed by the caller: the client leaving."""
    data = json.dumps(body).encode()
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=SAFETY_S)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_clients_leaving_while_queued_are_never_prefilled(server, reference, monkeypatch):
    tok, answer, _ = reference
    engine, api = Engine(server.worker, monkeypatch), client(server.base)
    before, prefilled = health(server.base), engine.session.stats.prefilled_tokens
    engine.holding, done = True, {}
    blocker = threading.Thread(target=lambda: done.update(r=api.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4)), daemon=True)
    blocker.start()
    assert engine.held.wait(SAFETY_S)  # the engine is busy with the blocker's prefill
    plain = leave_after_sending(server.base, {"model": MODEL, "prompt": "Dragons " * 40, "max_tokens": 4})
    engine.arrivals(2)
    plain.close()  # a plain request's client leaves while queued
    streamed = api.chat.completions.create(model=MODEL, stream=True, max_tokens=4,
                                           messages=[{"role": "user", "content": "Knights " * 40}])
    next(iter(streamed))  # the role chunk: the request is in the queue
    engine.arrivals(3)
    streamed.close()  # a streaming client leaves while queued
    for request in engine.submitted[1:]:  # the server noticed both before the engine got to them
        assert request.cancelled.wait(SAFETY_S)
    engine.release.set()
    blocker.join(SAFETY_S)
    wait_for(lambda: health(server.base)["cancelled"] == before["cancelled"] + 2, "both cancellations")
    now, stats = health(server.base), done["r"].model_extra["offload_runtime"]
    assert now["completed"] == before["completed"] + 1 and now["failed"] == before["failed"]
    assert done["r"].choices[0].text == answer(tok(PROMPT)["input_ids"], 4)
    # the leavers were never prefilled: the session holds the blocker's conversation
    assert engine.session.stats.prefilled_tokens - prefilled == stats["prefilled_tokens"]
    assert now["context_tokens"] == done["r"].usage.prompt_tokens + 4


def test_a_client_leaving_during_prefill_cancels_it_and_the_session_stays_whole(server, reference, monkeypatch):
    """A follow-up question over the document: its new tokens prefill in chunks of 4 (PREFILL_CHUNK
    monkeypatched); after the first chunk the engine waits until the server has seen the streaming
    client leave, and its check ends the prefill there. The session is cut back to the document."""
    tok, answer, chat_ids = reference
    api = client(server.base)
    api.chat.completions.create(model=MODEL, messages=[SYSTEM, {"role": "user", "content": "Who?"}], max_tokens=2)
    monkeypatch.setattr("offload_runtime.context.PREFILL_CHUNK", 4)
    engine = Engine(server.worker, monkeypatch)
    before, prefilled, context = health(server.base), engine.session.stats.prefilled_tokens, engine.session.context[:]
    paused, extend = threading.Event(), engine.session.extend

    def extend_pausing(tokens):
        check = engine.session.progress  # the server's cancellation check, called between chunks

        def progress(done, total):
            if done < total and not paused.is_set():
                paused.set()
                assert engine.submitted[-1].cancelled.wait(SAFETY_S), "the client's leaving went unnoticed"
            check(done, total)

        engine.session.progress = progress
        return extend(tokens)

    monkeypatch.setattr(engine.session, "extend", extend_pausing)
    messages = [SYSTEM, {"role": "user", "content": "What is it about, and who speaks first?"}]
    ids = chat_ids(messages)
    shared = server_engine.common_prefix(context, ids)
    assert len(ids) - shared > 8  # the new question is several chunks long
    stream = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True)
    next(iter(stream))
    assert paused.wait(SAFETY_S)  # one chunk of the question is in the cache, more to come
    stream.close()
    wait_for(lambda: health(server.base)["cancelled"] == before["cancelled"] + 1, "the cancellation")
    now = health(server.base)
    assert now["failed"] == before["failed"] and now["context_tokens"] == shared  # cut back to the document
    assert engine.session.stats.prefilled_tokens - prefilled == 4  # one chunk, then it stopped
    # the same question then reuses the document's rows and answers as the target alone does
    again = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    # the cut-back kept the document's rows but its last token's logits: that token is fed again
    reused = again.model_extra["offload_runtime"]["reused_prefix_tokens"]
    assert reused == shared - 1 == again.usage.prompt_tokens - again.model_extra["offload_runtime"]["prefilled_tokens"]
    assert again.choices[0].message.content == answer(ids, 6)


# -- the cache host-resident (the emulated link): a stop string and a cancel ---------------------------

@pytest.fixture(scope="module")
def offloaded(models):
    """--emulate-link: the whole full cache on the host, streamed over an emulated 0.5 GB/s link each pass;
    --pipeline auto (the default) then pipelines the rounds."""
    target, draft = models
    argv = ["--model", str(target), "--draft", str(draft), *ENGINE, "--max-new-tokens", "8", "--model-name", MODEL,
            "--api-key", KEY, "--emulate-link", "0.5"]
    with running(serve.parse_args(argv)) as served:
        yield served
    # worker.close() leaves the copy-engine thread to the interpreter's exit, where a copy still running
    # in it aborts the process ("terminate called without an active exception"): end it here
    served.worker.session.full.backend.close()


def test_stop_string_and_cancel_with_the_cache_host_resident(offloaded, server, reference, monkeypatch):
    """Every slab reported not ready (layer_ready False): each pass pre-drafts, so the stop string and the
    cancel land in pipelined rounds whose copies run on the copy-engine thread."""
    _, answer, chat_ids = reference
    monkeypatch.setattr(OffloadedCache, "layer_ready", lambda self, layer, n: False)
    monkeypatch.setattr(FullCache, "layer_ready", lambda self, layer, n: False)
    api, messages = client(offloaded.base), [SYSTEM, {"role": "user", "content": "Stop somewhere."}]
    full = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
    text, stats = full.choices[0].message.content, full.model_extra["offload_runtime"]
    assert text == answer(chat_ids(messages), 12)
    assert stats["offload_backend"] == "emulated" and stats["offloaded_layers"] == 2
    assert stats["draft_steps_overlapped"] > 0  # --pipeline auto switched pipelining on
    on_device = client(server.base).chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
    assert on_device.model_extra["offload_runtime"]["draft_steps_overlapped"] == 0  # ...and off with it on the device
    # a stop string, streamed: the answer is cut before it
    stop = next(text[i:i + 2] for i in range(3, len(text) - 1) if "\ufffd" not in text[i:i + 2])
    events = list(api.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stop=[stop],
                                              stream=True))
    assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == text[:text.index(stop)]
    assert events[-1].choices[0].finish_reason == "stop"
    # a client leaving mid-answer
    before = health(offloaded.base)
    leaving = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=1000, stream=True)
    assert any(e.choices and e.choices[0].delta.content for e in leaving)  # (stops at the first text)
    leaving.close()
    wait_for(lambda: health(offloaded.base)["cancelled"] == before["cancelled"] + 1, "the cancellation")
    # the host-resident prefix survived both: the same question reuses it and answers the same
    again = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
    assert again.choices[0].message.content == text
    # every prompt row was in the cache, but the last token is fed again for its logits (reused + prefilled =
    # the prompt, cached_tokens = reused)
    stats, n = again.model_extra["offload_runtime"], again.usage.prompt_tokens
    assert (stats["reused_prefix_tokens"], stats["prefilled_tokens"]) == (n - 1, 1)
    assert again.usage.prompt_tokens_details.cached_tokens == n - 1


# -- serve.py: --api-key and --max-body-mb --------------------------------------------------------------

def sized_body(size: int) -> bytes:
    """A /v1/completions body of exactly `size` bytes, refused for its max_tokens once read (no generation)."""
    empty = len(json.dumps({"prompt": "", "max_tokens": 0}))
    data = json.dumps({"prompt": "x" * (size - empty), "max_tokens": 0}).encode()
    assert len(data) == size
    return data


def test_the_key_from_the_environment_and_the_body_limit_are_enforced(server):
    """The module's server: its key from $OFFLOAD_RUNTIME_API_KEY, --max-body-mb 0.05 (52428 bytes)."""
    auth = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    with httpx.Client(base_url=server.base, timeout=SAFETY_S) as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/v1/models", headers=auth).status_code == 200
        at = http.post("/v1/completions", content=sized_body(LIMIT), headers=auth)
        assert at.status_code == 400 and at.json()["error"]["param"] == "max_tokens"  # read whole, then judged
        over = http.post("/v1/completions", content=sized_body(LIMIT + 1), headers=auth)
        assert over.status_code == 413 and over.json()["error"]["code"] == "request_too_large"
        assert f"limit of {LIMIT} bytes" in over.json()["error"]["message"]


@pytest.mark.parametrize("flags,message", [
    (["--api-key", ""], "error: --api-key is empty"),
    (["--api-key", "   "], "error: --api-key is empty"),
    (["--max-body-mb", "0"], "error: --max-body-mb must be positive, got 0.0"),
    (["--max-body-mb", "-1"], "error: --max-body-mb must be positive"),
    (["--max-body-mb", "nan"], "error: --max-body-mb must be positive"),
    (["--max-body-mb", "lots"], "--max-body-mb"),
])
def test_serve_refuses_a_bad_key_or_body_limit(models, monkeypatch, capsys, flags, message):
    monkeypatch.delenv("OFFLOAD_RUNTIME_API_KEY", raising=False)
    assert serve.main(["--model", str(models[0]), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_the_key_flag_wins_over_the_environment_and_help_shows_neither(models, monkeypatch, capsys):
    monkeypatch.setenv("OFFLOAD_RUNTIME_API_KEY", "from-env-7f3a")
    assert serve.parse_args(["--model", str(models[0])]).api_key == "from-env-7f3a"
    assert serve.parse_args(["--model", str(models[0]), "--api-key", "from-flag"]).api_key == "from-flag"
    with pytest.raises(SystemExit) as exc:
        serve.main(["--help", "--api-key", "from-flag"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--max-body-mb" in out and "from-env-7f3a" not in out and "from-flag" not in out


def test_main_hands_the_flags_to_the_server_and_warns_without_a_key_beyond_loopback(models, monkeypatch, capsys):
    """serve.main with the model loading and uvicorn replaced: what reaches them, and the warning."""
    seen = []

    class Worker:
        max_context = 4096

        def close(self) -> None:
            seen.append("closed")

    def build(args):
        seen.append((args.api_key, args.max_body_mb))
        return "app", Worker()

    monkeypatch.setattr(serve, "build", build)
    if hasattr(serve, "make_server"):  # the server's own uvicorn.Server (issue 25's shutdown handling)
        monkeypatch.setattr(serve, "make_server", lambda app, worker, host, port, *a, **k: SimpleNamespace(
            run=lambda: seen.append((app, host, port))))
    else:
        monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.append((app, kw["host"], kw["port"])))
    monkeypatch.delenv("OFFLOAD_RUNTIME_API_KEY", raising=False)
    assert serve.main(["--model", str(models[0]), "--host", "0.0.0.0", "--port", "0", "--max-body-mb", "2.5"]) == 0
    assert "warning: listening on 0.0.0.0 without --api-key" in capsys.readouterr().err
    assert seen == [(None, 2.5), ("app", "0.0.0.0", 0), "closed"]
    assert serve.main(["--model", str(models[0]), "--host", "0.0.0.0", "--api-key", "k"]) == 0
    assert "warning" not in capsys.readouterr().err and seen[-3] == ("k", 8.0)
