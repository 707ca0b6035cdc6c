"""Seeded fuzzing of the server's request schema: hundreds of requests generated from the pydantic models'
JSON schema (every field set to values of the wrong type, extreme and non-finite numbers, odd unicode,
removed; unknown fields added; whole bodies that are not objects or not JSON), sent in-process through
the ASGI app over the trained stories260K model. Every answer must be < 500 with OpenAI's error shape
when refused, and the server must still answer a valid request. The sabotage runs show the fuzz finds
a 5xx as soon as one validation is taken out of the schema."""
from __future__ import annotations

import asyncio
import copy
import json
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import create_model
from serve_harness import StatusRecorder

from offload_runtime import serve
from offload_runtime.server import schema as server_schema
from offload_runtime.server.requests import ApiError

ASSETS = Path(__file__).resolve().parents[1] / "offload_runtime" / "assets"
MODEL = "stories"
RANDOM = 200  # requests with random mutations, after the sweep of every field (~420)
ENDPOINTS = {"/v1/chat/completions": server_schema.ChatRequest, "/v1/completions": server_schema.CompletionRequest}
COMMON = {"model": MODEL, "max_tokens": 1, "max_completion_tokens": 1, "temperature": 0.7, "top_p": 0.9, "seed": 7,
          "stream": False, "stream_options": {"include_usage": True}, "stop": ["\n\n"], "n": 1, "best_of": 1,
          "logprobs": False, "top_logprobs": None, "echo": False, "suffix": None, "presence_penalty": 0,
          "frequency_penalty": 0, "logit_bias": None}
SHORT = {"model": MODEL, "max_tokens": 1, "temperature": 0.0, "stream": True, "stop": "zz", "seed": 1}
BASES = {  # valid bodies: between them every field of the schema (nested ones at index 0), each form of a union
    "/v1/chat/completions": [
        dict(COMMON, messages=[{"role": "user", "content": [{"type": "text", "text": "Once upon a time"}]},
                               {"role": "assistant", "content": "there was a cat."}]),
        dict(SHORT, messages=[{"role": "user", "content": "Tell me a story."}])],
    "/v1/completions": [dict(COMMON, prompt=[[1, 403, 407, 261, 378]]), dict(SHORT, prompt="Once upon a time")],
}
ODD = ["\x00", "\x1b[2J", "\u202e", "\ufeff", "\uffff", "\U0010ffff", "😀", "e\u0301", "\u0645", "\r\n", "\ufffd",
       "<s>", "</s>", "\u200b", "\\u0000"]  # controls, bidi, BOM, non-characters, emoji, combining, specials...
MISSING, UNKNOWN = object(), object()  # two mutations that are not values: remove the field, add an unknown one
CLASSES = {  # the kinds of value every field is tried with (plus its schema's own bounds and enums)
    "wrong type": [True, False, "1", "text", "user", [], [None], [1, 2], ["a"], [[1]], [{}], {}, {"a": 1},
                   {"type": "text"}, {"role": "user"}, {"include_usage": "yes"}],
    "extreme number": [0, -1, 2, 2 ** 31, 2 ** 63, 2 ** 64, -(2 ** 63) - 1, 10 ** 40, 0.5, -0.0, 1e308, -1e308, 5e-324],
    "non-finite number": [float("nan"), float("inf"), float("-inf")],
    "lone surrogate": ["\ud800", "a\udfffb", "Once \udbff upon", "\udc00\ud800"],
    "odd unicode": ODD + [f"Once {odd} upon" for odd in ODD] + ["", " ", "a" * 3000, None],
    "missing": [MISSING],
    "unknown field": [UNKNOWN],
}
HOSTILE = [v for values in CLASSES.values() for v in values if v is not MISSING and v is not UNKNOWN]
RAW_BODIES = [b"", b"{", b"nul", b"[1, 2]", b'"text"', b"3", b"null", b"NaN", b"\xff\xfe{}", b"[" * 50_000,
              b'{"prompt": ' + b"9" * 5000 + b"}", b'{"a": 1, "a": 2}']


def resolve(schema: dict, defs: dict) -> list[dict]:
    """The concrete alternatives of a sub-schema ($ref followed, anyOf/oneOf flattened)."""
    if "$ref" in schema:
        return resolve(defs[schema["$ref"].split("/")[-1]], defs)
    if "anyOf" in schema or "oneOf" in schema:
        return [c for s in schema.get("anyOf", schema.get("oneOf")) for c in resolve(s, defs)]
    return [schema]


def schema_fields(schema: dict, defs: dict, path: tuple = ()) -> list[tuple[tuple, list[dict]]]:
    """(path, alternatives) of every field the schema names: nested objects and list items (index 0) too."""
    out = []
    for name, sub in schema.get("properties", {}).items():
        options = resolve(sub, defs)
        out.append((path + (name,), options))
        for option in options:
            if option.get("type") == "object":
                out += schema_fields(option, defs, path + (name,))
            elif option.get("type") == "array" and "items" in option:
                items = resolve(option["items"], defs)
                out.append((path + (name, 0), items))
                for item in items:
                    if item.get("type") == "object":
                        out += schema_fields(item, defs, path + (name, 0))
    return out


def near_valid(options: list[dict]) -> list[Any]:
    """Values at and just past the schema's own bounds, its enums and constants."""
    values: list[Any] = []
    for o in options:
        values += o.get("enum", []) + ([o["const"]] if "const" in o else [])
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key in o:
                b = o[key]
                values += [b, b - 1, b + 1] if o.get("type") == "integer" else [b, b - 1e-9, b + 1e-9, b * (1 + 1e-15)]
        if o.get("type") == "string":
            values += ["x", "Hello!"] + [f"Once {odd} upon" for odd in ODD] + ODD
    return values


def fields_of(kind: type) -> list[tuple[tuple, list[dict]]]:
    schema = kind.model_json_schema()
    return schema_fields(schema, schema.get("$defs", {}))


def get_parent(body: Any, path: tuple) -> tuple[Any, Any] | None:
    """(container, key) of `path` in `body`, or None where an earlier mutation changed the structure."""
    node = body
    for key in path[:-1]:
        ok = isinstance(node, dict) and key in node or isinstance(node, list) and isinstance(key, int) and key < len(node)
        if not ok:
            return None
        node = node[key]
    last = path[-1]
    if isinstance(node, dict) or isinstance(node, list) and isinstance(last, int) and last < len(node):
        return node, last
    return None


def present(body: Any, path: tuple) -> bool:
    place = get_parent(body, path)
    return place is not None and (not isinstance(place[0], dict) or place[1] in place[0])


def objects_in(body: Any) -> list[dict]:
    found = [body] if isinstance(body, dict) else []
    for child in (body.values() if isinstance(body, dict) else body if isinstance(body, list) else []):
        found += objects_in(child)
    return found


def apply(body: dict, path: tuple, value: Any, rng: random.Random) -> None:
    """Set the field at `path` to `value` (or remove it, or add an unknown field beside it)."""
    place = get_parent(body, path)
    if place is None:  # an earlier mutation changed the structure
        return
    container, key = place
    if value is UNKNOWN:
        rng.choice(objects_in(body))[rng.choice(["extra", "__proto__", "tools", "user", "x" * 40])] = rng.choice(HOSTILE)
    elif value is MISSING:
        container.pop(key) if isinstance(container, list) else container.pop(key, None)
    else:
        container[key] = value


def values_for(options: list[dict], kind: str) -> list[Any]:
    return near_valid(options) if kind == "near the schema's bounds" else CLASSES[kind]


def base_with(path: str, field: tuple, rng: random.Random) -> dict:
    """A copy of a valid body that has `field`, a random subset of the other optional fields left out."""
    body = copy.deepcopy(rng.choice([b for b in BASES[path] if present(b, field)]))
    for name in [k for k in body if k not in ("messages", "prompt", field[0]) and rng.random() < 0.3]:
        del body[name]
    return body


def generate(seed: int, n_random: int) -> list[tuple[str, bytes]]:
    """(endpoint, raw body) pairs, reproducible from `seed`: first every field of each endpoint's schema
    once with a value of each class, the rest of the body valid; then `n_random` bodies with one to
    three random mutations, or not an object, or not JSON."""
    rng = random.Random(seed)
    kinds = list(CLASSES) + ["near the schema's bounds"]
    plans = [(path, [(field, rng.choice(values_for(options, kind) or HOSTILE))])
             for path, model in ENDPOINTS.items() for field, options in fields_of(model) for kind in kinds]
    for i in range(n_random):
        path = list(ENDPOINTS)[i % 2]
        fields = fields_of(ENDPOINTS[path])
        plans.append((path, [(f, rng.choice(values_for(o, rng.choice(kinds)) or HOSTILE))
                             for f, o in rng.choices(fields, k=rng.choice([1, 2, 3]))]))
    requests = []
    for path, changes in plans:
        if rng.random() < 0.03:
            requests.append((path, rng.choice(RAW_BODIES)))
            continue
        body: Any = base_with(path, changes[0][0], rng)
        for field, value in changes:
            apply(body, field, value, rng)
        if rng.random() < 0.03:
            body = rng.choice(HOSTILE)  # not an object at all
        requests.append((path, json.dumps(body).encode()))  # (NaN, Infinity, lone surrogates as JSON escapes)
    return requests


@pytest.fixture(scope="module")
def app():
    """The app over stories260K (no draft: ten times faster per answer here), wrapped in the 5xx recorder."""
    args = serve.parse_args(["--model", str(ASSETS / "stories260K"), "--device", "cpu", "--budget", "64", "--max-new-tokens", "1", "--model-name", MODEL])
    fastapi_app, worker = serve.build(args)
    yield StatusRecorder(fastapi_app)
    worker.close()


async def send_all(app: StatusRecorder, requests: list[tuple[str, bytes]], stop_at_5xx: bool) -> list[tuple]:
    """(path, body, status, answer) of each request sent; stops at the first 5xx if asked."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    answers = []
    async with httpx.AsyncClient(transport=transport, base_url="http://fuzz", timeout=60) as client:
        for path, body in requests:
            before = len(app.failures)
            r = await client.post(path, content=body, headers={"content-type": "application/json"})
            answers.append((path, body, r.status_code, r.text))
            if stop_at_5xx and (r.status_code >= 500 or len(app.failures) > before):
                break
    return answers


def check_answer(path: str, body: bytes, status: int, text: str) -> None:
    assert status < 500, (path, body[:300], text[:300])
    if status >= 400:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], text
        assert error["type"] == "invalid_request_error", text


def test_fields_come_from_the_schema_and_the_base_bodies_hold_them_all():
    """Every field of the request models is fuzzed: a new one without a place in BASES fails here."""
    for path, kind in ENDPOINTS.items():
        fields = fields_of(kind)
        assert len(fields) >= 20
        missing = [f for f, _ in fields if not any(present(base, f) for base in BASES[path])]
        assert not missing, f"{path}: add these fields to BASES: {missing}"
        for base in BASES[path]:
            kind.model_validate(base, context={"vocabulary": 512})  # the bases are valid


def test_fuzzed_requests_never_get_a_server_error(app):
    app.failures.clear()
    requests = generate(seed=25, n_random=RANDOM)
    assert len(requests) >= 500
    answers = asyncio.run(send_all(app, requests, stop_at_5xx=False))
    for answer in answers:
        check_answer(*answer)
    assert not app.failures, app.failures[:5]
    statuses = [status for _, _, status, _ in answers]
    assert statuses.count(200) >= 50 and statuses.count(400) >= 250  # both the engine and the refusals were hit
    ok = asyncio.run(send_all(app, [("/v1/completions", json.dumps(BASES["/v1/completions"][1]).encode())], False))
    assert ok[0][2] == 200 and "data: [DONE]" in ok[0][3]  # and the server still answers


SABOTAGE = {  # one validation taken out of the schema each
    "temperature may be NaN": {"temperature": (float | None, None)},
    "messages may be anything": {"messages": (list[Any], ...)},
    "a prompt need not be encodable": {"prompt": (str, ...)},
}


@pytest.mark.parametrize("removed", SABOTAGE)
def test_the_fuzz_finds_a_5xx_once_a_validation_is_removed(app, monkeypatch, removed):
    app.failures.clear()
    for name, kind in [("ChatRequest", server_schema.ChatRequest), ("CompletionRequest", server_schema.CompletionRequest)]:
        loosened = {k: v for k, v in SABOTAGE[removed].items() if k in kind.model_fields}
        monkeypatch.setattr(server_schema, name, create_model(name, __base__=kind, **loosened))
    answers = asyncio.run(send_all(app, generate(seed=25, n_random=RANDOM), stop_at_5xx=True))
    assert answers[-1][2] >= 500 or app.failures, f"{removed}: no 5xx in {len(answers)} requests"
    app.failures.clear()


@pytest.mark.parametrize("kind, body, message", [
    (server_schema.ChatRequest, {"messages": []}, "messages: must be a non-empty list of messages, got []"),
    (server_schema.CompletionRequest, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
     "stop: must be a non-empty string or a list of at most 4 of them, got ['a', 'b', 'c', 'd', 'e']")])
def test_a_list_of_the_wrong_length_is_refused_in_the_fields_words(kind, body, message):
    """Not pydantic's "List should have at least 1 item after validation": the field's own description."""
    with pytest.raises(ApiError) as refused:
        server_schema.validate(kind, body)
    assert (refused.value.status, refused.value.param, refused.value.message) == (400, message.split(":")[0], message)
