"""A Session: one growing context (a prompt, or a whole conversation) and the decode loop over it.

`extend` appends tokens (a prompt, a new question) and prefills them; `generate` continues
the context. Each round of the loop is chosen by the round policy (`policy.next_round`):
a TriForce round (triforce.py) or one plain autoregressive step over the full cache,
and the policy hears what the round did (`policy.observe`). Ctrl-C (KeyboardInterrupt)
inside `extend` or `generate` leaves the session consistent: the caches are cut back to
what they hold of the context, and the next call catches up.
"""
from __future__ import annotations

import time
from typing import Literal

import torch

from .caches.base import FullKVCache
from .caches.full import FullCache
from .caches.retrieval import RetrievalCache
from .context import ContextCaches, ProgressCallback
from .kv_store import KVStore
from .model import CausalLM
from .adaptive import policy_for
from .pipelined import PipelinedSpeculator
from .policy import RoundChoice, RoundOutcome, RoundPolicy
from .request import GenerationResult, TokenCallback, check_request, stop_index
from .sampler import Sampler
from .sampling import SamplingParams
from .settings import EngineSettings
from .stats import Stats, answer_stats, timed
from .triforce import DraftLevel, Speculator

Mode = Literal["triforce", "autoregressive"]


class Session:
    def __init__(self, target: CausalLM, draft: CausalLM | None, params: SamplingParams, eos_ids: list[int],
                 settings: EngineSettings = EngineSettings(), generator: torch.Generator | None = None,
                 mode: Mode = "triforce", cache: FullKVCache | None = None, capacity: int = 0,
                 progress: ProgressCallback | None = None, policy: RoundPolicy | None = None,
                 kv_store: KVStore | None = None) -> None:
        """cache: the L3 full cache, built by the caller (default: an on-device FullCache that grows,
        reserved for `capacity` tokens; an OffloadedCache is host-resident and fixed-size); kv_store: kv_store.py.
        policy: the per-round choice (default: the adaptive controller in TriForce mode, adaptive.py,
        unless the settings fix gamma and draft gamma: then, as in autoregressive mode, FixedPolicy)."""
        self.target, self.eos_ids, self.settings = target, eos_ids, settings
        self.sampler = Sampler(params, generator)
        self.stats = Stats()
        full = cache if cache is not None else FullCache(target.cfg, target.device, target.dtype, capacity=capacity)
        self.caches = ContextCaches(target, full, settings, self.stats, progress)
        self.caches.store = kv_store
        self.fixed_policy = policy is None
        self.policy: RoundPolicy = policy
        self.use(mode, draft)
        self._mark = self.stats.snapshot()  # counters at the end of the previous answer

    # -- the context ---------------------------------------------------------------------------------
    @property
    def context(self) -> list[int]:
        """Every token of the conversation (read-only: change it with extend and truncate)."""
        return self.caches.tokens

    full: FullKVCache = property(lambda self: self.caches.full)  # type: ignore[assignment]  (L3)
    retrieval: RetrievalCache | None = property(lambda self: self.caches.retrieval)  # type: ignore[assignment]  (L2)

    @property
    def progress(self) -> ProgressCallback | None:
        return self.caches.progress

    @progress.setter
    def progress(self, callback: ProgressCallback | None) -> None:
        self.caches.progress = callback

    @property
    def max_context(self) -> int:
        """Tokens this session can hold: the model's context, or the planned size of a fixed cache."""
        return self.caches.max_tokens

    @property
    def pipelined(self) -> bool:
        """Pipelined rounds (pipelined.py): --pipeline on, or auto with a host-resident full cache."""
        setting = self.settings.pipeline
        return setting == "on" or (setting == "auto" and getattr(self.full, "offloaded_layers", 0) > 0)

    def use(self, mode: Mode, draft: CausalLM | None = None) -> None:
        """Switch how the next answers are generated; the caches stay (a benchmark prefills once)."""
        self.mode = mode
        triforce = mode == "triforce"
        self.caches.use_retrieval(triforce)  # no L2 work while decoding autoregressively
        self.l1 = DraftLevel(draft, self.settings, self.sampler, self.stats, self.target.cfg.vocab_size) \
            if draft is not None and triforce else None
        self.speculator = None
        if triforce:
            kind = PipelinedSpeculator if self.pipelined else Speculator
            self.speculator = kind(self.caches, self.l1, self.sampler, self.stats)
        if self.fixed_policy:  # (fresh estimates: the costs of another mode or draft say nothing of these)
            self.policy = policy_for(self.settings, self.l1 is not None, speculate=triforce)

    def extend(self, tokens: list[int]) -> None:
        """Append tokens (a prompt or a new turn) and prefill them now."""
        self.caches.tokens.extend(tokens)
        self.caches.reselect = True
        self._catch_up()  # (interrupted: the next call refeeds what the full cache lacks)

    def truncate(self, length: int) -> None:
        """Drop the context after `length` tokens (e.g. /reset back to the document)."""
        self.caches.truncate(length)
        if self.l1 is not None:
            self.l1.reset(self.context)

    def reconfigure(self, settings: EngineSettings | None = None, params: SamplingParams | None = None,
                    generator: torch.Generator | None = None) -> None:
        """Change the engine settings or the sampling between answers; every holder follows (L2's budget
        and chunks, the draft level, the speculator, the policy; every level draws through the sampler)."""
        if params is not None:
            self.sampler.params, self.sampler.generator = params, generator or self.sampler.generator
        if settings is not None:
            self.settings = self.caches.settings = settings
            self.caches.use_retrieval(False)  # rebuilt with the new budget at the next catch-up
            self.use(self.mode, self.l1.model if self.l1 else None)

    def _catch_up(self) -> None:
        if self.caches.catch_up() and self.speculator is not None:
            self.speculator.refresh.recent.clear()  # the acceptance of the previous selection says nothing of this one

    # -- the decode loop -----------------------------------------------------------------------------
    def generate(self, max_new_tokens: int, on_tokens: TokenCallback | None = None) -> GenerationResult:
        """Continue the context by up to max_new_tokens (stopping after an EOS id)."""
        check_request(len(self.context), max_new_tokens, self.max_context, what="context")
        out: list[int] = []
        try:
            self._catch_up()  # the newest context token's logits, L2 in step
            if self.l1 is not None:  # the draft's window from the context alone: a seed gives one answer
                self.l1.reset(self.context)
            t1 = time.perf_counter()
            self._emit([self.sampler.next_token(self.caches.logits)], out, on_tokens, max_new_tokens)
            while out[-1] not in self.eos_ids and len(out) < max_new_tokens:
                remaining = max_new_tokens - len(out)
                choice = self.sampler.agree(self.policy.next_round(remaining, len(self.context)))
                self.policy.observe(self._round(choice, out, on_tokens, max_new_tokens))
        except KeyboardInterrupt:
            self.truncate(len(self.context))  # keep only cache rows that match committed context tokens
            self._mark = self.stats.snapshot()  # the next answer's statistics start here
            raise
        finally:
            if self.full.length != len(self.context):  # the newest token is not in the cache: no logits yet
                self.caches.logits = None
        before, self._mark = self._mark, self.stats.snapshot()
        return GenerationResult(out, _answer_stats(self, self.stats.since(before), len(out), t1))

    def _round(self, choice: RoundChoice, out: list[int], on_tokens: TokenCallback | None,
               max_new: int) -> RoundOutcome:
        """One round as chosen: a TriForce round (when L2 exists) or a plain step; what it did."""
        before, context = self.stats.snapshot(), len(self.context)
        if choice.speculate and self.speculator is not None:
            take = self.speculator.round(choice.gamma, choice.draft_gamma, max_new - len(out), self.eos_ids)
        else:
            take = self._autoregressive_step()
        self._emit(take, out, on_tokens, max_new)
        d = self.stats.since(before)
        return RoundOutcome(choice, d.l3_proposed, d.l3_accepted, len(take), d.l1_proposed, d.l1_accepted,
                            {k: d.time[k] for k in ("l1", "l2", "l3", "overlap")}, context, d.l2_forwards, d.l2_rows,
                            d.l1_forwards, d.l1_rejections, d.l3_rows, d.predraft_rounds > 0, d.predrafts_finished > 0)

    def _autoregressive_step(self) -> list[int]:
        """The one autoregressive decoder: one target forward over the full cache, one token."""
        with timed(self.stats, "l3"):  # the sample too: on CUDA it waits for the forward (a policy's cost)
            logits = self.target(torch.tensor(self.context[-1:], device=self.target.device), self.full)
            token = self.sampler.next_token(logits[-1])
        self.stats.l3_passes += 1
        self.stats.l3_rows += 1
        self.stats.emitted_in_rounds += 1
        if self.retrieval is not None:  # (a policy's plain step in TriForce mode) L2 keeps in step
            self.retrieval.write_rows(self.full, self.retrieval.length, self.full.length)
        return [token]

    def _emit(self, block: list[int], out: list[int], on_tokens: TokenCallback | None, max_new: int) -> None:
        take = block[: stop_index(block, self.eos_ids, max_new - len(out))]
        self.context.extend(take)
        out.extend(take)
        if on_tokens:
            on_tokens(take)


def _answer_stats(session: Session, counted: Stats, new_tokens: int, decode_start: float) -> dict:
    """One answer's statistics: its counters, where its levels and rows were, the cache's traffic."""
    s = session
    stats = answer_stats(counted, s.mode, len(s.context), new_tokens, decode_start)
    stats.update(retrieval_rows=s.retrieval.selected if s.retrieval else None,
                 levels=(3 if s.l1 else 2) if s.mode == "triforce" else 1,
                 draft_evicted_rows=s.l1.cache.evicted if s.l1 else 0)
    stats.update(s.full.report(new_tokens, stats["time_l3_s"]))
    if s.mode == "triforce" and hasattr(s.policy, "report"):  # the controller's choices and estimates
        stats["adaptive"] = s.policy.report()
    return stats
