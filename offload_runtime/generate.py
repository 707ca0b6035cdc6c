"""Autoregressive decoding over the full cache: the baseline and the reference for the engine."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .caches.base import KVCache
from .caches.full import FullCache
from .model import CausalLM
from .sampling import SamplingParams, probabilities, sample
from .tp import agree_int

TokenCallback = Callable[[list[int]], None]


@dataclass
class GenerationResult:
    token_ids: list[int]
    stats: dict = field(default_factory=dict)


def check_request(model: CausalLM, prompt_len: int, max_new_tokens: int) -> None:
    from .errors import UserError

    if max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if prompt_len == 0:
        raise UserError("the prompt is empty")
    limit = model.cfg.max_position_embeddings
    if prompt_len + max_new_tokens > limit:
        raise UserError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's "
            f"context of {limit} tokens (max_position_embeddings)"
        )


def stop_index(tokens: list[int], eos_ids: list[int], budget: int) -> int:
    """How many of `tokens` to emit: up to and including the first EOS, at most `budget`."""
    for i, t in enumerate(tokens[:budget]):
        if t in eos_ids:
            return i + 1
    return min(len(tokens), budget)


def generate_autoregressive(
    model: CausalLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    eos_ids: list[int],
    generator: torch.Generator | None = None,
    cache: KVCache | None = None,
    on_tokens: TokenCallback | None = None,
    full_cache: Callable[[int], KVCache] | None = None,
    layer_major: bool | None = None,
    link_gbps: float | None = None,
) -> GenerationResult:
    """One target forward per token over the full cache (EOS included in the output, as transformers does).
    cache, or full_cache (a factory for a capacity): the cache to use, e.g. an OffloadedCache;
    layer_major: prefill layer by layer (default: when the cache is offloaded)."""
    from .caches.offloaded import OffloadedCache
    from .prefill import prefill

    check_request(model, len(prompt_ids), max_new_tokens)
    if cache is None:
        capacity = len(prompt_ids) + max_new_tokens
        cache = full_cache(capacity) if full_cache else FullCache(model.cfg, model.device, model.dtype, capacity=capacity)
    t0 = time.perf_counter()
    logits = prefill(model, prompt_ids, cache, None, layer_major)
    if model.device.type == "cuda":
        torch.cuda.synchronize()  # the prefill's time, not its launch's
    t_prefill = time.perf_counter() - t0
    out: list[int] = []
    t1 = time.perf_counter()
    while True:
        token = agree_int(int(sample(probabilities(logits[-1], params), generator)))  # rank 0's token under TP
        out.append(token)
        if on_tokens:
            on_tokens([token])
        if token in eos_ids or len(out) >= max_new_tokens:
            break
        logits = model(torch.tensor([token], device=model.device), cache)
    t_decode = time.perf_counter() - t1
    stats = {
        "mode": "autoregressive",
        "prompt_tokens": len(prompt_ids),
        "new_tokens": len(out),
        "prefill_s": t_prefill,
        "prefilled_tokens": len(prompt_ids),
        "decode_s": t_decode,
        "decode_tokens_per_s": len(out) / t_decode if t_decode > 0 else None,
        "target_forwards": len(out),
    }
    if isinstance(cache, OffloadedCache):
        stats.update(cache.report(len(out), t_decode, link_gbps))
    return GenerationResult(out, stats)
