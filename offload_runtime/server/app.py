"""The HTTP side of the server: OpenAI routes, API key, body limit, JSON errors, server-sent events.

Handlers validate and tokenize on the event loop, then hand the request to the EngineWorker's
queue and wait on its future (or stream its text as it comes), so the loop stays free to accept,
refuse and cancel requests while the engine works.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from . import schema
from ..chat_format import ChatFormat
from ..errors import UserError
from .engine import Completion, EngineWorker
from .engine import Request as EngineRequest
from .requests import (ApiError, chat_prompt_ids, chunk, completion_prompt_ids, fit_max_tokens,
                              parse_options, response, usage, user_error, new_id)

log = logging.getLogger("offload_runtime.serve")
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


@dataclass
class ServerConfig:
    model_name: str
    defaults: Any  # the server's generation flags (run_config.Generation): max_new_tokens, temperature, top_p
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    read_timeout_s: float = 30.0  # a request's body must arrive within this time of its headers


def error_response(exc: ApiError) -> JSONResponse:
    closing = {"Connection": "close"} if exc.status in (408, 499) else None  # (the rest of the body is not read)
    return JSONResponse(exc.body(), status_code=exc.status, headers=closing)


def client_name(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "a client"


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past `limit` bytes before it is all read."""
    length = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body is larger than the server's limit of {limit} bytes",
                         code="request_too_large")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large
        body.append(part)
    return b"".join(body)


async def read_json(request: Request, limit: int, timeout: float) -> dict:
    """The body as a JSON object. A body not all there `timeout` seconds after the headers is refused
    (408): a client that stalls must not hold its connection forever. One log line when a client leaves."""
    try:
        async with asyncio.timeout(timeout):
            raw = await read_body(request, limit)
    except TimeoutError:
        log.warning("%s sent no complete request body within %g s: 408", client_name(request), timeout)
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout")
    except ClientDisconnect:
        log.info("%s disconnected before sending its whole request", client_name(request))
        raise ApiError(499, "the client closed the request", code="client_closed_request")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # (RecursionError: [[[[... nested too deep)
        raise ApiError(400, f"the body is not valid JSON: {str(exc)[:200]}", code="invalid_json")
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return data


def sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


class Routes:
    """The handlers, over one EngineWorker."""

    def __init__(self, worker: EngineWorker, config: ServerConfig) -> None:
        self.worker, self.config = worker, config
        self.format = ChatFormat(worker.tokenizer)

    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server has {self.config.model_name!r}",
                           param="model", code="model_not_found")

    def model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "offload_runtime"}

    async def models(self, request: Request) -> dict:
        self.authorize(request)
        return {"object": "list", "data": [self.model_card()]}

    async def model(self, name: str, request: Request) -> dict:
        self.authorize(request)
        self.check_model(name)
        return self.model_card()

    async def health(self) -> dict:
        return {"status": "ok", "model": self.config.model_name, "context_tokens": len(self.worker.session.context),
                **self.worker.counts}

    async def chat_completions(self, request: Request) -> Any:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Any:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, chat: bool) -> Any:
        self.authorize(request)
        body = await read_json(request, self.config.max_body_bytes, self.config.read_timeout_s)
        kind = schema.ChatRequest if chat else schema.CompletionRequest  # (looked up here: a test swaps one)
        valid = schema.validate(kind, body, vocabulary=len(self.worker.tokenizer))
        self.check_model(valid.model)
        options = parse_options(valid, self.config.defaults)
        ids = chat_prompt_ids(valid, self.format) if chat else completion_prompt_ids(valid, self.worker.tokenizer)
        max_tokens = fit_max_tokens(options.max_tokens, len(ids), self.worker.max_context,
                                    self.config.defaults.max_new_tokens, "messages" if chat else "prompt")
        job = EngineRequest(ids, max_tokens, options.params, options.seed, options.stop)
        rid = new_id("chatcmpl" if chat else "cmpl")
        self.check_open()
        if options.stream:
            events = self._stream(job, rid, chat, options.include_usage, client_name(request))
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        done = await self._wait(job, request)
        return response(done, rid, self.config.model_name, chat)

    def check_open(self) -> None:
        if self.worker.closing:
            raise ApiError(503, "the server is shutting down", code="server_shutting_down", kind="server_error")

    async def _result(self, future: asyncio.Future) -> Completion:
        try:
            done = await future
        except UserError as exc:
            raise user_error(exc)
        if done.finish_reason == "cancelled":
            self.check_open()  # cancelled by the shutdown: say so (a client that left hears nothing anyway)
        return done

    async def _wait(self, job: EngineRequest, request: Request) -> Completion:
        """The answer of a non-streamed request; a client that disconnects meanwhile cancels it."""
        future = asyncio.wrap_future(self.worker.submit(job))
        while not job.cancelled.is_set():
            done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                log.info("%s disconnected while waiting for its answer: generation cancelled", client_name(request))
                job.cancelled.set()
        if not future.done():
            self.check_open()  # shutting down: answer now, the engine stops on its own
        return await self._result(future)

    async def _stream(self, job: EngineRequest, rid: str, chat: bool, include_usage: bool,
                      client: str) -> AsyncIterator[str]:
        """Server-sent events: text deltas as the engine produces them, the finish, [DONE].
        Leaving early (the client disconnected: Starlette cancels this generator) cancels the job."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def post(item: Any) -> None:  # from the worker thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed (shutdown)
                pass

        job.on_text, job.on_shutdown = post, lambda: post(None)
        name = self.config.model_name
        future = self.worker.submit(job)
        future.add_done_callback(lambda _: post(None))
        try:
            if chat:
                yield sse(chunk(rid, name, chat, None, role=True))
            while (text := await queue.get()) is not None:
                yield sse(chunk(rid, name, chat, text))
            try:
                if not future.done():
                    self.check_open()  # shutting down: answer now, the engine stops on its own
                done = await self._result(asyncio.wrap_future(future))
            except ApiError as exc:
                yield sse(exc.body())
                return
            except Exception as exc:
                log.exception("generation failed")
                yield sse(ApiError(500, f"generation failed: {exc}", kind="server_error").body())
                return
            last = chunk(rid, name, chat, None, finish=done.finish_reason)
            yield sse(dict(last, usage=usage(done), offload_runtime=done.stats))
            if include_usage:
                yield sse(dict(chunk(rid, name, chat, None), choices=[], usage=usage(done)))
            yield "data: [DONE]\n\n"
        finally:
            if not future.done() and not job.cancelled.is_set():
                log.info("%s disconnected mid-stream: generation cancelled", client)
            job.cancelled.set()  # a no-op once the job is done


def install_errors(app: FastAPI) -> None:
    """Every error as an OpenAI JSON error; the server goes on."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(ApiError(exc.status_code, message, code=code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(400, f"invalid request: {exc.errors()}"))

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return error_response(ApiError(500, f"internal error: {exc}", kind="server_error"))


def create_app(worker: EngineWorker, config: ServerConfig) -> FastAPI:
    """The FastAPI application over a worker (the caller owns the worker and closes it)."""
    app = FastAPI(title="offload_runtime", docs_url=None, redoc_url=None, openapi_url=None)
    routes = Routes(worker, config)
    install_errors(app)
    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/v1/models", routes.models, methods=["GET"])
    app.add_api_route("/v1/models/{name:path}", routes.model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"])
    return app
