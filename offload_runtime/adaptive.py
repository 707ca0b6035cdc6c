"""Adaptive speculation: before every round choose gamma, draft gamma, L1 on/off or a plain
autoregressive step, to minimise the expected seconds per emitted token.

Pure logic, no model code: a RoundPolicy (policy.py). The Session asks `next_round(remaining,
context)` before a round and reports what the round cost and accepted with `observe(outcome)`.
Running estimates (exponentially forgotten, so a change of text or of machine load is
followed): the cost of an L3 pass as a linear function of context length and query rows, of
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
from dataclasses import dataclass
from typing import Literal

from .cost import PhaseCosts, expected_tokens_per_pass, round_seconds_per_token, seconds_per_token
from .policy import FixedPolicy, RoundChoice, RoundOutcome, RoundPolicy
from .settings import EngineSettings

Kind = Literal["speculative", "autoregressive", "probe"]
KINDS: tuple[Kind, ...] = ("speculative", "autoregressive", "probe")
RESEARCH = 16  # autoregressive steps between full searches of the speculative settings
CONTEXT_UNIT = 1024.0  # context lengths enter the L3 fit in thousands of tokens (a well-scaled feature)
BURST = 3.0  # an observed time is cut to this multiple of the predicted one (see LinearCost.observe)


AUTOREGRESSIVE = RoundChoice(False, 0, 0)


def kind_of(choice: RoundChoice) -> Kind:
    return "probe" if choice.probe else "speculative" if choice.speculate else "autoregressive"


def policy_for(settings: EngineSettings, has_draft: bool, speculate: bool) -> RoundPolicy:
    """The Session's default policy: adaptive in TriForce mode unless every gamma that matters is fixed."""
    if not speculate or (settings.gamma is not None and (settings.draft_gamma is not None or not has_draft)):
        return FixedPolicy(settings, speculate)
    gamma, draft = settings.gamma_limits(has_draft)
    return AdaptiveSpeculation(has_draft, settings.gamma, settings.draft_gamma, max_gamma=gamma, max_draft_gamma=draft)


@dataclass
class RoundMeasurement:
    """What one round cost and accepted, as the engine measured it."""
    l3_s: float  # the L3 pass (or the autoregressive step)
    l3_rows: int  # its query rows: tokens proposed + 1 (1 for an autoregressive step)
    proposed: int = 0  # L2 tokens L3 verified
    accepted: int = 0  # of which L3 accepted
    l2_s: float = 0.0  # L2 forwards, L1 time excluded
    l2_forwards: int = 0
    l2_rows: int = 0  # query rows over those forwards
    l1_s: float = 0.0
    l1_forwards: int = 0
    l1_accepted: int = 0  # L1 tokens accepted by L2
    l1_rejections: int = 0  # L2 checks that stopped at a rejected L1 token
    pipelined: bool = False  # the pass pre-drafted the next round in its copy waits
    overlap_s: float = 0.0  # drafting hidden in those waits (in l2_s / l1_s, not in l3_s)
    predraft_finished: bool = False  # the pre-draft was complete before the pass ended

    @classmethod
    def of(cls, o: RoundOutcome) -> RoundMeasurement:
        """From the Session's outcome (its L2 seconds include the L1 steps it waited for)."""
        s = o.seconds
        return cls(l3_s=s.get("l3", 0.0), l3_rows=o.l3_rows or o.proposed + 1, proposed=o.proposed,
                   accepted=o.accepted, l2_s=s.get("l2", 0.0) - s.get("l1", 0.0), l2_forwards=o.l2_forwards,
                   l2_rows=o.l2_rows, l1_s=s.get("l1", 0.0), l1_forwards=o.l1_forwards, l1_accepted=o.l1_accepted,
                   l1_rejections=o.l1_rejections, pipelined=o.pipelined, overlap_s=s.get("overlap", 0.0),
                   predraft_finished=o.predraft_finished)


class LinearCost:
    """Seconds = features . theta, fitted by exponentially forgotten least squares.

    A small ridge pulls every coefficient but the first (the fixed cost) towards zero, so a
    feature the data do not yet vary (rows, while only one gamma was tried) predicts no effect
    rather than nonsense. The ridge is not forgotten: it never dominates fresh data.
    """

    def __init__(self, n: int, forget: float = 0.95, ridge: float = 1e-3) -> None:
        self.forget, self.ridge, self.observations = forget, ridge, 0
        self.xtx = [[0.0] * n for _ in range(n)]
        self.xty = [0.0] * n
        self.theta = [0.0] * n

    def observe(self, x: list[float], seconds: float) -> None:
        """Plain floats (a 3x3 solve): cheaper than tensors at the size of a small model's step.

        A time above BURST x the prediction is cut to it: one step stalled by another process on a
        shared machine must not flip the choice; a lasting change still moves the fit within a few rounds.
        """
        if self.observations >= 3 and self.predict(x) > 0:
            seconds = min(seconds, BURST * self.predict(x))
        f, n = self.forget, len(x)
        for i in range(n):
            self.xty[i] = f * self.xty[i] + x[i] * seconds
            for j in range(n):
                self.xtx[i][j] = f * self.xtx[i][j] + x[i] * x[j]
        self.observations += 1
        a = [row[:] + [self.xty[i]] for i, row in enumerate(self.xtx)]
        for i in range(1, n):
            a[i][i] += self.ridge
        theta = _solve(a)
        if theta is not None:
            self.theta = theta

    def predict(self, x: list[float]) -> float:
        return max(sum(a * b for a, b in zip(x, self.theta)), 0.0)


def _solve(a: list[list[float]]) -> list[float] | None:
    """Gaussian elimination with partial pivoting of an augmented n x (n+1) system; None if singular."""
    n = len(a)
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(a[r][c]))
        if abs(a[p][c]) < 1e-300:
            return None
        a[c], a[p] = a[p], a[c]
        for r in range(c + 1, n):
            k = a[r][c] / a[c][c]
            for j in range(c, n + 1):
                a[r][j] -= k * a[c][j]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (a[r][n] - sum(a[r][j] * x[j] for j in range(r + 1, n))) / a[r][r]
    return x


class Acceptance:
    """Per-token acceptance of a level: successes / trials, forgotten, with a Beta(1, 1) prior.

    A verified chain stops at its first rejection: `accepted` of `proposed` tokens is
    `accepted` successes in accepted + (1 if accepted < proposed) trials.
    """

    def __init__(self, forget: float = 0.95, prior: float = 1.0) -> None:
        self.forget, self.prior = forget, prior
        self.successes = self.trials = 0.0

    def observe(self, accepted: int, rejections: int) -> None:
        if accepted + rejections:
            self.successes = self.forget * self.successes + accepted
            self.trials = self.forget * self.trials + accepted + rejections

    @property
    def rate(self) -> float:
        return (self.successes + self.prior) / (self.trials + 2 * self.prior)


class HiddenShare:
    """The share of an L3 pass during which pipelined rounds can draft (its copy waits), forgotten; 0 before any.

    A pass whose pre-draft ran to its end measures it: hidden drafting / the pass's time. A pass whose
    pre-draft was complete first hid all it had, so the waits may hold more: it counts as 1 (optimism,
    so that a longer gamma is tried; its pre-draft then measures the waits).
    """

    def __init__(self, forget: float = 0.95) -> None:
        self.forget, self.total, self.weight = forget, 0.0, 0.0

    def observe(self, m: RoundMeasurement) -> None:
        share = 1.0 if m.predraft_finished else min(m.overlap_s / m.l3_s, 1.0) if m.l3_s > 0 else 0.0
        self.total = self.forget * self.total + share
        self.weight = self.forget * self.weight + 1.0

    @property
    def rate(self) -> float:
        return self.total / self.weight if self.weight else 0.0


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


class Estimates:
    """The running cost and acceptance estimates, and the expected s/token of a candidate."""

    def __init__(self, forget: float = 0.95) -> None:
        self.l3 = LinearCost(3, forget)  # [1, context / CONTEXT_UNIT, rows - 1]
        self.l2 = LinearCost(2, forget)  # per round: [forwards, rows - forwards]
        self.l1 = LinearCost(1, forget)  # per round: [forwards]
        self.l3_acceptance = Acceptance(forget)  # of L2 tokens
        self.l2_acceptance = Acceptance(forget)  # of L1 tokens
        self.hidden = HiddenShare(forget)  # of an L3 pass, by pipelined rounds' drafting

    def observe(self, context: int, m: RoundMeasurement) -> None:
        self.l3.observe([1.0, context / CONTEXT_UNIT, m.l3_rows - 1.0], m.l3_s)
        if m.proposed:
            self.l3_acceptance.observe(m.accepted, int(m.accepted < m.proposed))
        if m.l2_forwards:
            self.l2.observe([float(m.l2_forwards), float(m.l2_rows - m.l2_forwards)], m.l2_s)
        if m.l1_forwards:
            self.l1.observe([float(m.l1_forwards)], m.l1_s)
            self.l2_acceptance.observe(m.l1_accepted, m.l1_rejections)
        if m.pipelined:
            self.hidden.observe(m)

    def costs(self, context: int, gamma: int, draft_gamma: int) -> PhaseCosts:
        """Predicted phase costs of a round with these settings at this context."""
        l3 = self.l3.predict([1.0, context / CONTEXT_UNIT, float(gamma)])
        l2 = self.l2.predict([1.0, float(draft_gamma)])  # an L2 step checks draft_gamma L1 tokens
        return PhaseCosts(self.l1.predict([1.0]), l2, l3)

    def seconds_per_token(self, context: int, gamma: int, draft_gamma: int) -> float:
        return round_seconds_per_token(self.costs(context, gamma, draft_gamma), self.l3_acceptance.rate, gamma,
                                       self.l2_acceptance.rate, draft_gamma, self.hidden.rate)

    def best(self, context: int, candidates: list[tuple[int, int]]) -> tuple[float, int, int]:
        """(expected s/token, gamma, draft gamma) of the best (gamma, draft gamma) candidate.

        The same arithmetic as seconds_per_token, with each phase cost predicted once per call.
        """
        ctx = context / CONTEXT_UNIT
        l3 = {g: self.l3.predict([1.0, ctx, float(g)]) for g in {g for g, _ in candidates}}
        l2 = {d: self.l2.predict([1.0, float(d)]) for d in {d for _, d in candidates}}
        l1, a3, a2, hidden = self.l1.predict([1.0]), self.l3_acceptance.rate, self.l2_acceptance.rate, self.hidden.rate
        return min((round_seconds_per_token(PhaseCosts(l1, l2[d], l3[g]), a3, g, a2, d, hidden), g, d)
                   for g, d in candidates)

    def best_draft_gamma(self, max_draft_gamma: int) -> int:
        """The draft gamma with the cheapest L2 drafting per L2 token (L1 steps included)."""
        l1, a2 = self.l1.predict([1.0]), self.l2_acceptance.rate

        def per_token(d: int) -> float:
            costs = PhaseCosts(l1, self.l2.predict([1.0, float(d)]), 0.0)
            return seconds_per_token(costs, expected_tokens_per_pass(a2, d), 1.0, float(d))

        return min(range(1, max_draft_gamma + 1), key=per_token)

    def as_dict(self, context: int) -> dict:
        t3 = self.l3.theta
        return {"l3_pass_s": {"fixed": t3[0], "per_1k_context": t3[1], "per_extra_row": t3[2],
                              "at_context": self.l3.predict([1.0, context / CONTEXT_UNIT, 0.0])},
                "l2_step_s": {"fixed": self.l2.theta[0], "per_extra_row": self.l2.theta[1]},
                "l1_step_s": self.l1.theta[0],
                "l3_acceptance_of_l2": self.l3_acceptance.rate, "l2_acceptance_of_l1": self.l2_acceptance.rate,
                "l3_share_drafting_hides_in": self.hidden.rate}


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
