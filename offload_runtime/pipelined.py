"""Pipelined TriForce rounds: L2 (with L1) drafts round k+1 while round k's L3 pass streams the cache.

The L3 pass is the target's one forward with a layer runner (`drafting_before_layers`): before
a layer whose K/V slab has not arrived yet, the round does draft steps of the *pre-draft*:
L2 continues its chain past round k's last proposal as if all of round k were accepted.
When no draft work is left the pass waits for the copy as an unpipelined one does. The
same code runs on every backend: only the "is this copy done?" query differs.

The verdict (docs/ARCHITECTURE.md, "Pipelined speculation", has the argument that the
output keeps the target's distribution):
- every proposal of round k accepted: the pre-draft's first token x1 ~ q1 takes the place
  of the bonus token; it is verified against p, the target's distribution the pass already
  computed at that position (accept with min(1, p/q1), else emit a draw from
  norm(max(p - q1, 0)) and drop the rest). Accepted, the rest of the pre-draft (each
  token with its q) is carried to round k+1 as the head of its proposals (PEARL's post-verify);
- otherwise the pre-draft is dropped: the retrieval cache is cut back as after any round,
  L1 rolls itself back to the context at its next proposal.

Timing (what the adaptive controller fits, adaptive.py): the pre-draft's seconds count as L2's
(and L1's) time; L3's time is the pass's own, its wall time less the draft steps that ran while
no copy was pending (after which the awaited copy had arrived: the step may have held the pass
up); the steps after which it was still in flight were hidden in the wait ("overlap").
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .caches.base import FullKVCache
from .model import DecoderLayer, LayerRunner
from .request import stop_index
from .stats import Stats, timed
from .triforce import DraftChain, Speculator


@dataclass
class Carry:
    """Pre-drafted proposals accepted into the next round, and the cache state they are valid for."""
    tokens: list[int]
    dists: list[torch.Tensor]
    context_len: int  # the context they continue (its newest token is the accepted x1)
    full_len: int  # full cache and retrieval cache length after the round's verdict
    retrieval_len: int  # the retrieval cache's length with the pre-draft's rows (restored on use)
    builds: int  # retrieval selections built so far (a rebuild invalidates the rows)


def drafting_before_layers(full: FullKVCache, n_new: int, work: Callable[[], bool]) -> LayerRunner:
    """The L3 pass's layer runner: while layer i's K/V is not on the device yet (`full.layer_ready`,
    never blocking) do one unit of `work` after another (False: none left), then run the layer (it
    waits for a copy still in flight). The work runs outside inference mode, as between forwards."""
    def run(i: int, layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False):
            while not full.layer_ready(i, n_new) and work():
                pass
        return layer(x, cos, sin, full)

    return run


class PreDraft:
    """Round k+1's drafting inside round k's L3 pass: `step` is the work done before layers, timed."""

    def __init__(self, chain: DraftChain, want: int, stats: Stats, full: FullKVCache) -> None:
        self.chain, self.want, self.stats, self.full = chain, want, stats, full
        self.seconds = self.hidden = 0.0  # drafting, and the part of it done while a copy was in flight

    @property
    def tokens(self) -> list[int]:
        return self.chain.tokens

    def step(self) -> bool:
        """One draft step (False: the pre-draft is complete)."""
        if len(self.chain.tokens) >= self.want:
            return False
        start = time.perf_counter()
        self.chain.step(self.want)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.hidden += seconds if self.full.copy_pending() else 0.0
        self.stats.predraft_steps += 1
        return True

    def settle(self) -> None:
        """Move the drafting out of L3's time (the timed pass held it) into L2's, the hidden part into "overlap"."""
        t = self.stats.time
        t["l2"] += self.seconds
        t["l3"] -= self.seconds - self.hidden
        t["overlap"] += self.hidden
        self.stats.predraft_rounds += 1
        self.stats.predrafts_finished += len(self.chain.tokens) >= self.want


class PipelinedSpeculator(Speculator):
    """A Speculator whose rounds overlap the next round's drafting with the L3 pass."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.carry: Carry | None = None

    def _resume(self, draft_gamma: int) -> DraftChain:
        """The chain this round starts from: the carried pre-draft when the caches are as it left them."""
        carry, self.carry = self.carry, None
        caches = self.caches
        if carry is not None and carry.context_len == len(caches.tokens) and carry.full_len == caches.full.length \
                and caches.retrieval.length == carry.full_len and carry.builds == self.stats.retrieval_builds:
            caches.retrieval.length = carry.retrieval_len  # its rows past the verdict are still in place
            self.stats.predraft_used += len(carry.tokens)
            return DraftChain(self, caches.tokens, draft_gamma, carry.tokens, carry.dists)
        if carry is not None:
            self.stats.predraft_dropped += len(carry.tokens)
        return DraftChain(self, caches.tokens, draft_gamma)

    def round(self, gamma: int, draft_gamma: int, budget: int, eos_ids: list[int]) -> list[int]:
        caches, stats = self.caches, self.stats
        gamma = min(gamma, budget - 1)
        base = caches.full.length
        if self.l1 is not None:  # a rollback reaches over this round and the pre-draft
            self.l1.span = max(self.l1.span, 2 * (gamma + draft_gamma) + 1)
        with timed(stats, "l2"):
            chain = self._resume(draft_gamma)
            while len(chain.tokens) < gamma:
                chain.step(gamma)
            drafted, q = chain.head(gamma)
            caches.retrieval.truncate(base + gamma)  # holds the context and drafted[:-1]: continue from drafted[-1]
        want = max(1, min(gamma + 1, budget - gamma - 1))  # x1, then up to a full next round
        pre = PreDraft(DraftChain(self, caches.tokens + drafted, draft_gamma), want, stats, caches.full)
        with timed(stats, "l3"):
            tokens = torch.tensor(caches.tokens[-1:] + drafted, device=self.target.device)
            drafting = drafting_before_layers(caches.full, len(tokens), pre.step)
            p = self.sampler.distribution(self.target(tokens, caches.full, run_layer=drafting))
            n, nxt = self.sampler.verify(drafted, q, p)
        pre.settle()
        x1_ok = False
        if n == len(drafted) and pre.tokens:  # every proposal accepted: x1 replaces the bonus draw
            x1_ok, nxt = self.sampler.verify_one(pre.tokens[0], pre.chain.dists[0], p[n])
            stats.predraft_used += 1
            stats.l3_proposed += 1
            stats.l3_accepted += int(x1_ok)
        block = drafted[:n] + [nxt]
        take = block[: stop_index(block, eos_ids, budget)]
        keep = base + len(take)
        rows = caches.retrieval.length  # the pre-draft's rows end here
        refreshed = self._settle(base, len(drafted), n, len(take))
        rest = len(pre.tokens) - int(n == len(drafted) and bool(pre.tokens))  # all but a verified x1
        if x1_ok and len(take) == len(block) and not refreshed and rest:
            self.carry = Carry(pre.tokens[1:], pre.chain.dists[1:], len(caches.tokens) + len(take), keep, rows,
                               stats.retrieval_builds)
        else:
            stats.predraft_dropped += rest
        return take
