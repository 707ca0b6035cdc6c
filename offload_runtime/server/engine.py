"""The server's engine worker: one request at a time, the documents' caches reused.

Requests run in arrival order on one worker thread, so the HTTP event loop never waits on the
model. A request's token ids are compared with the contexts in RAM (ContextPool: one by default,
several with --context-ram-gb): the one sharing most serves it, its caches are cut back to the
longest common prefix and only the rest is prefilled (or restored from --kv-store), so a
follow-up question over a long document costs its own tokens. A client that goes away, or a stop string in the answer, ends the
generation from the token callback with a KeyboardInterrupt subclass: the path by which Ctrl-C
leaves a Session consistent (the chat's).
"""
from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import UserError
from ..sampling import SamplingParams


def set_sampling(session: Any, params: SamplingParams, generator: torch.Generator) -> None:
    """Each request brings its own temperature, top-p and seed; the session's levels keep references."""
    session.reconfigure(params=params, generator=generator)  # every level draws through the session's sampler


class Interrupted(KeyboardInterrupt):
    """Raised from the engine's callbacks to end a generation the way Ctrl-C does."""


class Cancelled(Interrupted):
    """The client went away."""


class StopMatched(Interrupted):
    """The answer reached one of the request's stop strings."""


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] | None = None  # streamed text deltas (called on the worker thread)
    on_shutdown: Callable[[], None] | None = None  # called by cancel_all (from a signal handler: must only post)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrival: int = -1  # set by EngineWorker.submit
    received: float = field(default_factory=time.perf_counter)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length" or "cancelled"
    prompt_tokens: int
    stats: dict


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class AnswerText:
    """The answer's text as tokens arrive: what can be streamed now, and where a stop string cuts it.
    Held back: a trailing incomplete UTF-8 character, and a tail that may be the start of a stop string."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, tokens: list[int]) -> str:
        """Take new tokens; return the text that may be sent now."""
        self.ids.extend(tokens)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.text = True, text[:min(hits)]
            return self.flush()
        self.text = text
        safe = len(text) - self._held(text)
        delta = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta

    def _held(self, text: str) -> int:
        body = text.rstrip("\ufffd")
        partial = max((k for s in self.stop for k in range(1, len(s)) if body.endswith(s[:k])), default=0)
        return len(text) - len(body) + partial

    def flush(self) -> str:
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


def context_bytes(session: Any) -> int:
    """Host-memory bytes of a context's full cache as allocated, what --context-ram-gb counts (the
    planner's Plan.context_ram): an offloaded cache's planned bytes, not its used rows (its host layers;
    on a CPU, where the "device" is host memory too, also its on-chip layers and slabs); a growing
    FullCache's allocated rows (CPU: on a GPU the pool holds offloaded caches only)."""
    from ..caches.full import FullCache
    from ..caches.offloaded import OffloadedCache

    full, cfg, dtype = session.full, session.target.cfg, session.target.dtype
    if isinstance(full, OffloadedCache):
        on_chip, slabs, host = OffloadedCache.planned_bytes(cfg, dtype, full.capacity, full.on_chip_layers)
        return host + (on_chip + slabs if full.device.type == "cpu" else 0)
    return FullCache.planned_bytes(cfg, dtype, full.capacity)


class ContextPool:
    """The server's contexts in RAM, least recently used first. A request goes to the context that
    shares most of its tokens (a follow-up question, another question over the same document); a
    request for another document gets an empty context, a new one while they fit in `max_bytes`,
    or else the least recently used one, cut back and refilled in the memory it holds (with --kv-store
    its rows come back from disk later). Contexts held past `max_bytes` (a growing cache outgrew it)
    are dropped, least recently used first, their caches closed (an emulated link's thread stopped)."""

    def __init__(self, first: Any, make: Callable[[], Any] | None = None, max_bytes: int = 0) -> None:
        self.sessions, self.make, self.max_bytes = [first], make, max_bytes

    def held(self) -> int:
        """Bytes of host memory the contexts' full caches hold (context_bytes)."""
        return sum(map(context_bytes, self.sessions))

    def pick(self, ids: list[int]) -> Any:
        shared = {id(s): common_prefix(s.context, ids) for s in self.sessions}
        best = max(reversed(self.sessions), key=lambda s: shared[id(s)])  # ties: the most recent
        empty = [s for s in self.sessions if not s.context]
        if self.make is None or 2 * shared[id(best)] >= max(len(best.context), 1):
            chosen = best  # it holds (most of) this request's prefix
        elif empty:
            chosen = empty[0]
        elif self.held() + context_bytes(best) <= self.max_bytes:
            chosen = self.make()
        else:
            chosen = self.sessions[0]
        if chosen in self.sessions:
            self.sessions.remove(chosen)
        self.sessions.append(chosen)
        while self.make is not None and len(self.sessions) > 1 and self.held() > self.max_bytes:
            self.sessions.pop(0).full.close()  # (its memory goes with the last reference)
        return chosen

    def close(self) -> None:
        """Stop every context's copy engine (an emulated link's thread), in order."""
        for session in self.sessions:
            session.full.close()


def stats_since(session: Any, before: dict) -> dict:
    """The session's counters since `before` (for an answer the engine did not finish itself)."""
    return dict(session.stats.since(before).as_dict(), mode=session.mode)


class EngineWorker:
    """Runs requests on one Session, first come first served, on a single worker thread."""

    def __init__(self, session: Any, tokenizer: Any, eos_ids: list[int], device: Any, seed: int = 0,
                 contexts: ContextPool | None = None) -> None:
        """session: the first context; contexts: a pool around it (default: that one context alone)."""
        self.pool = contexts or ContextPool(session)
        self.tokenizer, self.eos_ids, self.device = tokenizer, eos_ids, device
        self.generator = torch.Generator(device=device).manual_seed(seed)  # requests without a seed
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._arrivals, self._served = itertools.count(), itertools.count()
        self.counts = {"received": 0, "completed": 0, "cancelled": 0, "failed": 0}
        self.closing = False  # set by cancel_all: the server is shutting down
        self._live: list[tuple[Request, Future]] = []  # queued or running (changed on the event loop's thread only)

    @property
    def session(self) -> Any:
        """The context used last (the only one by default)."""
        return self.pool.sessions[-1]

    @property
    def max_context(self) -> int:
        return self.session.max_context

    def submit(self, request: Request) -> Future:
        """Queue a request (call from one thread: the event loop); the future gives its Completion."""
        request.arrival = next(self._arrivals)
        self.counts["received"] += 1
        future = self._pool.submit(self._run, request)
        self._live = [(r, f) for r, f in self._live if not f.done()] + [(request, future)]
        return future

    def cancel_all(self) -> None:
        """Shutting down: cancel every queued and running request through its token callback (the Ctrl-C
        path), so none holds the exit. Safe from a signal handler: it only sets events."""
        self.closing = True
        for request, _ in tuple(self._live):
            request.cancelled.set()
            if request.on_shutdown:
                request.on_shutdown()

    def close(self) -> None:
        """Cancel everything, then stop each context's copy engine (an emulated link's thread) in order."""
        self.cancel_all()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.pool.close()

    def _run(self, request: Request) -> Completion:
        served, waited = next(self._served), time.perf_counter() - request.received
        try:
            if request.cancelled.is_set():  # the client left while queued
                done = Completion("", [], "cancelled", len(request.prompt_ids), {})
            else:
                done = self._generate(request)
        except UserError:  # refused before the engine changed anything (e.g. the context check)
            raise
        except Exception:
            self.counts["failed"] += 1
            self.session.truncate(0)  # after an unexpected failure trust no cache row: start empty
            raise
        self.counts["cancelled" if done.finish_reason == "cancelled" else "completed"] += 1
        done.stats.update(arrival=request.arrival, served=served, queue_wait_s=waited)
        return done

    def _reuse_prefix(self, session: Any, ids: list[int]) -> int:
        """Cut the caches back to the longest common prefix with `ids`, prefill the rest; return the cache
        rows kept for the prefix (its last token is fed again when its logits are gone)."""
        common = common_prefix(session.context, ids)
        if common < len(session.context):
            session.truncate(common)
        kept = min(common, session.full.length)
        try:
            session.extend(ids[common:])  # also marks the retrieval selection for a rebuild (a new question)
        except KeyboardInterrupt:
            session.truncate(common)
            raise
        return kept

    def _generate(self, request: Request) -> Completion:
        session = self.pool.pick(request.prompt_ids)
        before = session.stats.snapshot()
        answer = AnswerText(self.tokenizer, request.stop)

        def check(*_: Any) -> None:
            if request.cancelled.is_set():
                raise Cancelled

        def on_tokens(tokens: list[int]) -> None:
            delta = answer.add(tokens)
            if delta and request.on_text:
                request.on_text(delta)
            if answer.stopped:
                raise StopMatched
            check()

        seeded = None if request.seed is None else torch.Generator(device=self.device).manual_seed(request.seed)
        set_sampling(session, request.params, seeded or self.generator)
        session.progress = check  # a prefill is cancelled between its chunks
        kept, stats = 0, None
        try:
            kept = self._reuse_prefix(session, request.prompt_ids)
            stats = session.generate(request.max_tokens, on_tokens).stats
            finish = "stop" if answer.ids and answer.ids[-1] in self.eos_ids else "length"
        except StopMatched:
            finish = "stop"
        except Cancelled:
            finish = "cancelled"
        finally:
            session.progress = None
        stats = stats or stats_since(session, before)
        tail = answer.flush()
        if tail and request.on_text and finish != "cancelled":
            request.on_text(tail)
        prefilled = session.stats.prefilled_tokens - before["prefilled_tokens"]
        restored = session.stats.restored_tokens - before["restored_tokens"]
        # rows kept in RAM, less a kept last row the catch-up refed for its logits: reused + restored +
        # prefilled = the prompt (cached_tokens = reused + restored)
        reused = min(kept, len(request.prompt_ids) - prefilled - restored)
        stats.update(prefilled_tokens=prefilled, restored_tokens=restored,
                     prefills=session.stats.prefills - before["prefills"], reused_prefix_tokens=reused,
                     contexts=len(self.pool.sessions),
                     tokens_per_l3_pass=stats.get("mean_accepted_per_pass"))
        return Completion(answer.text, answer.ids, finish, len(request.prompt_ids), stats)
