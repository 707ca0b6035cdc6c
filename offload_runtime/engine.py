"""Round orchestration of TriForce: L1 drafts for L2, L2 drafts for L3, one L3 pass verifies.

Levels (see DESIGN.md): L1 = draft model + StreamingLLM cache; L2 = target weights +
retrieval cache; L3 = target weights + full cache. Without a draft model the hierarchy
has two levels (L2 drafts for L3). Every acceptance decision goes through
`speculative.verify`, so each level is lossless and the output has the target's
distribution (at temperature 0: exactly the target's greedy tokens).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from .caches.full import FullCache
from .caches.retrieval import RetrievalCache
from .caches.streaming import StreamingCache
from .errors import UserError
from .generate import GenerationResult, TokenCallback, check_request, stop_index
from .model import CausalLM
from .sampling import SamplingParams, probabilities, sample
from .speculative import verify
from .tp import agree_int, agree_ints


@dataclass(frozen=True)
class EngineSettings:
    budget: int = 4096  # retrieval-cache tokens (L2)
    chunk_size: int = 8
    gamma: int = 6  # L2 tokens per L3 pass
    draft_gamma: int = 4  # L1 tokens per L2 check
    sinks: int = 16  # StreamingLLM sinks (L1)
    window: int = 256  # StreamingLLM total cache rows (L1)
    refresh_every: int = 0  # rebuild the retrieval selection every N L3 passes (0: never)

    def __post_init__(self) -> None:
        if self.chunk_size <= 0:
            raise UserError(f"--chunk-size must be positive, got {self.chunk_size}")
        if self.gamma <= 0 or self.draft_gamma <= 0:
            raise UserError(f"--gamma and --draft-gamma must be positive, got {self.gamma}, {self.draft_gamma}")
        if self.budget < 2 * self.chunk_size:
            raise UserError(f"--budget {self.budget} must hold at least 2 chunks of --chunk-size {self.chunk_size}")
        if self.window - self.sinks <= 2 * (self.gamma + self.draft_gamma):
            raise UserError(f"--window {self.window} minus --sinks {self.sinks} must exceed "
                            f"2 x (gamma + draft-gamma) = {2 * (self.gamma + self.draft_gamma)}")


def check_same_vocabulary(target: Any, draft: Any) -> None:
    """Draft and target must share token ids: compare vocab sizes and a sample of token strings."""
    tv, dv = target.model.cfg.vocab_size, draft.model.cfg.vocab_size
    tt, dt = target.tokenizer, draft.tokenizer
    if len(tt) != len(dt):
        raise UserError(f"draft tokenizer has {len(dt)} tokens, target's has {len(tt)}: vocabularies differ")
    n = min(len(tt), tv, dv)
    step = max(1, n // 512)
    sample_ids = list(range(0, n, step))
    if tt.convert_ids_to_tokens(sample_ids) != dt.convert_ids_to_tokens(sample_ids):
        raise UserError("draft and target tokenizers map the same ids to different tokens: vocabularies differ")
    if abs(tv - dv) > 0 and min(tv, dv) < len(tt):
        raise UserError(f"draft vocab_size {dv} and target vocab_size {tv} do not both cover the tokenizer")


class Stats:
    def __init__(self) -> None:
        self.l3_passes = self.l3_proposed = self.l3_accepted = self.emitted_in_rounds = 0
        self.l2_forwards = self.l1_forwards = self.l1_proposed = self.l1_accepted = 0
        self.time = {"l1": 0.0, "l2": 0.0, "l3": 0.0}

    def as_dict(self) -> dict:
        return {
            "l3_passes": self.l3_passes,
            "mean_accepted_per_pass": self.emitted_in_rounds / self.l3_passes if self.l3_passes else None,
            "l3_acceptance_of_l2": self.l3_accepted / self.l3_proposed if self.l3_proposed else None,
            "l2_acceptance_of_l1": self.l1_accepted / self.l1_proposed if self.l1_proposed else None,
            "l2_forwards": self.l2_forwards,
            "l1_forwards": self.l1_forwards,
            "time_l1_s": self.time["l1"], "time_l2_s": self.time["l2"], "time_l3_s": self.time["l3"],
        }


class _Timer:
    def __init__(self, stats: Stats, level: str) -> None:
        self.stats, self.level = stats, level

    def __enter__(self) -> None:
        self.t = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.stats.time[self.level] += time.perf_counter() - self.t


class DraftLevel:
    """L1: the draft model over a StreamingLLM cache, kept in step with the committed tokens."""

    def __init__(self, model: CausalLM, settings: EngineSettings, params: SamplingParams,
                 generator: torch.Generator | None, stats: Stats) -> None:
        self.model, self.settings, self.params, self.generator, self.stats = model, settings, params, generator, stats
        self.cache = StreamingCache(model.cfg, model.device, model.dtype, settings.sinks, settings.window, model.rope)
        self.consumed: list[int] = []  # tokens after the prompt the cache holds, in order

    def _forward(self, tokens: list[int]) -> torch.Tensor:
        logits = self.model(torch.tensor(tokens, device=self.model.device), self.cache)
        self.stats.l1_forwards += 1
        return logits

    def prefill(self, prompt: list[int]) -> None:
        s, w = self.settings.sinks, self.settings.window
        # StreamingLLM keeps only sinks + a recent window: feed exactly those tokens.
        self._forward(prompt if len(prompt) <= w else prompt[:s] + prompt[-(w - s):])
        self.cache.evict()
        self.consumed = []

    def propose(self, sequence: list[int], k: int) -> tuple[list[int], torch.Tensor]:
        """k draft tokens continuing `sequence` (generated tokens so far) and their distributions [k, V]."""
        common = 0
        limit = min(len(self.consumed), len(sequence) - 1)  # the last token must be fed to get a distribution
        while common < limit and self.consumed[common] == sequence[common]:
            common += 1
        drop = len(self.consumed) - common
        if self.cache.evicted and drop > self.cache.length - self.settings.sinks:
            raise RuntimeError("draft rollback beyond its window")  # prevented by EngineSettings' check
        self.cache.truncate(self.cache.length - drop)
        self.consumed = self.consumed[:common]
        feed = sequence[common:]
        tokens, dists = [], []
        for _ in range(k):
            logits = self._forward(feed)
            self.consumed.extend(feed)
            dist = probabilities(logits[-1], self.params)
            tok = agree_int(int(sample(dist, self.generator)))
            tokens.append(tok)
            dists.append(dist)
            feed = [tok]
        self.cache.evict()
        return tokens, torch.stack(dists)


def generate_triforce(
    target: CausalLM,
    draft: CausalLM | None,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    eos_ids: list[int],
    settings: EngineSettings = EngineSettings(),
    generator: torch.Generator | None = None,
    on_tokens: TokenCallback | None = None,
) -> GenerationResult:
    check_request(target, len(prompt_ids), max_new_tokens)
    stats = Stats()
    dev = target.device
    n_prompt = len(prompt_ids)
    t0 = time.perf_counter()
    full = FullCache(target.cfg, dev, target.dtype, capacity=n_prompt + max_new_tokens + settings.gamma + 1)
    logits = target(torch.tensor(prompt_ids, device=dev), full, last_only=True)
    retrieval = RetrievalCache(target.cfg, dev, target.dtype, settings.budget, settings.chunk_size)
    retrieval.build(full, n_prompt, [q[:, -1] for q in full.recent_queries])
    l1 = DraftLevel(draft, settings, params, generator, stats) if draft is not None else None
    if l1:
        l1.prefill(prompt_ids)
    t_prefill = time.perf_counter() - t0

    t1 = time.perf_counter()
    # Under tensor parallelism every decision is rank 0's (tp.agree_int/agree_ints), so all ranks stay in step.
    out = [agree_int(int(sample(probabilities(logits[-1], params), generator)))]
    if on_tokens:
        on_tokens(out[:])
    while out[-1] not in eos_ids and len(out) < max_new_tokens:
        gamma = min(settings.gamma, max_new_tokens - len(out) - 1)
        base = full.length  # == retrieval.length: every committed token but out[-1]
        with _Timer(stats, "l2"):
            drafted, q = _draft_l2(target, retrieval, l1, out, gamma, params, generator, stats)
        with _Timer(stats, "l3"):
            p = probabilities(target(torch.tensor([out[-1]] + drafted, device=dev), full), params)
            n, nxt = agree_ints(verify(drafted, q, p, generator))
        stats.l3_passes += 1
        stats.l3_proposed += len(drafted)
        stats.l3_accepted += n
        full.truncate(base + 1 + n)
        retrieval.write_rows(full, base, base + 1 + n)  # the L3 pass computed the true K/V of these rows
        if settings.refresh_every and stats.l3_passes % settings.refresh_every == 0:
            retrieval.build(full, n_prompt, [q_rows[:, n] for q_rows in full.recent_queries])
        block = drafted[:n] + [nxt]
        take = stop_index(block, eos_ids, max_new_tokens - len(out))
        stats.emitted_in_rounds += len(block)
        out.extend(block[:take])
        if on_tokens:
            on_tokens(block[:take])
    t_decode = time.perf_counter() - t1
    result = {
        "mode": "triforce",
        "levels": 3 if draft is not None else 2,
        "prompt_tokens": n_prompt,
        "new_tokens": len(out),
        "prefill_s": t_prefill,
        "decode_s": t_decode,
        "decode_tokens_per_s": len(out) / t_decode if t_decode > 0 else None,
        "retrieval_rows": retrieval.selected,
        "draft_evicted_rows": l1.cache.evicted if l1 else 0,
    }
    result.update(stats.as_dict())
    return GenerationResult(out, result)


def _draft_l2(target: CausalLM, retrieval: RetrievalCache, l1: DraftLevel | None, out: list[int], gamma: int,
              params: SamplingParams, generator: torch.Generator | None, stats: Stats) -> tuple[list[int], torch.Tensor]:
    """gamma tokens sampled (losslessly) from L2 and L2's distribution at each, [gamma, V]."""
    dev = target.device
    tokens: list[int] = []
    dists: list[torch.Tensor] = []
    last = out[-1]  # next token to feed L2; the retrieval cache holds everything before it
    while len(tokens) < gamma:
        if l1 is None:
            logits = target(torch.tensor([last], device=dev), retrieval)
            stats.l2_forwards += 1
            dist = probabilities(logits[-1], params)
            last = agree_int(int(sample(dist, generator)))
            tokens.append(last)
            dists.append(dist)
            continue
        with _Timer(stats, "l1"):
            proposals, q1 = l1.propose(out + tokens, min(l1.settings.draft_gamma, gamma - len(tokens)))
        start = retrieval.length
        q2 = probabilities(target(torch.tensor([last] + proposals, device=dev), retrieval), params)
        stats.l2_forwards += 1
        m, nxt = agree_ints(verify(proposals, q1, q2, generator))
        stats.l1_proposed += len(proposals)
        stats.l1_accepted += m
        retrieval.truncate(start + 1 + m)
        tokens.extend(proposals[:m] + [nxt])
        dists.extend(q2[: m + 1])
        last = nxt
    return tokens[:gamma], torch.stack(dists[:gamma]) if dists else torch.empty(0, target.cfg.vocab_size, device=dev)
