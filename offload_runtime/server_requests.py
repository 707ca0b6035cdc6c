"""OpenAI request bodies in, engine requests out: validation (every refusal names its parameter),
prompt rendering and tokenization, and the OpenAI response shapes."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from .chat import ChatFormat
from .errors import UserError
from .sampling import SamplingParams
from .server_engine import Completion

ROLES = ("system", "developer", "user", "assistant")
UNSUPPORTED = {"n": 1, "best_of": 1, "logprobs": None, "top_logprobs": None, "echo": False, "suffix": None,
               "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None}  # accepted only at these values


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


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(name, f"must be a number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        raise invalid(name, f"must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return float(value)


def _integer(body: dict, name: str, positive: bool) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (positive and value <= 0):
        raise invalid(name, f"must be {'a positive' if positive else 'an'} integer, got {value!r}")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop", "must be a non-empty string or a list of at most 4 of them")
    return stops


def parse_options(body: dict, defaults: Any) -> Options:
    """Sampling and length options; `defaults`: the server's flags (run's generation group)."""
    for name, allowed in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value != allowed and not (not allowed and not value):  # e.g. logprobs false
            raise invalid(name, f"only {allowed!r} is supported, got {value!r}")
    max_tokens = _integer(body, "max_completion_tokens", True)
    max_tokens = _integer(body, "max_tokens", True) if max_tokens is None else max_tokens
    temperature = _number(body, "temperature", defaults.temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", defaults.top_p, 0.0, 1.0, low_open=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream", f"must be true or false, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options", "must be an object")
    seed = _integer(body, "seed", False)
    if seed is not None and not -(1 << 63) <= seed < 1 << 64:
        raise invalid("seed", f"must fit in 64 bits, got {seed}")
    return Options(max_tokens, SamplingParams(temperature, top_p), seed, _stop(body), stream,
                   bool(options.get("include_usage")))


def _content(message: Any, i: int) -> str:
    if not isinstance(message, dict):
        raise invalid(f"messages[{i}]", "must be an object with role and content")
    if message.get("role") not in ROLES:
        raise invalid(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {message.get('role')!r}")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise invalid(f"messages[{i}].content", "only text content parts are supported")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise invalid(f"messages[{i}].content", "must be a string or a list of text parts")
    return content


def chat_prompt_ids(body: dict, fmt: ChatFormat) -> list[int]:
    """The conversation rendered as the chat renders it (the tokenizer's chat template), as token ids."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "must be a non-empty list of messages")
    messages = [{"role": "system" if m["role"] == "developer" else m["role"], "content": _content(m, i)}
                for i, m in enumerate(messages)]
    if fmt.templated:
        try:
            text = fmt.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template may refuse an order of roles (jinja raise_exception)
            raise invalid("messages", f"the chat template refused the conversation: {exc}")
        return fmt.encode(text, first=False)  # the template writes its own BOS
    return fmt.encode(plain_conversation(messages), first=True)


def plain_conversation(messages: list[dict]) -> str:
    """The chat's "User:/Assistant:" layout, for tokenizers without a chat template."""
    text = ""
    for m in messages:
        if m["role"] == "system":
            text += m["content"] + "\n\n"
        elif m["role"] == "user":
            text += ("" if not text or text.endswith("\n") else "\n") + f"User: {m['content']}\nAssistant:"
        else:
            text += m["content"]
    return text


def completion_prompt_ids(body: dict, tokenizer: Any) -> list[int]:
    """/v1/completions: one prompt, a string or token ids, encoded as `run --prompt` encodes it."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"] if prompt else []
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 or t >= len(tokenizer) for t in prompt):
            raise invalid("prompt", "token ids must be in the vocabulary")
        return prompt
    raise invalid("prompt", "must be one string or one list of token ids (one prompt per request)")


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
