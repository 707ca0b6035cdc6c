"""What the adaptive controller (adaptive.py) knows: running estimates of each level's cost and
acceptance, fitted from the rounds the engine reports, and the expected seconds per token they give
a candidate setting (scored with cost.py).

Exponentially forgotten, so a change of text or of machine load is followed: the cost of an L3 pass
as a linear function of context length and query rows, of an L2 step as a function of its query
rows, of an L1 step; the per-token acceptance of L3 for L2 tokens and of L2 for L1 tokens (each with
a prior of one accepted and one rejected token); and, for pipelined rounds, the share of an L3 pass
whose copy waits the next round's drafting fits in (0 until a pipelined round is observed).
"""
from __future__ import annotations

from dataclasses import dataclass

from .cost import PhaseCosts, expected_tokens_per_pass, round_seconds_per_token, seconds_per_token
from .policy import RoundOutcome

CONTEXT_UNIT = 1024.0  # context lengths enter the L3 fit in thousands of tokens (a well-scaled feature)
BURST = 3.0  # an observed time is cut to this multiple of the predicted one (see LinearCost.observe)


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
