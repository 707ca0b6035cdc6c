"""The server tests' watch on 5xx answers: an exception that escapes the request schema is a bug, so
every answer >= 500 (and every `server_error` event inside a stream, whose HTTP status was already
200) is recorded by an ASGI wrapper around the app, and a test that saw one fails (see
`fail_on_server_errors`; a test that injects an engine failure on purpose asks for the fixture
`expect_server_errors`, and checks the recorder itself)."""
from __future__ import annotations

from typing import Any

import pytest

SERVER_ERROR_EVENT = b'"type": "server_error"'  # an error event in a stream (json.dumps' separators)


class StatusRecorder:
    """ASGI middleware: passes everything through and keeps a line for each 5xx answer, each
    server_error event in a stream and each exception that escaped the application."""

    def __init__(self, app: Any) -> None:
        self.app, self.failures = app, []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        where = f"{scope['method']} {scope['path']}"

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 500:
                self.failures.append(f"{where}: HTTP {message['status']}")
            elif message["type"] == "http.response.body" and SERVER_ERROR_EVENT in message.get("body", b""):
                self.failures.append(f"{where}: a server_error event in the stream")
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            self.failures.append(f"{where}: {type(exc).__name__}: {exc}")
            raise


@pytest.fixture(autouse=True)
def fail_on_server_errors(request: pytest.FixtureRequest):
    """Autouse in a server test module (import it there): a test using the module's `recorder` fails
    if the server answered any of its requests with a 5xx, unless it asks for `expect_server_errors`."""
    if "recorder" not in request.fixturenames:
        yield
        return
    recorder = request.getfixturevalue("recorder")
    start = len(recorder.failures)
    yield
    seen = recorder.failures[start:]
    if "expect_server_errors" not in request.fixturenames:
        assert not seen, f"the server answered with a server error (a bug: bad input must get a 4xx): {seen}"


@pytest.fixture
def expect_server_errors() -> None:
    """Asked for by a test that makes the server fail on purpose (an injected engine failure)."""


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def served_models(checkpoint: Any, folder: Any) -> tuple[Any, Any]:
    """(target dir with a chat template, draft dir): random checkpoints sharing the trained tokenizer."""
    import shutil

    shutil.copytree(checkpoint("llama", eos_token_id=None), folder, dirs_exist_ok=True)
    (folder / "chat_template.jinja").write_text(CHATML)
    draft = checkpoint("llama", seed=3, eos_token_id=None, hidden_size=32, intermediate_size=64,
                       num_attention_heads=2, num_key_value_heads=1)
    return folder, draft


def greedy_answerer(target: Any) -> tuple[Any, Any]:
    """(tokenizer, answer(ids, n)): the target alone's greedy text (autoregressive, a fresh cache): the
    reference a served answer must equal."""
    import torch

    from offload_runtime import loading
    from offload_runtime.generate import generate_autoregressive
    from offload_runtime.sampling import SamplingParams

    model = loading.load(str(target), torch.device("cpu"), with_tokenizer=False).model
    tok = loading.load_tokenizer(target)

    def answer(ids: list[int], n: int) -> str:
        return tok.decode(generate_autoregressive(model, ids, n, SamplingParams(0.0), []).token_ids,
                          skip_special_tokens=True)

    return tok, answer
