"""The request schema: pydantic models of the OpenAI bodies the server accepts, checked before anything
reaches the tokenizer or the engine. Types are strict (no "1" for 1, no true for 1), numbers finite,
text encodable as UTF-8 (no lone surrogates); fields we do not know are accepted and ignored, as
OpenAI clients send many. A refusal is a 400 whose `param` names the field, e.g. `messages[0].role`."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Strict, Tag,
                      ValidationError, ValidationInfo)

from .requests import ApiError

ROLES = ("system", "developer", "user", "assistant")


def _encodable(text: str) -> str:
    """Refuse text UTF-8 cannot carry (a lone surrogate, from a JSON escape like "\\ud800"): the tokenizer would fail."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"holds {text[exc.start]!r} at index {exc.start}, not encodable as UTF-8 "
                         "(a lone surrogate)") from None
    return text


def _in_vocabulary(token: int, info: ValidationInfo) -> int:
    size = (info.context or {}).get("vocabulary")
    if size is not None and token >= size:
        raise ValueError(f"is not in the vocabulary (0 to {size - 1})")
    return token


def _kind(value: Any) -> str:
    """The tag of a string-or-list union: one branch is validated, so one error names the field."""
    return "a string" if isinstance(value, str) else "a list"


def _one_prompt(value: Any) -> Any:
    """A batch of one prompt (["text"] or [[ids]]) is that prompt; a batch of more is refused."""
    batch = isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value)
    if batch and len(value) > 1:
        raise ValueError(f"one prompt per request (a string or a list of token ids), got a batch of {len(value)}")
    return value[0] if batch else value


def _only(allowed: Any) -> Any:
    """An OpenAI option we support at one value only (or left out, or a false value where that one is falsy)."""
    def check(value: Any) -> Any:
        if value is not None and value != allowed and not (not allowed and not value):
            raise ValueError(f"only {allowed!r} is supported")
        return value
    return AfterValidator(check)


TAGS = ("a string", "a list")  # union tags: in an error's location, never a field
Text = Annotated[str, Strict(), AfterValidator(_encodable)]
NonEmptyText = Annotated[Text, Field(min_length=1)]
Finite = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Integer = Annotated[int, Strict()]
Flag = Annotated[bool, Strict()]
TokenId = Annotated[int, Strict(), Field(ge=0), AfterValidator(_in_vocabulary)]


class Open(BaseModel):
    """Unknown fields are accepted (and ignored)."""
    model_config = ConfigDict(extra="allow")


class TextPart(Open):
    type: Literal["text"] = Field(description="'text' (only text content parts are supported)")
    text: Text = Field(description="a string")


class Message(Open):
    role: Literal[ROLES] = Field(description="one of " + ", ".join(ROLES))
    content: Annotated[Annotated[Text, Tag("a string")] | Annotated[list[TextPart], Tag("a list")],
                       Discriminator(_kind)] = Field(description="a string or a list of text parts")


class StreamOptions(Open):
    include_usage: Flag | None = Field(None, description="true or false")


Stop = Annotated[Annotated[NonEmptyText, Tag("a string")]
                 | Annotated[list[NonEmptyText], Field(max_length=4), Tag("a list")], Discriminator(_kind)]


class Generation(Open):
    """The options both endpoints share (the prompt apart)."""
    model: Text | None = Field(None, description="a string (the served model's id)")
    max_tokens: Annotated[Integer, Field(gt=0)] | None = Field(None, description="a positive integer")
    max_completion_tokens: Annotated[Integer, Field(gt=0)] | None = Field(None, description="a positive integer")
    temperature: Annotated[Finite, Field(ge=0, le=2)] | None = Field(None, description="a number in [0, 2]")
    top_p: Annotated[Finite, Field(gt=0, le=1)] | None = Field(None, description="a number in (0, 1]")
    seed: Annotated[Integer, Field(ge=-(1 << 63), lt=1 << 64)] | None = Field(
        None, description="an integer that fits in 64 bits")
    stream: Flag | None = Field(None, description="true or false")
    stream_options: StreamOptions | None = Field(None, description="an object")
    stop: Stop | None = Field(None, description="a non-empty string or a list of at most 4 of them")
    n: Annotated[Integer | None, _only(1)] = Field(None, description="1")
    best_of: Annotated[Integer | None, _only(1)] = Field(None, description="1")
    logprobs: Annotated[Flag | Integer | None, _only(None)] = Field(None, description="false or null")
    top_logprobs: Annotated[Integer | None, _only(None)] = Field(None, description="null")
    echo: Annotated[Flag | None, _only(False)] = Field(None, description="false")
    suffix: Annotated[Text | None, _only(None)] = Field(None, description="null")
    presence_penalty: Annotated[Finite | None, _only(0)] = Field(None, description="0")
    frequency_penalty: Annotated[Finite | None, _only(0)] = Field(None, description="0")
    logit_bias: Annotated[dict[str, Finite] | None, _only(None)] = Field(None, description="null")


class ChatRequest(Generation):
    messages: list[Message] = Field(min_length=1, description="a non-empty list of messages")


class CompletionRequest(Generation):
    prompt: Annotated[Annotated[Annotated[Text, Tag("a string")] | Annotated[list[TokenId], Tag("a list")],
                                Discriminator(_kind)], BeforeValidator(_one_prompt)] = Field(
        description="one string or one list of token ids, one prompt per request")


MODELS = (TextPart, Message, StreamOptions, Generation, ChatRequest, CompletionRequest)
DESCRIPTIONS = {name: f.description for m in MODELS for name, f in m.model_fields.items() if f.description}
SHAPE_ERRORS = {"model_type", "dict_type", "string_type", "int_type", "bool_type", "float_type", "list_type",
                "literal_error", "int_from_float", "model_attributes_type",
                "too_short", "too_long"}  # a list's length: its description says the bounds ("messages": [])


def field_name(loc: tuple) -> str:
    """('messages', 0, 'content', 'a list', 1, 'text') -> 'messages[0].content[1].text' (union tags dropped)."""
    out = ""
    for part in loc:
        if part in TAGS:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def error_message(error: dict) -> str:
    """One reason in words: the field's own description for a value of the wrong kind, else pydantic's."""
    path = [p for p in error["loc"] if p not in TAGS]
    last = path[-1] if path else None
    described = DESCRIPTIONS.get(last) if isinstance(last, str) else None
    if error["type"] == "missing":
        return "is required" + (f" ({described})" if described else "")
    if error["type"] in SHAPE_ERRORS and described:
        reason = f"must be {described}"
    elif error["type"] in ("model_type", "dict_type", "model_attributes_type"):
        reason = "must be an object"
    elif error["type"] == "value_error":  # ours: the message says what is wrong with the value
        return error["msg"].removeprefix("Value error, ")
    else:
        reason = error["msg"].replace("Input should be", "must be")
    shown = repr(error["input"])
    return f"{reason}, got {shown if len(shown) <= 60 else shown[:57] + '...'}"


def refusal(exc: ValidationError) -> ApiError:
    """The first error of a validation, as OpenAI's 400 naming its field."""
    error = exc.errors(include_url=False)[0]
    param = field_name(error["loc"]) or None
    return ApiError(400, f"{param or 'the body'}: {error_message(error)}", param=param, code="invalid_value")


def validate(kind: type[Generation], body: dict, vocabulary: int | None = None) -> Any:
    """`body` (parsed JSON) as a `kind` request, or the ApiError that names the first bad field."""
    try:
        return kind.model_validate(body, context={"vocabulary": vocabulary})
    except ValidationError as exc:
        raise refusal(exc) from None
