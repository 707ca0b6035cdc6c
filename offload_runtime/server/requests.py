"""Validated OpenAI requests in (server_schema), engine requests out: options, prompt rendering and
tokenization, the refusals that need the model (context length), and the OpenAI response shapes."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..chat_format import ChatFormat
from ..errors import UserError
from ..sampling import SamplingParams
from .engine import Completion

if TYPE_CHECKING:  # (the schema imports ApiError from here)
    from .schema import ChatRequest, CompletionRequest, Generation, Message


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


@dataclass
class Options:
    """What a request asks of the generation (the prompt apart)."""
    max_tokens: int | None
    params: SamplingParams
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


def parse_options(request: Generation, defaults: Any) -> Options:
    """Sampling and length options of a validated request; `defaults`: the server's flags (run's generation group)."""
    max_tokens = request.max_completion_tokens or request.max_tokens
    temperature = defaults.temperature if request.temperature is None else request.temperature
    top_p = defaults.top_p if request.top_p is None else request.top_p
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return Options(max_tokens, SamplingParams(temperature, top_p), request.seed, stop, bool(request.stream),
                   include_usage)


def _text(message: Message) -> str:
    content = message.content
    return content if isinstance(content, str) else "".join(part.text for part in content)


def chat_prompt_ids(request: ChatRequest, fmt: ChatFormat) -> list[int]:
    """The conversation rendered as the chat renders it (ChatFormat.conversation: the tokenizer's chat
    template, or the chat's plain layout), as token ids."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m)}
                for m in request.messages]
    try:
        text = fmt.conversation(messages)
    except Exception as exc:  # a template may refuse an order of roles (jinja raise_exception)
        raise invalid("messages", f"the chat template refused the conversation: {exc}")
    return fmt.encode(text, first=not fmt.templated)  # a template writes its own BOS


def completion_prompt_ids(request: CompletionRequest, tokenizer: Any) -> list[int]:
    """/v1/completions: one prompt, a string or token ids (checked against the vocabulary by the schema),
    encoded as `run --prompt` encodes it."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"] if prompt else []
    return list(prompt)


def fit_max_tokens(requested: int | None, n_prompt: int, limit: int, default: int, param: str) -> int:
    """The tokens to generate: as requested, or the server's default cut to the room left; refuse what cannot fit."""
    if n_prompt == 0:
        raise invalid(param, "the prompt is empty")
    room = limit - n_prompt
    if requested is None and room > 0:
        return min(default, room)
    if requested is None or requested > room:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{n_prompt + (requested or 1)} tokens ({n_prompt} in the prompt, {requested or 1} for the "
                       f"completion). Please reduce the length of the prompt or of max_tokens.",
                       param=param, code="context_length_exceeded")
    return requested


def user_error(exc: UserError) -> ApiError:
    return ApiError(400, str(exc), code="invalid_value")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(done: Completion) -> dict:
    prefilled = done.stats.get("prefilled_tokens", 0)
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": len(done.token_ids),
            "total_tokens": done.prompt_tokens + len(done.token_ids),
            "prompt_tokens_details": {"cached_tokens": max(0, done.prompt_tokens - prefilled)}}


def envelope(rid: str, kind: str, model: str, choice: dict, created: int | None = None) -> dict:
    return {"id": rid, "object": kind, "created": created or int(time.time()), "model": model,
            "system_fingerprint": None, "choices": [dict(choice, index=0, logprobs=None)]}


def response(done: Completion, rid: str, model: str, chat: bool) -> dict:
    """The whole answer: chat.completion or text_completion, with usage and our statistics."""
    if chat:
        choice = {"message": {"role": "assistant", "content": done.text}, "finish_reason": done.finish_reason}
    else:
        choice = {"text": done.text, "finish_reason": done.finish_reason}
    out = envelope(rid, "chat.completion" if chat else "text_completion", model, choice)
    out.update(usage=usage(done), offload_runtime=done.stats)
    return out


def chunk(rid: str, model: str, chat: bool, text: str | None, finish: str | None = None, role: bool = False) -> dict:
    """One streamed event: a text delta, or the last one (finish_reason set, empty delta)."""
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"delta": delta, "finish_reason": finish}
    else:
        choice = {"text": text or "", "finish_reason": finish}
    return envelope(rid, "chat.completion.chunk" if chat else "text_completion", model, choice)
