"""The OpenAI-compatible server, driven by the official `openai` client over loopback: a document chat
reuses its prefix and answers as the CLI does, concurrent clients are served in arrival order, a
client leaving mid-stream frees the engine, and bad requests get OpenAI JSON errors naming the field.
Any 5xx answer fails the test that caused it (serve_harness); the injected engine failure proves it."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
from serve_harness import StatusRecorder, expect_server_errors, fail_on_server_errors, greedy_answerer, served_models  # noqa: F401 (fixtures)

from offload_runtime import loading, serve, synthetic
from offload_runtime.generate import generate_autoregressive
from offload_runtime.run import main as run_main
from offload_runtime.sampling import SamplingParams

KEY = "test-key"
MODEL = "tiny-chat"  # --model-name
ENGINE = ["--budget", "64", "--chunk-size", "8", "--gamma", "3", "--device", "cpu"]
DOCUMENT = synthetic.synthetic_text(200, seed=4)
SYSTEM = {"role": "system", "content": "Answer questions about this document.\n\n" + DOCUMENT}
MAX_BODY = 256 << 10
READ_TIMEOUT = 2.0  # --read-timeout of the test server
SAFETY_S = 120  # a bound on waits for a state, never a claim about speed


@pytest.fixture(scope="module")
def models(checkpoint, tmp_path_factory):
    return served_models(checkpoint, tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def engine(models):
    """(app wrapped in the 5xx recorder, worker) over the tiny models."""
    target, draft = models
    args = serve.parse_args(["--model", str(target), "--draft", str(draft), *ENGINE, "--max-new-tokens", "8",
                             "--api-key", KEY, "--model-name", MODEL, "--max-body-mb", str(MAX_BODY / (1 << 20)),
                             "--read-timeout", str(READ_TIMEOUT)])
    app, worker = serve.build(args)
    yield StatusRecorder(app), worker
    worker.close()


@pytest.fixture(scope="module")
def recorder(engine):
    return engine[0]


@pytest.fixture(scope="module")
def server(engine, recorder):
    """A server on an ephemeral loopback port (uvicorn in a thread of this process, as `serve` configures
    it): its base URL. (Through `recorder`, every test using it fails on a 5xx.)"""
    app, worker = engine
    web = serve.make_server(app, worker, "127.0.0.1", 0, READ_TIMEOUT, log_level="info")
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.time() + SAFETY_S
    while not web.started and thread.is_alive() and time.time() < deadline:
        time.sleep(0.01)
    assert web.started, "the server did not start"
    port = web.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    web.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def reference(models):
    """Greedy answers of the target alone (autoregressive, fresh cache) for token ids."""
    return greedy_answerer(models[0])


def client(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)


def health(base: str) -> dict:
    r = httpx.get(base + "/health", timeout=10)
    assert r.status_code == 200
    return r.json()


def cli_answer(models, tmp_path, capsys, rendered: str, n: int) -> dict:
    """The CLI's single-shot answer (`run --prompt-file --json`, in-process) for a rendered conversation."""
    target, draft = models
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(rendered)
    capsys.readouterr()
    assert run_main(["--model", str(target), "--draft", str(draft), "--prompt-file", str(prompt), "--json",
                     "--max-new-tokens", str(n), *ENGINE]) == 0
    return json.loads(capsys.readouterr().out)


def test_document_chat_reuses_the_prefix_and_answers_as_the_cli(server, models, reference, tmp_path, capsys):
    tok, _ = reference
    api = client(server)
    first = [SYSTEM, {"role": "user", "content": "What is the text about?"}]
    stream = api.chat.completions.create(model=MODEL, messages=first, max_tokens=12, temperature=0,
                                         stream=True)
    events = list(stream)
    text1 = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    last = events[-1]
    assert last.choices[0].finish_reason == "length" and last.usage.completion_tokens == 12
    stats1 = last.model_extra["offload_runtime"]
    n1 = last.usage.prompt_tokens
    assert n1 > 400 and stats1["levels"] == 3  # a document of a few hundred tokens; target, retrieval and draft
    # prefix reuse: the second turn resends everything, the server prefills only what it adds
    second = first + [{"role": "assistant", "content": text1}, {"role": "user", "content": "Who speaks first?"}]
    reply = api.chat.completions.create(model=MODEL, messages=second, max_completion_tokens=10, seed=1)
    stats2 = reply.model_extra["offload_runtime"]
    n2 = reply.usage.prompt_tokens
    assert stats2["prefilled_tokens"] == n2 - reply.usage.prompt_tokens_details.cached_tokens
    assert stats2["prefilled_tokens"] <= n2 - n1 + 1 < n1 // 4  # the new tokens (+ the last cached one) only
    assert stats2["reused_prefix_tokens"] >= n1 and stats2["retrieval_builds"] == 1  # re-selected for the question
    assert stats2["reused_prefix_tokens"] + stats2["prefilled_tokens"] == n2  # no row counted twice
    assert stats2["tokens_per_l3_pass"] >= 1 and stats2["l3_passes"] > 0
    # the greedy answers equal the CLI's single-shot answers on the same rendered conversations
    for messages, text, n in [(first, text1, 12), (second, reply.choices[0].message.content, 10)]:
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        cli = cli_answer(models, tmp_path, capsys, rendered, n)
        assert text == cli["text"]
    assert cli["prompt_tokens"] == n2 and len(cli["token_ids"]) == reply.usage.completion_tokens


def _question(i: int) -> tuple[str, dict]:
    """Request i of the crowd: chat for even i, a plain completion for odd i."""
    question = f"Question {i}: what happens in sentence {i}?"
    if i % 2 == 0:
        return "chat", {"messages": [SYSTEM, {"role": "user", "content": question}], "max_tokens": 6}
    return "completion", {"prompt": f"{DOCUMENT}\n\n{question}\n", "max_tokens": 6}


def test_concurrent_clients_in_arrival_order_and_disconnect(server, reference):
    tok, answer = reference
    before = health(server)
    # a client streams a long answer, then leaves mid-stream while 20 others queue behind it
    blocker = client(server).chat.completions.create(
        model=MODEL, messages=[SYSTEM, {"role": "user", "content": "Tell a long story."}],
        max_tokens=3000, stream=True)
    next(iter(blocker))
    api, results, crowd = client(server), [None] * 20, []

    def ask(i: int) -> None:
        kind, body = _question(i)
        if kind == "chat":
            r = api.chat.completions.create(model=MODEL, **body)
            results[i] = (r.choices[0].message.content, r.model_extra["offload_runtime"])
        else:
            r = api.completions.create(model=MODEL, **body)
            results[i] = (r.choices[0].text, r.model_extra["offload_runtime"])

    for i in range(20):  # each is launched once the previous one has reached the server: arrival order = i
        crowd.append(threading.Thread(target=ask, args=(i,), daemon=True))
        crowd[-1].start()
        deadline = time.time() + SAFETY_S
        while health(server)["received"] < before["received"] + 2 + i and time.time() < deadline:
            time.sleep(0.01)  # (the event loop answers while the engine works)
    assert health(server)["received"] == before["received"] + 21 and all(r is None for r in results)
    blocker.close()  # the client disconnects mid-stream: the blocker (~3000 tokens to go) is cancelled
    for t in crowd:  # (a safety bound only: how fast it frees the engine is not this test's claim)
        t.join(SAFETY_S)
    assert all(r is not None for r in results), "a request was lost"
    arrivals = [stats["arrival"] for _, stats in results]
    assert arrivals == list(range(arrivals[0], arrivals[0] + 20))  # arrival order = launch order
    assert all(stats["served"] == stats["arrival"] for _, stats in results)  # served first come, first served
    for i, (text, stats) in enumerate(results):
        kind, body = _question(i)
        if kind == "chat":
            ids = tok(tok.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"]
        else:
            ids = tok(body["prompt"])["input_ids"]
        assert text == answer(ids, 6), f"request {i}"
    after = health(server)
    assert after["cancelled"] == before["cancelled"] + 1 and after["failed"] == before["failed"]
    assert after["completed"] == before["completed"] + 20
    # a non-streamed request whose client gives up (closes its socket once the server has it) is cancelled too
    data = json.dumps({"model": MODEL, "prompt": "Tell", "max_tokens": 3000}).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=SAFETY_S) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        deadline = time.time() + SAFETY_S
        while health(server)["received"] == after["received"] and time.time() < deadline:
            time.sleep(0.01)
    deadline = time.time() + SAFETY_S
    while health(server)["cancelled"] == after["cancelled"] and time.time() < deadline:
        time.sleep(0.05)
    assert health(server)["cancelled"] == after["cancelled"] + 1


def test_stop_strings_cut_the_answer_and_keep_the_session(server, reference):
    api = client(server)
    messages = [SYSTEM, {"role": "user", "content": "Stop somewhere."}]
    full = api.chat.completions.create(messages=messages, max_tokens=12, model=MODEL)
    text = full.choices[0].message.content
    stop = next(text[i:i + 2] for i in range(3, len(text) - 1) if "\ufffd" not in text[i:i + 2])
    cut = text[: text.index(stop)]
    short = api.chat.completions.create(messages=messages, max_tokens=12, stop=[stop], model=MODEL)
    assert short.choices[0].message.content == cut and short.choices[0].finish_reason == "stop"
    events = list(api.chat.completions.create(messages=messages, max_tokens=12, stop=stop, stream=True,
                                              model=MODEL))
    assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == cut
    again = api.chat.completions.create(messages=messages, max_tokens=12, model=MODEL)
    assert again.choices[0].message.content == text  # the cut answers left the session consistent


BAD = [  # (method, path, headers, body, status, code, param)
    ("POST", "/v1/chat/completions", {}, b"{not json", 400, "invalid_json", None),
    ("POST", "/v1/chat/completions", {}, b"[1, 2]", 400, "invalid_json", None),
    ("POST", "/v1/chat/completions", {}, {"max_tokens": 4}, 400, "invalid_value", "messages"),
    ("POST", "/v1/chat/completions", {}, {"messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_value",
     "messages[0].role"),
    ("POST", "/v1/chat/completions", {}, {"messages": [{"role": "user", "content": 3}]}, 400, "invalid_value",
     "messages[0].content"),
    ("POST", "/v1/chat/completions", {}, {"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400,
     "invalid_value", "temperature"),
    ("POST", "/v1/chat/completions", {}, {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400,
     "invalid_value", "top_p"),
    ("POST", "/v1/chat/completions", {}, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400,
     "invalid_value", "max_tokens"),
    ("POST", "/v1/chat/completions", {}, {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400,
     "invalid_value", "n"),
    ("POST", "/v1/chat/completions", {}, {"messages": [{"role": "user", "content": "x"}], "stop": 5}, 400,
     "invalid_value", "stop"),
    ("POST", "/v1/chat/completions", {}, {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400,
     "invalid_value", "stream"),
    ("POST", "/v1/chat/completions", {}, {"messages": [{"role": "user", "content": "x"}], "seed": 1 << 70}, 400,
     "invalid_value", "seed"),
    ("POST", "/v1/completions", {}, {"prompt": ["a", "b"]}, 400, "invalid_value", "prompt"),
    ("POST", "/v1/completions", {}, {"prompt": ""}, 400, "invalid_value", "prompt"),
    ("POST", "/v1/completions", {}, {"prompt": "x", "max_tokens": 5000}, 400, "context_length_exceeded", "prompt"),
    ("POST", "/v1/chat/completions", {}, {"messages": [{"role": "user", "content": synthetic.synthetic_text(3000)}]},
     400, "context_length_exceeded", "messages"),
    ("POST", "/v1/chat/completions", {}, {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404,
     "model_not_found", "model"),
    ("GET", "/v1/models/gpt-4", {}, None, 404, "model_not_found", "model"),
    ("GET", "/v1/nothing", {}, None, 404, "not_found", None),
    ("GET", "/v1/chat/completions", {}, None, 405, "method_not_allowed", None),
    ("POST", "/v1/chat/completions", {"Authorization": "Bearer wrong"}, {"messages": []}, 401, "invalid_api_key", None),
    ("GET", "/v1/models", {"Authorization": ""}, None, 401, "invalid_api_key", None),
    ("POST", "/v1/completions", {}, {"prompt": "x" * (MAX_BODY + 1)}, 413, "request_too_large", None),
    # the five kinds that once got a 500 (issue 25): a message that is not an object, one without a role,
    # NaN temperature or top_p (JSON's NaN, which Python's json reads), text the tokenizer cannot encode
    ("POST", "/v1/chat/completions", {}, {"messages": [3]}, 400, "invalid_value", "messages[0]"),
    ("POST", "/v1/chat/completions", {}, {"messages": ["hi"]}, 400, "invalid_value", "messages[0]"),
    ("POST", "/v1/chat/completions", {}, {"messages": [{"content": "x"}]}, 400, "invalid_value", "messages[0].role"),
    ("POST", "/v1/chat/completions", {}, {"messages": [{"role": "user", "content": "x"}], "temperature": float("nan")},
     400, "invalid_value", "temperature"),
    ("POST", "/v1/chat/completions", {}, {"messages": [{"role": "user", "content": "x"}], "top_p": float("nan")},
     400, "invalid_value", "top_p"),
    ("POST", "/v1/chat/completions", {}, {"messages": [{"role": "user", "content": "a\ud800"}]}, 400, "invalid_value",
     "messages[0].content"),
    ("POST", "/v1/completions", {}, {"prompt": "\udfff"}, 400, "invalid_value", "prompt"),
    # more of each: non-finite and extreme numbers, unencodable text elsewhere, wrong types, deep nesting
    ("POST", "/v1/completions", {}, {"prompt": "x", "temperature": float("-inf")}, 400, "invalid_value", "temperature"),
    ("POST", "/v1/completions", {}, b'{"prompt": "x", "max_tokens": 1e400}', 400, "invalid_value", "max_tokens"),
    ("POST", "/v1/completions", {}, {"prompt": "x", "max_tokens": 2.0}, 400, "invalid_value", "max_tokens"),
    ("POST", "/v1/completions", {}, {"prompt": "x", "seed": "1"}, 400, "invalid_value", "seed"),
    ("POST", "/v1/completions", {}, {"prompt": "x", "stop": ["ok", "\ud800"]}, 400, "invalid_value", "stop[1]"),
    ("POST", "/v1/completions", {}, {"prompt": [5, "a"]}, 400, "invalid_value", "prompt[1]"),
    ("POST", "/v1/completions", {}, {"prompt": [5, 1 << 40]}, 400, "invalid_value", "prompt[1]"),
    ("POST", "/v1/completions", {}, {"prompt": "x", "model": ["a"]}, 400, "invalid_value", "model"),
    ("POST", "/v1/completions", {}, {"prompt": "x", "stream_options": {"include_usage": "yes"}}, 400, "invalid_value",
     "stream_options.include_usage"),
    ("POST", "/v1/chat/completions", {}, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
     400, "invalid_value", "messages[0].content[0].text"),
    ("POST", "/v1/chat/completions", {}, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "invalid_value", "messages[0].content[0].type"),
    ("POST", "/v1/completions", {}, b"[" * 100_000, 400, "invalid_json", None),
]


def test_bad_requests_get_json_errors_and_the_server_goes_on(server, models):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
        for method, path, headers, body, status, code, param in BAD:
            content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            r = http.request(method, path, content=content, headers={"content-type": "application/json", **headers})
            assert r.status_code == status, (path, body if not isinstance(body, dict) else list(body), r.text[:200])
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert (error["code"], error["param"]) == (code, param), error
            assert health(server)["status"] == "ok"
        # chunked upload past the limit (no Content-Length): refused while reading
        r = http.post("/v1/completions", content=iter([b'{"prompt": "', b"y" * MAX_BODY, b'"}']))
        assert r.status_code == 413
    # the official client sees the same errors as its exception types
    with pytest.raises(openai.AuthenticationError):
        client(server, key="nope").models.list()
    with pytest.raises(openai.BadRequestError) as exc:
        client(server).completions.create(model=MODEL, prompt="hello", max_tokens=10_000)
    assert exc.value.code == "context_length_exceeded"
    assert [m.id for m in client(server).models.list()] == [MODEL]
    ok = client(server).completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3)
    assert ok.usage.completion_tokens == 3


def test_unknown_fields_are_accepted_and_ignored(server):
    """OpenAI clients send fields this server does not use (user, metadata, tools, a message's name...)."""
    body = {"model": MODEL, "max_tokens": 2, "user": "u1", "metadata": {"a": "b"}, "tools": [], "store": False,
            "response_format": {"type": "text"}, "stream_options": None, "stop": None, "max_completion_tokens": None,
            "messages": [{"role": "user", "content": "Hi", "name": "bob"}]}
    r = httpx.post(server + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    # `model` left out: the served model answers (docs/SERVER.md), named in the response
    del body["model"]
    r = httpx.post(server + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == MODEL


def test_an_engine_failure_is_a_500_and_the_harness_sees_it(server, engine, recorder, monkeypatch,
                                                            expect_server_errors):
    """The one 5xx there is: the engine itself failing. It proves the harness that fails every other test
    on a 5xx sees both kinds (an HTTP 500, and an error event inside a 200 stream)."""
    _, worker = engine
    before, seen = health(server), len(recorder.failures)

    def broken(*_, **__):
        raise RuntimeError("injected engine failure")

    monkeypatch.setattr(worker.session, "generate", broken)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2}
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server + "/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    streamed = httpx.post(server + "/v1/completions", json=dict(body, stream=True), headers=headers, timeout=60)
    assert streamed.status_code == 200 and '"type": "server_error"' in streamed.text
    caught = recorder.failures[seen:]
    assert [f for f in caught if f.endswith("HTTP 500")] and [f for f in caught if "event in the stream" in f], caught
    monkeypatch.undo()
    assert health(server)["failed"] == before["failed"] + 2
    ok = httpx.post(server + "/v1/completions", json=body, headers=headers, timeout=60)
    assert ok.status_code == 200  # the session started empty again and works


def _log_lines(records: list[logging.LogRecord], text: str) -> list[str]:
    return [r.getMessage() for r in records if text in r.getMessage()]


def test_stalled_and_vanishing_clients_get_a_deadline_and_one_log_line(server, caplog):
    """A client that sends half its headers is cut off after --read-timeout; one that sends headers and
    then stalls gets a 408; one that leaves mid-request or mid-stream costs one log line, no traceback."""
    host, port = server.removeprefix("http://").split(":")
    caplog.set_level(logging.INFO)
    uvicorn_log = logging.getLogger("uvicorn.error")  # (it does not propagate to the root: watch it too)
    uvicorn_log.addHandler(caplog.handler)
    try:
        headers = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n".encode()
        half_headers, half_body, gone = (socket.create_connection((host, int(port))) for _ in range(3))
        half_headers.sendall(headers)
        for s in (half_body, gone):
            s.sendall(headers + b"Content-Length: 100\r\n\r\n{")
        gone.close()
        with httpx.stream("POST", server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": MODEL, "prompt": "Tell", "max_tokens": 3000, "stream": True}) as r:
            next(r.iter_lines())  # leaves mid-stream
        for s in (half_headers, half_body):
            s.settimeout(30)
        assert half_headers.recv(1) == b""  # closed by the server, which answered nothing
        reply = b""
        while chunk := half_body.recv(4096):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408 ") and b'"code":"request_timeout"' in reply
        deadline = time.time() + 30
        while not _log_lines(caplog.records, "mid-stream") and time.time() < deadline:
            time.sleep(0.05)
    finally:
        uvicorn_log.removeHandler(caplog.handler)
        for s in (half_headers, half_body):
            s.close()
    for text in ["sent no complete request headers", "sent no complete request body",
                 "disconnected before sending its whole request", "disconnected mid-stream"]:
        assert len(_log_lines(caplog.records, text)) == 1, (text, [r.getMessage() for r in caplog.records])
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


def test_cli_refuses_bad_flags(capsys):
    assert serve.main(["--port", "8000"]) == 2
    assert serve.main(["--model", "x", "--port", "70000"]) == 2
    assert serve.main(["--model", "x", "--read-timeout", "nan"]) == 2
    assert serve.main(["--model", "x", "--read-timeout", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and err[0].startswith("error: --model is required") and "--port" in err[1]
    assert all(line.startswith("error: --read-timeout must be a positive") for line in err[2:])


class _CharTokenizer:
    """A tokenizer whose ids are characters of a fixed alphabet (decode only)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz \ufffd"

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.alphabet[i] for i in ids)


def test_answer_text_holds_back_a_possible_stop_string():
    from offload_runtime.server.engine import AnswerText

    tok = _CharTokenizer()
    ids = {c: i for i, c in enumerate(tok.alphabet)}
    answer = AnswerText(tok, ["xyz", "q"])
    sent = [answer.add([ids[c] for c in part]) for part in ["ab", "x", "y", "w", "\ufffd", "x", "yz"]]
    # "x" and "xy" may start a stop string, a trailing replacement character may be half a character
    assert sent == ["ab", "", "", "xyw", "", "\ufffd", ""]
    assert answer.stopped and answer.text == "abxyw\ufffd"  # cut before "xyz"
    plain = AnswerText(tok, [])
    assert [plain.add([ids[c]]) for c in "a\ufffd"] == ["a", ""] and plain.flush() == "\ufffd"


def test_session_shrinks_below_the_draft_sinks_after_evicting(models):
    """Prefix reuse can cut a long context back to a few tokens: the draft level (which evicted rows
    of the long context) must start again, not recurse."""
    from offload_runtime.session import Session
    from offload_runtime.settings import EngineSettings

    target = loading.load(str(models[0]), torch.device("cpu"), with_tokenizer=False).model
    draft = loading.load(str(models[1]), torch.device("cpu"), with_tokenizer=False).model
    settings = EngineSettings(budget=64, chunk_size=8, gamma=3, draft_gamma=4, sinks=16, window=48)
    session = Session(target, draft, SamplingParams(0.0), [], settings)
    session.extend(list(range(3, 203)))
    session.generate(8)
    assert session.l1.cache.evicted > 0
    session.truncate(5)
    session.extend([7, 8, 9])
    short = session.context[:]
    got = session.generate(8).token_ids
    assert got == generate_autoregressive(target, short, 8, SamplingParams(0.0), []).token_ids
