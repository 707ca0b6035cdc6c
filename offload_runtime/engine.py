"""Round orchestration of TriForce: L1 drafts for L2, L2 drafts for L3, one L3 pass verifies.

Levels (see DESIGN.md): L1 = draft model + StreamingLLM cache; L2 = target weights +
retrieval cache; L3 = target weights + full cache. Without a draft model the hierarchy
has two levels (L2 drafts for L3). Every acceptance decision goes through
`speculative.verify`, so each level is lossless and the output has the target's
distribution (at temperature 0: exactly the target's greedy tokens).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from .caches.base import KVCache
from .caches.full import RECENT_QUERIES, FullCache
from .caches.offloaded import OffloadedCache
from .caches.retrieval import RetrievalCache
from .caches.streaming import StreamingCache
from .errors import UserError
from .generate import GenerationResult, TokenCallback, check_request, stop_index
from .model import CausalLM
from .prefill import PREFILL_CHUNK, prefill_layer_major
from .sampling import SamplingParams, probabilities, sample
from .speculative import verify
from .tp import agree_int, agree_ints

ProgressCallback = Callable[[int, int], None]  # (tokens done, tokens total)
REFRESH_WINDOW = 4  # L3 passes the acceptance-triggered re-retrieval averages over


@dataclass(frozen=True)
class EngineSettings:
    budget: int = 4096  # retrieval-cache tokens (L2)
    chunk_size: int = 8
    gamma: int = 6  # L2 tokens per L3 pass
    draft_gamma: int = 4  # L1 tokens per L2 check
    sinks: int = 16  # StreamingLLM sinks (L1)
    window: int = 256  # StreamingLLM total cache rows (L1)
    refresh_every: int = 0  # rebuild the retrieval selection every N L3 passes (0: never)
    refresh_below: float = 0.0  # ... or when L3's acceptance of L2 over the last REFRESH_WINDOW passes is below this

    def __post_init__(self) -> None:
        if self.refresh_every < 0 or not 0 <= self.refresh_below <= 1:
            raise UserError(f"--refresh-every must be >= 0 and --refresh-below in [0, 1], got "
                            f"{self.refresh_every}, {self.refresh_below}")
        if self.chunk_size <= 0:
            raise UserError(f"--chunk-size must be positive, got {self.chunk_size}")
        if self.gamma <= 0 or self.draft_gamma <= 0:
            raise UserError(f"--gamma and --draft-gamma must be positive, got {self.gamma}, {self.draft_gamma}")
        if self.gamma >= RECENT_QUERIES:  # an L3 pass's query rows are kept for re-retrieval
            raise UserError(f"--gamma must be below {RECENT_QUERIES}, got {self.gamma}")
        if self.budget < 2 * self.chunk_size:
            raise UserError(f"--budget {self.budget} must hold at least 2 chunks of --chunk-size {self.chunk_size}")

    def check_draft(self) -> None:
        """The draft's StreamingLLM cache must hold a round's rollback (only checked when there is a draft)."""
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


class Stats:
    def __init__(self) -> None:
        self.l3_passes = self.l3_proposed = self.l3_accepted = self.emitted_in_rounds = 0
        self.l2_forwards = self.l1_forwards = self.l1_proposed = self.l1_accepted = 0
        self.prefilled_tokens = self.prefills = self.retrieval_builds = 0
        self.time = {"l1": 0.0, "l2": 0.0, "l3": 0.0, "prefill": 0.0}

    def as_dict(self) -> dict:
        return {
            "l3_passes": self.l3_passes,
            "mean_accepted_per_pass": self.emitted_in_rounds / self.l3_passes if self.l3_passes else None,
            "l3_acceptance_of_l2": self.l3_accepted / self.l3_proposed if self.l3_proposed else None,
            "l2_acceptance_of_l1": self.l1_accepted / self.l1_proposed if self.l1_proposed else None,
            "l2_forwards": self.l2_forwards,
            "l1_forwards": self.l1_forwards,
            "time_l1_s": self.time["l1"], "time_l2_s": self.time["l2"], "time_l3_s": self.time["l3"],
            "prefilled_tokens": self.prefilled_tokens,
            "prefills": self.prefills,
            "retrieval_builds": self.retrieval_builds,
        }


class _Timer:
    def __init__(self, stats: Stats, level: str) -> None:
        self.stats, self.level = stats, level

    def __enter__(self) -> None:
        self.t = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.stats.time[self.level] += time.perf_counter() - self.t


class DraftLevel:
    """L1: the draft model over a StreamingLLM cache, kept in step with the context.

    `consumed` lists the context tokens after `base` that the cache holds; everything
    before `base` was fed at (re-)prefill. Rollback is a truncation of the newest rows.
    """

    def __init__(self, model: CausalLM, settings: EngineSettings, params: SamplingParams,
                 generator: torch.Generator | None, stats: Stats, target_vocab: int | None = None) -> None:
        settings.check_draft()
        self.model, self.settings, self.params, self.generator, self.stats = model, settings, params, generator, stats
        self.target_vocab = target_vocab or model.cfg.vocab_size
        self.cache = StreamingCache(model.cfg, model.device, model.dtype, settings.sinks, settings.window, model.rope)
        self.base = 0
        self.consumed: list[int] = []

    def _forward(self, tokens: list[int]) -> torch.Tensor:
        logits = self.model(torch.tensor(tokens, device=self.model.device), self.cache)
        self.stats.l1_forwards += 1
        return logits

    def _fit_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft and target may pad their vocabularies differently: propose over the target's ids only."""
        v = self.target_vocab
        if logits.shape[-1] > v:
            return logits[..., :v]
        if logits.shape[-1] < v:
            return torch.nn.functional.pad(logits, (0, v - logits.shape[-1]), value=float("-inf"))
        return logits

    def reset(self, context: list[int]) -> None:
        """Feed context[:-1] as StreamingLLM keeps it: the sink tokens and the most recent window."""
        s, w = self.settings.sinks, self.settings.window
        head = context[:-1]
        self.cache.truncate(0)
        if head:
            self._forward(head if len(head) <= w else head[:s] + head[-(w - s):])
            self.cache.evict()
        self.base, self.consumed = len(head), []

    def propose(self, context: list[int], k: int) -> tuple[list[int], torch.Tensor]:
        """k draft tokens continuing `context` and their distributions [k, V]."""
        tail = context[self.base:]
        if not tail:  # (only after a context shrink) re-prefill
            self.reset(context)
            tail = context[self.base:]
        # Committed tokens never change (a shrinking context resets the draft), so only the speculative
        # tail of `consumed` can differ from the context: compare from there.
        common = max(0, len(self.consumed) - 2 * (self.settings.gamma + self.settings.draft_gamma + 1))
        limit = min(len(self.consumed), len(tail) - 1)  # the last token must be fed to get a distribution
        common = min(common, limit)
        while common < limit and self.consumed[common] == tail[common]:
            common += 1
        drop = len(self.consumed) - common
        if drop and self.cache.evicted and drop > self.cache.length - self.settings.sinks:
            self.reset(context)  # the rows to roll back were evicted: start again from the context
            return self.propose(context, k)
        self.cache.truncate(self.cache.length - drop)
        self.consumed = self.consumed[:common]
        feed = tail[common:]
        if len(feed) > self.settings.window - self.settings.sinks:  # a long new turn: cheaper to re-prefill
            self.reset(context)
            feed = context[self.base:]
        tokens, dists = [], []
        for _ in range(k):
            logits = self._forward(feed)
            self.consumed.extend(feed)
            dist = probabilities(self._fit_vocab(logits[-1]), self.params)
            tok = agree_int(int(sample(dist, self.generator)))
            tokens.append(tok)
            dists.append(dist)
            feed = [tok]
        self.cache.evict()
        return tokens, torch.stack(dists)


class Session:
    """The caches of one growing context (a prompt, or a whole conversation).

    `context` is the truth: every token of the conversation. The full cache holds a
    prefix of it (all but the newest token after a generation); `extend` appends tokens
    (a new question), `generate` continues the context. Ctrl-C (KeyboardInterrupt) inside
    either leaves the session consistent: the caches are cut back to what they hold of
    the context, and the next call catches up.
    """

    def __init__(self, target: CausalLM, draft: CausalLM | None, params: SamplingParams, eos_ids: list[int],
                 settings: EngineSettings = EngineSettings(), generator: torch.Generator | None = None,
                 mode: Literal["triforce", "autoregressive"] = "triforce", capacity: int = 0,
                 progress: ProgressCallback | None = None, full_cache: Callable[[int], KVCache] | None = None,
                 layer_major: bool | None = None, link_gbps: float | None = None) -> None:
        """full_cache: factory of the L3 cache for a capacity (default FullCache, which grows; an
        OffloadedCache is host-resident and fixed). layer_major: prefill layer by layer (default:
        when the cache is offloaded). link_gbps: the measured link, for the reports."""
        self.target, self.params, self.eos_ids, self.settings = target, params, eos_ids, settings
        self.generator, self.mode, self.progress = generator, mode, progress
        self.stats = Stats()
        self.context: list[int] = []
        self.full = full_cache(capacity) if full_cache else FullCache(target.cfg, target.device, target.dtype,
                                                                      capacity=capacity)
        self.offloaded = isinstance(self.full, OffloadedCache)
        self.layer_major = self.offloaded if layer_major is None else layer_major
        self.link_gbps = link_gbps
        self.retrieval = RetrievalCache(target.cfg, target.device, target.dtype, settings.budget, settings.chunk_size) \
            if mode == "triforce" else None
        self.l1 = DraftLevel(draft, settings, params, generator, self.stats, target.cfg.vocab_size) \
            if draft is not None and mode == "triforce" else None
        self._logits: torch.Tensor | None = None  # target logits after the last cached token
        self._reselect = True  # rebuild the retrieval selection at the next catch-up (new question)
        self._mark = self._snapshot()  # counters at the end of the previous answer
        self._recent: deque[float] = deque(maxlen=REFRESH_WINDOW)  # L3 acceptance of L2, last passes

    def _snapshot(self) -> dict:
        return dict(vars(self.stats), time=dict(self.stats.time))

    def use(self, mode: Literal["triforce", "autoregressive"], draft: CausalLM | None = None) -> None:
        """Switch how the next answers are generated; the caches stay (a benchmark prefills once)."""
        t = self.target
        self.mode = mode
        if mode == "autoregressive":
            self.retrieval = None  # no L2 work while decoding autoregressively
        if mode == "triforce" and self.retrieval is None:
            self.retrieval = RetrievalCache(t.cfg, t.device, t.dtype, self.settings.budget, self.settings.chunk_size)
            self._reselect = True  # built from the full cache at the next catch-up
        self.l1 = DraftLevel(draft, self.settings, self.params, self.generator, self.stats, t.cfg.vocab_size) \
            if draft is not None and mode == "triforce" else None

    @property
    def max_context(self) -> int:
        """Tokens this session can hold: the model's context, or the planned size of a fixed cache."""
        limit = self.target.cfg.max_position_embeddings
        return min(limit, self.full.capacity) if self.offloaded else limit

    def extend(self, tokens: list[int]) -> None:
        """Append tokens (a prompt or a new turn) and prefill them now."""
        self.context.extend(tokens)
        self._reselect = True
        self._catch_up()

    def truncate(self, length: int) -> None:
        """Drop the context after `length` tokens (e.g. /reset back to the document)."""
        self.context = self.context[:length]
        self.full.truncate(min(self.full.length, max(len(self.context) - 1, 0)))
        self._logits = None
        self._reselect = True
        if self.l1 is not None:
            self.l1.reset(self.context)

    def _catch_up(self) -> None:
        """Feed the context tokens the full cache lacks; bring L2 in line (a new selection after a
        new question or a mode switch, else the new rows). A no-op when everything is in step."""
        if self._logits is None and self.full.length >= len(self.context) > 0:
            self.full.truncate(len(self.context) - 1)  # (after an interruption) refeed the newest token for its logits
        todo = self.context[self.full.length:]
        l2 = self.retrieval
        reselect = l2 is not None and (self._reselect or l2.length < l2.base)
        built = False
        if todo:
            dev = self.target.device
            transfers = self.full.transfer_stats() if self.offloaded else None
            t0 = time.perf_counter()
            done = 0
            try:
                if self.layer_major:  # each layer's K/V crosses the link once; the selection is built on the way
                    self._logits = prefill_layer_major(self.target, torch.tensor(todo, device=dev), self.full,
                                                       l2 if reselect else None)[-1]
                    done, built = len(todo), reselect
                else:
                    for start in range(0, len(todo), PREFILL_CHUNK):
                        chunk = todo[start:start + PREFILL_CHUNK]
                        self._logits = self.target(torch.tensor(chunk, device=dev), self.full, last_only=True)[-1]
                        done += len(chunk)
                        if self.progress:
                            self.progress(done, len(todo))
            except BaseException:
                self._logits = None
                raise
            finally:
                if dev.type == "cuda":
                    torch.cuda.synchronize()  # the prefill's time, not its launch's
                self.stats.prefilled_tokens += done
                self.stats.prefills += 1
                self.stats.time["prefill"] += time.perf_counter() - t0
            if self.offloaded:  # this prefill's bytes are reported apart from the decode's
                self.full.mark_prefill_done(since=transfers)
        assert self._logits is not None, "the logits of the newest context token are known after a catch-up"
        if l2 is None:
            return
        if reselect:
            if not built:
                l2.build(self.full, self.full.length, [q[:, -1] for q in self.full.recent_queries])
            self.stats.retrieval_builds += 1
            self._reselect = False
            self._recent.clear()  # the acceptance of the previous selection says nothing of this one
        elif l2.length != self.full.length:
            l2.write_rows(self.full, min(l2.length, self.full.length), self.full.length)

    def _restore(self) -> None:
        """After an interruption: keep only cache rows that match committed context tokens."""
        self.full.truncate(min(self.full.length, max(len(self.context) - 1, 0)))
        self._logits = None
        if self.retrieval is not None:
            self._reselect = True
        if self.l1 is not None:
            self.l1.reset(self.context)

    def generate(self, max_new_tokens: int, on_tokens: TokenCallback | None = None) -> GenerationResult:
        """Continue the context by up to max_new_tokens (stopping after an EOS id)."""
        from .errors import UserError

        if max_new_tokens <= 0:
            raise UserError(f"--max-new-tokens must be positive, got {max_new_tokens}")
        if not self.context:
            raise UserError("the prompt is empty")
        if len(self.context) + max_new_tokens > self.max_context:
            raise UserError(f"context of {len(self.context)} tokens + {max_new_tokens} new tokens exceeds the model's "
                            f"context of {self.max_context} tokens (max_position_embeddings) by "
                            f"{len(self.context) + max_new_tokens - self.max_context}")
        out: list[int] = []
        try:
            self._catch_up()  # the newest context token's logits, L2 in step
            t1 = time.perf_counter()
            # Under tensor parallelism every decision is rank 0's (tp.agree_int/agree_ints): ranks stay in step.
            first = agree_int(int(sample(probabilities(self._logits, self.params), self.generator)))
            self._emit([first], out, on_tokens, max_new_tokens)
            while out[-1] not in self.eos_ids and len(out) < max_new_tokens:
                if self.mode == "autoregressive":
                    self._autoregressive_step(out, on_tokens, max_new_tokens)
                else:
                    self._round(out, on_tokens, max_new_tokens)
        except KeyboardInterrupt:
            self._restore()
            self._mark = self._snapshot()  # the next answer's statistics start here
            raise
        finally:
            if self.full.length != len(self.context):  # the newest token is not in the cache: no logits yet
                self._logits = None
        before, self._mark = self._mark, self._snapshot()
        return GenerationResult(out, self._result_stats(before, out, t1))

    def _emit(self, block: list[int], out: list[int], on_tokens: TokenCallback | None, max_new: int) -> None:
        take = block[: stop_index(block, self.eos_ids, max_new - len(out))]
        self.context.extend(take)
        out.extend(take)
        if on_tokens:
            on_tokens(take)

    def _autoregressive_step(self, out: list[int], on_tokens: TokenCallback | None, max_new: int) -> None:
        with _Timer(self.stats, "l3"):
            logits = self.target(torch.tensor(out[-1:], device=self.target.device), self.full)
        self.stats.l3_passes += 1
        self.stats.emitted_in_rounds += 1
        token = agree_int(int(sample(probabilities(logits[-1], self.params), self.generator)))
        self._emit([token], out, on_tokens, max_new)

    def _round(self, out: list[int], on_tokens: TokenCallback | None, max_new: int) -> None:
        """One TriForce round: L2 (helped by L1) drafts gamma tokens, one L3 pass verifies them."""
        assert self.retrieval is not None
        gamma = min(self.settings.gamma, max_new - len(out) - 1)
        base = self.full.length  # == retrieval.length: every context token but the newest
        with _Timer(self.stats, "l2"):
            drafted, q = self._draft_l2(gamma)
        with _Timer(self.stats, "l3"):
            tokens = torch.tensor(self.context[-1:] + drafted, device=self.target.device)
            p = probabilities(self.target(tokens, self.full), self.params)
            n, nxt = agree_ints(verify(drafted, q, p, self.generator))
        block = drafted[:n] + [nxt]
        take = block[: stop_index(block, self.eos_ids, max_new - len(out))]  # an EOS ends the answer there
        keep = base + len(take)  # rows: the newest context token, then every emitted token but the last
        self.stats.l3_passes += 1
        self.stats.l3_proposed += len(drafted)
        self.stats.l3_accepted += n
        self.stats.emitted_in_rounds += len(take)
        self.full.truncate(keep)
        self.retrieval.write_rows(self.full, base, keep)  # the L3 pass computed the true K/V of these rows
        if self._should_refresh(n, len(drafted)):
            # the query of the last kept row; recent_queries holds the pass's last rows, so index from the end
            last = len(take) - 1 - (len(drafted) + 1)
            self.retrieval.build(self.full, keep, [rows[:, last] for rows in self.full.recent_queries])
            self.stats.retrieval_builds += 1
        self._emit(take, out, on_tokens, max_new)

    def _should_refresh(self, accepted: int, proposed: int) -> bool:
        """The re-retrieval policy: every `refresh_every` passes, or when L3 has lately accepted
        too little of what L2 proposed (`refresh_below`). Off by default."""
        s = self.settings
        if s.refresh_every and self.stats.l3_passes % s.refresh_every == 0:
            self._recent.clear()
            return True
        if s.refresh_below and proposed:
            self._recent.append(accepted / proposed)
            if len(self._recent) == REFRESH_WINDOW and sum(self._recent) / REFRESH_WINDOW < s.refresh_below:
                self._recent.clear()
                return True
        return False

    def _draft_l2(self, gamma: int) -> tuple[list[int], torch.Tensor]:
        """gamma tokens sampled (losslessly) from L2, and L2's distribution at each, [gamma, V]."""
        retrieval, dev = self.retrieval, self.target.device
        tokens: list[int] = []
        dists: list[torch.Tensor] = []
        last = self.context[-1]  # next token to feed L2; the retrieval cache holds everything before it
        while len(tokens) < gamma:
            if self.l1 is None:
                logits = self.target(torch.tensor([last], device=dev), retrieval)
                self.stats.l2_forwards += 1
                dist = probabilities(logits[-1], self.params)
                last = agree_int(int(sample(dist, self.generator)))
                tokens.append(last)
                dists.append(dist)
                continue
            with _Timer(self.stats, "l1"):
                proposals, q1 = self.l1.propose(self.context + tokens, min(self.settings.draft_gamma, gamma - len(tokens)))
            start = retrieval.length
            q2 = probabilities(self.target(torch.tensor([last] + proposals, device=dev), retrieval), self.params)
            self.stats.l2_forwards += 1
            m, nxt = agree_ints(verify(proposals, q1, q2, self.generator))
            self.stats.l1_proposed += len(proposals)
            self.stats.l1_accepted += m
            retrieval.truncate(start + 1 + m)
            tokens.extend(proposals[:m] + [nxt])
            dists.extend(q2[: m + 1])
            last = nxt
        if not dists:
            return [], torch.empty(0, self.target.cfg.vocab_size, device=dev)
        return tokens[:gamma], torch.stack(dists[:gamma])

    def _result_stats(self, before: dict, out: list[int], t1: float) -> dict:
        """Statistics of this answer, its prefill included (counters are differences against `before`)."""
        now = time.perf_counter()
        delta = Stats()
        for key, value in vars(self.stats).items():
            if key == "time":
                delta.time = {k: v - before["time"][k] for k, v in value.items()}
            else:
                setattr(delta, key, value - before[key])
        stats = {
            "mode": self.mode,
            "levels": (3 if self.l1 else 2) if self.mode == "triforce" else 1,
            "prompt_tokens": len(self.context) - len(out),
            "new_tokens": len(out),
            "prefill_s": delta.time["prefill"],
            "decode_s": now - t1,
            "decode_tokens_per_s": len(out) / (now - t1) if now > t1 else None,
            "context_tokens": len(self.context),
            "retrieval_rows": self.retrieval.selected if self.retrieval else None,
            "draft_evicted_rows": self.l1.cache.evicted if self.l1 else 0,
        }
        stats.update(delta.as_dict())
        if self.offloaded:
            stats.update(self.full.report(len(out), delta.time["l3"], self.link_gbps))
        if self.mode == "autoregressive":
            for key in ("mean_accepted_per_pass", "l3_acceptance_of_l2", "l2_acceptance_of_l1"):
                stats[key] = None
            stats["target_forwards"] = delta.l3_passes + delta.prefills
        return stats


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
    full_cache: Callable[[int], KVCache] | None = None,
    layer_major: bool | None = None,
    link_gbps: float | None = None,
) -> GenerationResult:
    """Single-shot TriForce generation for one prompt (see Session for the cache arguments)."""
    check_request(target, len(prompt_ids), max_new_tokens)
    session = Session(target, draft, params, eos_ids, settings, generator, "triforce",
                      capacity=len(prompt_ids) + max_new_tokens + settings.gamma + 1, full_cache=full_cache,
                      layer_major=layer_major, link_gbps=link_gbps)
    session.extend(prompt_ids)
    return session.generate(max_new_tokens, on_tokens)
