"""A generation request's shape: its result, the streaming callback, where it stops, and the one check of its size."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .errors import UserError

TokenCallback = Callable[[list[int]], None]


@dataclass
class GenerationResult:
    token_ids: list[int]
    stats: dict = field(default_factory=dict)


def check_request(context_tokens: int, max_new_tokens: int, limit: int, what: str = "prompt") -> None:
    """The one validation of a request (CLI, chat, Session): new tokens positive, a non-empty context,
    and the whole within `limit` tokens (the model's context, or a fixed cache's planned size)."""
    if max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if context_tokens == 0:
        raise UserError("the prompt is empty")
    if context_tokens + max_new_tokens > limit:
        raise UserError(f"{what} of {context_tokens} tokens + {max_new_tokens} new tokens exceeds the model's "
                        f"context of {limit} tokens (max_position_embeddings) by "
                        f"{context_tokens + max_new_tokens - limit}")


def stop_index(tokens: list[int], eos_ids: list[int], budget: int) -> int:
    """How many of `tokens` to emit: up to and including the first EOS, at most `budget`."""
    for i, t in enumerate(tokens[:budget]):
        if t in eos_ids:
            return i + 1
    return min(len(tokens), budget)
