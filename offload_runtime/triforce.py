"""One TriForce round: L1 drafts for L2, L2 drafts for L3, one L3 pass verifies.

Levels: L1 = draft model + StreamingLLM cache (DraftLevel); L2 = target weights + retrieval
cache; L3 = target weights + full cache. Without a draft model the hierarchy has two levels
(L2 drafts alone). Every acceptance decision goes through the sampler's `verify`, so each
level is lossless and the output has the target's distribution (at temperature 0: exactly
the target's greedy tokens). The re-retrieval policy (RefreshPolicy) decides after an L3
pass whether L2's selection is rebuilt.
"""
from __future__ import annotations

from collections import deque

import torch

from .caches.streaming import StreamingCache
from .context import ContextCaches
from .model import CausalLM
from .request import stop_index
from .sampler import Sampler
from .settings import EngineSettings
from .stats import Stats, timed
from .vocabulary import PLACEHOLDER_ID

REFRESH_WINDOW = 4  # L3 passes the acceptance-triggered re-retrieval averages over


class DraftLevel:
    """L1: the draft model over a StreamingLLM cache, kept in step with the context.

    `consumed` lists the context tokens after `base` that the cache holds; everything
    before `base` was fed at (re-)prefill. Rollback is a truncation of the newest rows.
    """

    def __init__(self, model: CausalLM, settings: EngineSettings, sampler: Sampler, stats: Stats,
                 target_vocab: int | None = None) -> None:
        settings.check_draft()
        self.model, self.settings, self.sampler, self.stats = model, settings, sampler, stats
        self.target_vocab = target_vocab or model.cfg.vocab_size
        self.cache = StreamingCache(model.cfg, model.device, model.dtype, settings.sinks, settings.window, model.rope)
        self.span = sum(settings.gamma_limits(True))  # the longest round so far (how far a rollback reaches)
        self.base = 0
        self.consumed: list[int] = []

    def _forward(self, tokens: list[int]) -> torch.Tensor:
        rows = self.model.cfg.vocab_size  # a target id past the draft's rows (target padding): a placeholder
        tokens = [t if t < rows else PLACEHOLDER_ID for t in tokens]
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

    def _feed(self, context: list[int]) -> list[int] | None:
        """Roll the cache back to the context's tokens it holds; the tokens to feed (None: reset)."""
        tail = context[self.base:]
        if not tail:  # (only after a context shrink) re-prefill
            self.reset(context)
            tail = context[self.base:]
        # Committed tokens never change (a shrinking context resets the draft), so only the speculative
        # tail of `consumed` can differ from the context: compare from there.
        common = max(0, len(self.consumed) - 2 * (self.span + 1))
        limit = min(len(self.consumed), len(tail) - 1)  # the last token must be fed to get a distribution
        common = min(common, limit)
        while common < limit and self.consumed[common] == tail[common]:
            common += 1
        drop = len(self.consumed) - common
        if drop and self.cache.evicted and drop > self.cache.length - self.settings.sinks:
            return None  # the rows to roll back were evicted: start again from the context
        self.cache.truncate(self.cache.length - drop)
        self.consumed = self.consumed[:common]
        feed = tail[common:]
        if len(feed) > self.settings.window - self.settings.sinks:  # a long new turn: cheaper to re-prefill
            self.reset(context)
            feed = context[self.base:]
        return feed

    def propose(self, context: list[int], k: int) -> tuple[list[int], torch.Tensor]:
        """k draft tokens continuing `context` and their distributions [k, V]."""
        feed = self._feed(context)
        if feed is None:
            self.reset(context)
            return self.propose(context, k)
        tokens, dists = [], []
        for _ in range(k):
            logits = self._forward(feed)
            self.consumed.extend(feed)
            dist = self.sampler.distribution(self._fit_vocab(logits[-1]))
            tok = self.sampler.draw(dist)
            tokens.append(tok)
            dists.append(dist)
            feed = [tok]
        self.cache.evict()
        return tokens, torch.stack(dists)


class RefreshPolicy:
    """When to rebuild L2's selection during an answer: every `refresh_every` L3 passes, or when L3
    has lately accepted too little of what L2 proposed (`refresh_below`). Off by default."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.recent: deque[float] = deque(maxlen=REFRESH_WINDOW)  # L3 acceptance of L2, last passes

    def due(self, passes: int, accepted: int, proposed: int) -> bool:
        s = self.settings
        if s.refresh_every and passes % s.refresh_every == 0:
            self.recent.clear()
            return True
        if s.refresh_below and proposed:
            self.recent.append(accepted / proposed)
            if len(self.recent) == REFRESH_WINDOW and sum(self.recent) / REFRESH_WINDOW < s.refresh_below:
                self.recent.clear()
                return True
        return False


class Speculator:
    """Runs TriForce rounds over a context's caches (L2 = its retrieval cache, L3 = its full cache)."""

    def __init__(self, caches: ContextCaches, l1: DraftLevel | None, sampler: Sampler, stats: Stats) -> None:
        self.caches, self.l1, self.sampler, self.stats = caches, l1, sampler, stats
        self.target = caches.target
        self.refresh = RefreshPolicy(caches.settings)

    def round(self, gamma: int, draft_gamma: int, budget: int, eos_ids: list[int]) -> list[int]:
        """L2 (helped by L1) drafts gamma tokens, one L3 pass verifies them; the tokens to emit (at most
        `budget`, ending at an EOS). The caches keep exactly the rows of the emitted tokens but the last."""
        caches, stats = self.caches, self.stats
        gamma = min(gamma, budget - 1)
        base = caches.full.length  # == retrieval.length: every context token but the newest
        with timed(stats, "l2"):
            drafted, q = self._draft_l2(gamma, draft_gamma)
        with timed(stats, "l3"):
            tokens = torch.tensor(caches.tokens[-1:] + drafted, device=self.target.device)
            p = self.sampler.distribution(self.target(tokens, caches.full))
            n, nxt = self.sampler.verify(drafted, q, p)
        block = drafted[:n] + [nxt]
        take = block[: stop_index(block, eos_ids, budget)]  # an EOS ends the answer there
        self._settle(base, len(drafted), n, len(take))
        return take

    def _settle(self, base: int, proposed: int, accepted: int, emitted: int) -> bool:
        """After an L3 verdict: count the pass, keep the rows of the emitted tokens (but the last), and
        rebuild the retrieval selection when due. Returns whether it was rebuilt."""
        caches, stats = self.caches, self.stats
        keep = base + emitted  # rows: the newest context token, then every emitted token but the last
        stats.l3_passes += 1
        stats.l3_rows += proposed + 1
        stats.l3_proposed += proposed
        stats.l3_accepted += accepted
        stats.rounds_all_accepted += accepted == proposed
        stats.emitted_in_rounds += emitted
        caches.keep(base, keep)  # the L3 pass computed the true K/V of these rows
        refreshed = self.refresh.due(stats.l3_passes, accepted, proposed)
        if refreshed:
            # the query of the last kept row; recent_queries holds the pass's last rows, so index from the end
            caches.select(keep, emitted - 1 - (proposed + 1))
        return refreshed

    def _draft_l2(self, gamma: int, draft_gamma: int) -> tuple[list[int], torch.Tensor]:
        """gamma tokens sampled (losslessly) from L2, and L2's distribution at each, [gamma, V]."""
        if self.l1 is not None:
            self.l1.span = max(self.l1.span, gamma + draft_gamma)
        chain = DraftChain(self, self.caches.tokens, draft_gamma)
        while len(chain.tokens) < gamma:
            chain.step(gamma)
        return chain.head(gamma)


class DraftChain:
    """L2's proposals (helped by L1) continuing `context`: each token with the distribution it was
    drawn from. The retrieval cache holds the context and every proposal but the last (`last` is
    the next token to feed), so a chain can be continued later, step by step."""

    def __init__(self, spec: Speculator, context: list[int], draft_gamma: int,
                 tokens: list[int] | None = None, dists: list[torch.Tensor] | None = None) -> None:
        self.spec, self.context, self.draft_gamma = spec, context, draft_gamma
        self.tokens: list[int] = tokens or []
        self.dists: list[torch.Tensor] = dists or []

    @property
    def last(self) -> int:
        return self.tokens[-1] if self.tokens else self.context[-1]

    def step(self, want: int) -> None:
        """One L2 forward: one more token (L2 alone) or L1's accepted proposals and one more (up to `want`)."""
        spec, dev = self.spec, self.spec.target.device
        retrieval, sampler, stats = spec.caches.retrieval, spec.sampler, spec.stats
        if spec.l1 is None or self.draft_gamma <= 0:  # L2 drafts alone (no draft model, or L1 off this round)
            dist = sampler.distribution(spec.target(torch.tensor([self.last], device=dev), retrieval)[-1])
            stats.l2_forwards += 1
            stats.l2_rows += 1
            self.tokens.append(sampler.draw(dist))
            self.dists.append(dist)
            return
        with timed(stats, "l1"):
            proposals, q1 = spec.l1.propose(self.context + self.tokens,
                                            max(1, min(self.draft_gamma, want - len(self.tokens))))
        start = retrieval.length
        q2 = sampler.distribution(spec.target(torch.tensor([self.last] + proposals, device=dev), retrieval))
        stats.l2_forwards += 1
        stats.l2_rows += 1 + len(proposals)
        m, nxt = sampler.verify(proposals, q1, q2)
        stats.l1_proposed += len(proposals)
        stats.l1_accepted += m
        stats.l1_rejections += int(m < len(proposals))
        retrieval.truncate(start + 1 + m)
        self.tokens.extend(proposals[:m] + [nxt])
        self.dists.extend(q2[: m + 1])

    def head(self, n: int) -> tuple[list[int], torch.Tensor]:
        """The first n proposals and their distributions [n, V]."""
        if not self.dists or n == 0:
            return [], torch.empty(0, self.spec.target.cfg.vocab_size, device=self.spec.target.device)
        return self.tokens[:n], torch.stack(self.dists[:n])
