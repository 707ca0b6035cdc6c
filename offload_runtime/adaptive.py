"""Adaptive speculation: before every round choose gamma, draft gamma, L1 on/off or a plain
autoregressive step, to minimise the expected seconds per emitted token.

Pure logic, no model code: a RoundPolicy (policy.py). The Session asks `next_round(remaining,
context)` before a round and reports what the round cost and accepted with `observe(outcome)`.
Running estimates (estimates.py; exponentially forgotten, so a change of text or of machine load
is followed): the cost of an L3 pass as a linear function of context length and query rows, of
an L2 step as a function of its query rows, of an L1 step, and the per-token acceptance of L3
for L2 tokens and of L2 for L1 tokens. Candidates are scored with offload_runtime/cost.py.
Pipelined rounds (pipelined.py) add one estimate, the share of an L3 pass whose copy waits
the next round's drafting fits in (HiddenShare); it is 0, and the scoring unpipelined, until
a pipelined round is observed.

Exploration, so that no early estimate locks a choice out: the first round is one
autoregressive step (the baseline's cost), the second a short probe (gamma 1); acceptance
estimates carry a prior of one accepted and one rejected token; and while autoregressive
steps win, a probe round (gamma 1, no L1) runs every `probe_every` steps, an interval that
doubles after each probe that does not win back speculation (up to a cap) and resets when
one does. L1, when present but not chosen, is re-tried the same way. A fully accepted probe is
followed at once by a longer one: twice its gamma, or what one L3 pass affords in L2 steps
(`affordable_gamma`) when that is more.

Lossless by construction: the choice only sets how many tokens are proposed; every proposal
still goes through the verification rule.
"""
from __future__ import annotations

from collections import Counter
from typing import Literal

from .estimates import Estimates, RoundMeasurement
from .policy import FixedPolicy, RoundChoice, RoundOutcome, RoundPolicy
from .settings import EngineSettings

Kind = Literal["speculative", "autoregressive", "probe"]
KINDS: tuple[Kind, ...] = ("speculative", "autoregressive", "probe")
RESEARCH = 16  # autoregressive steps between full searches of the speculative settings


AUTOREGRESSIVE = RoundChoice(False, 0, 0)


def kind_of(choice: RoundChoice) -> Kind:
    return "probe" if choice.probe else "speculative" if choice.speculate else "autoregressive"


def policy_for(settings: EngineSettings, has_draft: bool, speculate: bool) -> RoundPolicy:
    """The Session's default policy: adaptive in TriForce mode unless every gamma that matters is fixed."""
    if not speculate or (settings.gamma is not None and (settings.draft_gamma is not None or not has_draft)):
        return FixedPolicy(settings, speculate)
    gamma, draft = settings.gamma_limits(has_draft)
    return AdaptiveSpeculation(has_draft, settings.gamma, settings.draft_gamma, max_gamma=gamma, max_draft_gamma=draft)


class BackOff:
    """Count steps until the next probe; the interval doubles on failure (to a cap), resets on success."""

    def __init__(self, first: int, cap: int) -> None:
        self.first, self.cap = first, cap
        self.interval, self.waited = first, 0

    def tick(self) -> bool:
        """Is a probe due now (`interval` steps waited)? If not, count one more step of waiting."""
        if self.waited >= self.interval:
            return True
        self.waited += 1
        return False

    def failed(self) -> None:
        self.interval, self.waited = min(2 * self.interval, self.cap), 0

    def reset(self) -> None:
        self.interval, self.waited = self.first, 0


class AdaptiveSpeculation:
    """The per-round policy of a session. `gamma`/`draft_gamma` None: chosen online; a number: fixed.

    With a fixed gamma every round is speculative (as with a fixed --gamma before this
    controller existed); autoregressive steps are a candidate only when gamma is chosen.
    """

    def __init__(self, has_draft: bool, gamma: int | None = None, draft_gamma: int | None = None,
                 max_gamma: int = 16, max_draft_gamma: int = 8, probe_first: int = 8, probe_cap: int = 64,
                 forget: float = 0.95) -> None:
        self.has_draft, self.fixed_gamma, self.fixed_draft_gamma = has_draft, gamma, draft_gamma
        self.max_gamma, self.max_draft_gamma = gamma or max_gamma, draft_gamma or max_draft_gamma
        self.estimates = Estimates(forget)
        self.ar_backoff = BackOff(probe_first, probe_cap)  # probes of speculation while autoregressive wins
        self.l1_backoff = BackOff(probe_first, probe_cap)  # probes of L1 while L2 drafting alone wins
        self.gammas: Counter[int] = Counter()
        self.draft_gammas: Counter[int] = Counter()
        self.kinds: Counter[str] = Counter()
        self._ramp = 0  # gamma of the next probe after a fully accepted one (0: none pending)
        self._previous: str = ""  # kind of the last observed round
        self._best: tuple[float, int, int] | None = None  # the last full search's result
        self._since_search = 0
        self._last_context = 0

    @property
    def may_step_autoregressively(self) -> bool:
        return self.fixed_gamma is None

    def _candidates(self) -> list[tuple[int, int]]:
        """(gamma, draft gamma) settings to score; draft gamma 0: L1 unused (L1 only once its cost is known).
        With L1, the draft gamma is the one of cheapest drafting per L2 token (capped by gamma)."""
        gammas = [self.fixed_gamma] if self.fixed_gamma else list(range(1, self.max_gamma + 1))
        if not self.has_draft:
            return [(g, 0) for g in gammas]
        if self.fixed_draft_gamma:
            return [(g, self.fixed_draft_gamma) for g in gammas]
        if not self.estimates.l1.observations:
            return [(g, 0) for g in gammas]
        d = self.estimates.best_draft_gamma(self.max_draft_gamma)
        return [(g, 0) for g in gammas] + [(g, min(g, d)) for g in gammas]

    def best_speculative(self, context: int) -> tuple[float, int, int]:
        """(expected s/token, gamma, draft gamma) of the best speculative setting at this context.

        A full search after every speculative round; between them (autoregressive steps, which only
        refine the L3 cost) the last best setting is re-scored, with a full search every RESEARCH steps.
        """
        if self._best is None or self._since_search >= RESEARCH:
            self._best, self._since_search = self.estimates.best(context, self._candidates()), 0
            return self._best
        self._since_search += 1
        _, g, d = self._best
        return self.estimates.best(context, [(g, d)])

    def affordable_gamma(self, context: int) -> int:
        """The gamma whose drafting, were every proposal rejected, costs about one L3 pass: where a pass is
        dear (offloaded, long context) the ramp after a fully accepted probe jumps there instead of
        doubling through passes that each yield a few tokens; where it is cheap this is ~1 (doubling)."""
        c = self.estimates.costs(context, 1, 0)
        return int(c.l3_pass_s / c.l2_step_s) if c.l2_step_s > 0 else 0

    def autoregressive_seconds_per_token(self, context: int) -> float:
        return self.estimates.seconds_per_token(context, 0, 0) if self.may_step_autoregressively else float("inf")

    def _probe(self, gamma: int) -> RoundChoice:
        """A short speculative round: L1 only when its draft gamma is fixed."""
        return RoundChoice(True, gamma, (self.fixed_draft_gamma or 0) if self.has_draft else 0, probe=True)

    def next_round(self, remaining: int, context: int) -> RoundChoice:
        """The setting of the next round; `context` is the session's context length (tokens)."""
        if self.fixed_gamma and (self.fixed_draft_gamma or not self.has_draft):
            return RoundChoice(True, self.fixed_gamma, (self.fixed_draft_gamma or 0) if self.has_draft else 0)
        est = self.estimates
        if self.may_step_autoregressively and est.l3.observations == 0:
            return AUTOREGRESSIVE  # warm-up: the baseline's cost
        if est.l2.observations == 0 or self._ramp:
            return self._probe(self._ramp or self.fixed_gamma or 1)
        spec_s, gamma, draft_gamma = self.best_speculative(context)
        if self.autoregressive_seconds_per_token(context) <= spec_s:
            if self._previous == "speculative":  # falling back: the wait before the next probe starts now
                self.ar_backoff.waited = 0
            if self.ar_backoff.tick():
                return self._probe(1 if self.fixed_gamma is None else self.fixed_gamma)
            return AUTOREGRESSIVE
        if self.has_draft and not self.fixed_draft_gamma and draft_gamma == 0 and \
                (est.l1.observations == 0 or self.l1_backoff.tick()):
            return RoundChoice(True, gamma, min(gamma, 3, self.max_draft_gamma), probe=True)  # re-try L1
        return RoundChoice(True, gamma, draft_gamma)

    def observe(self, outcome: RoundOutcome) -> None:
        """Record a round the Session ran (its gamma may be smaller than chosen: the end of an answer)."""
        self.record(outcome.choice, outcome.context, RoundMeasurement.of(outcome))

    def record(self, choice: RoundChoice, context: int, m: RoundMeasurement) -> None:
        self.estimates.observe(context, m)
        kind = kind_of(choice)
        if choice.speculate:
            self._best = None  # acceptance or L2/L1 costs changed: search again
        self._last_context = context
        self.gammas[m.proposed if choice.speculate else 0] += 1
        if choice.speculate:
            self.draft_gammas[choice.draft_gamma] += 1
        self.kinds[kind] += 1
        self._previous = kind
        if kind != "probe":
            return
        spec_s, _, draft_gamma = self.best_speculative(context)
        if choice.draft_gamma and not self.fixed_draft_gamma:  # a probe of L1
            self.l1_backoff.reset() if draft_gamma else self.l1_backoff.failed()
            return
        # a probe of speculation: a fully accepted one is followed at once by a longer one
        full = self.may_step_autoregressively and m.proposed and m.accepted == m.proposed
        self._ramp = min(max(2 * m.proposed, self.affordable_gamma(context)), self.max_gamma) if full else 0
        if spec_s < self.autoregressive_seconds_per_token(context):
            self.ar_backoff.reset()
        elif not self._ramp:
            self.ar_backoff.failed()

    def report(self) -> dict:
        """The choices so far and the current estimates (for the session's stats)."""
        ctx = self._last_context
        out: dict = {"rounds": dict(self.kinds), "gamma_histogram": dict(sorted(self.gammas.items())),
                     "draft_gamma_histogram": dict(sorted(self.draft_gammas.items())),
                     "probe_interval": self.ar_backoff.interval, "estimates": self.estimates.as_dict(ctx)}
        if self.estimates.l2.observations:
            spec_s, gamma, draft_gamma = self.best_speculative(ctx)
            out["predicted_s_per_token"] = {"autoregressive": self.autoregressive_seconds_per_token(ctx),
                                            "best_speculative": spec_s, "gamma": gamma, "draft_gamma": draft_gamma}
        return out
