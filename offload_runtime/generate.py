"""Single-shot generation: one prompt, one answer, through a Session (the same decode loop as chat).

`generate_autoregressive` (one target forward per token over the full cache) is the
baseline and the engine's reference; `generate_triforce` is the speculative engine.
Both take an optional built L3 cache (e.g. an OffloadedCache); without one, an on-device
FullCache sized for the request.
"""
from __future__ import annotations

import torch

from .caches.base import FullKVCache
from .model import CausalLM
from .request import GenerationResult, TokenCallback, check_request, stop_index
from .sampling import SamplingParams
from .session import Session
from .settings import EngineSettings

__all__ = ["generate_autoregressive", "generate_triforce", "GenerationResult", "TokenCallback", "check_request",
           "stop_index"]


def generate_autoregressive(model: CausalLM, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                            eos_ids: list[int], generator: torch.Generator | None = None,
                            cache: FullKVCache | None = None, on_tokens: TokenCallback | None = None) -> GenerationResult:
    """One target forward per token over the full cache (EOS included in the output, as transformers does)."""
    return _single_shot(model, None, prompt_ids, max_new_tokens, params, eos_ids, EngineSettings(), generator,
                        on_tokens, cache, "autoregressive")


def generate_triforce(target: CausalLM, draft: CausalLM | None, prompt_ids: list[int], max_new_tokens: int,
                      params: SamplingParams, eos_ids: list[int], settings: EngineSettings = EngineSettings(),
                      generator: torch.Generator | None = None, on_tokens: TokenCallback | None = None,
                      cache: FullKVCache | None = None) -> GenerationResult:
    """Single-shot TriForce generation for one prompt (draft None: two levels)."""
    return _single_shot(target, draft, prompt_ids, max_new_tokens, params, eos_ids, settings, generator,
                        on_tokens, cache, "triforce")


def answer_capacity(prompt_tokens: int, max_new_tokens: int, settings: EngineSettings, mode: str) -> int:
    """Rows a full cache needs for one answer: the prompt, the answer, and in TriForce mode the gamma + 1
    rows an L3 pass writes past it."""
    return prompt_tokens + max_new_tokens + (settings.max_gamma + 1 if mode == "triforce" else 0)


def answer(session: Session, prompt_ids: list[int], max_new_tokens: int,
           on_tokens: TokenCallback | None = None) -> GenerationResult:
    """The one single-shot path (these functions and the CLI's run alike): prefill the prompt, generate."""
    session.extend(prompt_ids)
    return session.generate(max_new_tokens, on_tokens)


def _single_shot(target: CausalLM, draft: CausalLM | None, prompt_ids: list[int], max_new_tokens: int,
                 params: SamplingParams, eos_ids: list[int], settings: EngineSettings,
                 generator: torch.Generator | None, on_tokens: TokenCallback | None, cache: FullKVCache | None,
                 mode: str) -> GenerationResult:
    check_request(len(prompt_ids), max_new_tokens, target.cfg.max_position_embeddings)
    session = Session(target, draft, params, eos_ids, settings, generator, mode, cache=cache,
                      capacity=answer_capacity(len(prompt_ids), max_new_tokens, settings, mode))
    return answer(session, prompt_ids, max_new_tokens, on_tokens)
