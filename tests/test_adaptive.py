"""The adaptive speculation controller, driven by a fake engine (seeded costs and acceptance; nothing timed)."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from bench import cost_model
from offload_runtime import cost
from offload_runtime.adaptive import AdaptiveSpeculation, BackOff, RoundMeasurement, kind_of
from offload_runtime.estimates import HiddenShare, LinearCost
from offload_runtime.policy import RoundChoice, RoundOutcome


class FakeEngine:
    """Runs the rounds a controller chooses: costs from formulas, acceptance from seeded coin flips."""

    def __init__(self, l3=lambda ctx, rows: 0.1 + 0.002 * rows, l2=lambda rows: 0.01, l1=0.001,
                 a3=0.9, a2=0.8, context=1000, seed=0) -> None:
        self.l3, self.l2, self.l1, self.a3, self.a2 = l3, l2, l1, a3, a2
        self.context, self.rng = context, random.Random(seed)
        self.hideable: float | None = None  # pipelined rounds: the share of a pass drafting fits in (None: off)
        self.tell = True  # pipelined: the outcome says so (False: a controller blind to the overlap)
        self.carried = 0  # pre-drafted tokens the next round starts from
        self.choices: list[RoundChoice] = []
        self.seconds = self.tokens = 0.0

    def _chain(self, a: float, k: int) -> int:
        n = 0
        while n < k and self.rng.random() < a:
            n += 1
        return n

    def measure(self, choice: RoundChoice) -> tuple[RoundMeasurement, int]:
        if not choice.speculate:
            self.carried = 0
            return RoundMeasurement(l3_s=self.l3(self.context, 1), l3_rows=1), 1
        if self.hideable is not None:
            return self.pipelined(choice.gamma)
        m = RoundMeasurement(l3_s=self.l3(self.context, choice.gamma + 1), l3_rows=choice.gamma + 1)
        drafted = 0
        while drafted < choice.gamma:
            k = min(choice.draft_gamma, choice.gamma - drafted)
            n = self._chain(self.a2, k)
            m.l1_forwards += k
            m.l1_s += k * self.l1
            m.l1_accepted += n
            m.l1_rejections += int(n < k)
            m.l2_forwards += 1
            m.l2_rows += k + 1
            m.l2_s += self.l2(k + 1)
            drafted += n + 1
        m.proposed = choice.gamma
        m.accepted = self._chain(self.a3, choice.gamma)
        return m, m.accepted + 1

    def pipelined(self, gamma: int) -> tuple[RoundMeasurement, int]:
        """A pipelined round, L2 alone (pipelined.py): the pre-draft (x1, then the next round) gets the steps
        that fit in the pass's copy waits; it is used when every proposal and x1 are accepted."""
        step, l3 = self.l2(1), self.l3(self.context, gamma + 1)
        start = max(0, gamma - self.carried)
        want = gamma + 1
        done = min(want, int(self.hideable * l3 / step + 1e-9))
        n = self._chain(self.a3, gamma)
        x1 = n == gamma and done > 0
        x1_ok = x1 and self.rng.random() < self.a3
        self.carried = done - 1 if x1_ok else 0
        return RoundMeasurement(l3_s=l3, l3_rows=gamma + 1, proposed=gamma + x1, accepted=n + x1_ok,
                                l2_s=(start + done) * step, l2_forwards=start + done, l2_rows=start + done,
                                pipelined=self.tell, overlap_s=done * step, predraft_finished=done == want), n + 1

    def run(self, ctl: AdaptiveSpeculation, rounds: int) -> list[RoundChoice]:
        """The choices of these rounds; seconds/tokens accumulate over them."""
        self.seconds = self.tokens = 0.0
        start = len(self.choices)
        for _ in range(rounds):
            choice = ctl.next_round(1000, self.context)
            m, emitted = self.measure(choice)
            ctl.observe(outcome(choice, self.context, m, emitted))
            self.choices.append(choice)
            self.seconds += m.l3_s + m.l2_s + m.l1_s - m.overlap_s  # (the hidden drafting took no time of its own)
            self.tokens += emitted
            self.context += emitted
        return self.choices[start:]


def outcome(choice: RoundChoice, context: int, m: RoundMeasurement, emitted: int) -> RoundOutcome:
    """What the Session would report of this round (its L2 seconds include L1's)."""
    return RoundOutcome(choice, m.proposed, m.accepted, emitted, 0, m.l1_accepted,
                        {"l1": m.l1_s, "l2": m.l2_s + m.l1_s, "l3": m.l3_s, "overlap": m.overlap_s}, context,
                        m.l2_forwards, m.l2_rows, m.l1_forwards, m.l1_rejections, m.l3_rows, m.pipelined,
                        m.predraft_finished)


def test_measurement_of_an_outcome_round_trips():
    m = RoundMeasurement(l3_s=0.5, l3_rows=5, proposed=4, accepted=2, l2_s=0.2, l2_forwards=2, l2_rows=6,
                         l1_s=0.1, l1_forwards=4, l1_accepted=3, l1_rejections=1)
    assert vars(RoundMeasurement.of(outcome(RoundChoice(True, 4, 2), 100, m, 3))) == pytest.approx(vars(m))
    piped = RoundMeasurement(l3_s=0.5, l3_rows=5, proposed=5, accepted=5, l2_s=0.2, l2_forwards=9, l2_rows=9,
                             pipelined=True, overlap_s=0.1, predraft_finished=True)  # x1 verified: 5 proposed, 5 rows
    assert vars(RoundMeasurement.of(outcome(RoundChoice(True, 4, 0), 100, piped, 5))) == pytest.approx(vars(piped))


def kinds(choices: list[RoundChoice]) -> Counter:
    return Counter(kind_of(c) for c in choices)


def test_expected_tokens_per_pass_and_the_bench_shares_the_formula():
    assert cost.expected_tokens_per_pass(0.0, 6) == 1.0
    assert cost.expected_tokens_per_pass(1.0, 6) == 7.0
    assert cost.expected_tokens_per_pass(0.5, 2) == pytest.approx(1.75)
    assert cost_model.seconds_per_token is cost.seconds_per_token and cost_model.PhaseCosts is cost.PhaseCosts
    c = cost.PhaseCosts(l1_step_s=0.001, l2_step_s=0.01, l3_pass_s=1.0)
    assert cost.round_seconds_per_token(c, 0.3, 0) == 1.0  # gamma 0: an autoregressive step
    assert cost.round_seconds_per_token(c, 0.5, 2) == pytest.approx((1.0 + 2 * 0.01) / 1.75)
    l2, l1 = cost.drafting_steps(4, draft_acceptance=1.0, draft_gamma=3)  # L2 yields 4 tokens per check
    assert (l2, l1) == (1.0, 3.0)


def test_linear_cost_recovers_a_context_dependent_pass():
    fit = LinearCost(3)
    for i in range(40):
        ctx, rows = 1000 + 300 * i, 1 + i % 5
        fit.observe([1.0, ctx / 1024, rows - 1.0], 0.01 + 0.004 * ctx / 1024 + 0.002 * (rows - 1))
    assert fit.predict([1.0, 20000 / 1024, 3.0]) == pytest.approx(0.01 + 0.004 * 20000 / 1024 + 0.006, rel=0.02)


def test_falls_back_when_acceptance_is_zero_and_returns_when_it_rises():
    engine = FakeEngine(a3=0.0)
    ctl = AdaptiveSpeculation(has_draft=False)
    engine.run(ctl, 60)
    late = engine.run(ctl, 200)
    assert kinds(late)["speculative"] == 0 and kinds(late)["probe"] <= 5, kinds(late)
    ar = engine.l3(engine.context, 1)
    assert engine.seconds / engine.tokens < 1.05 * ar  # probing costs little against autoregressive steps
    engine.a3 = 0.95  # the text changes (a quote of the document, say)
    engine.run(ctl, 150)
    recent = engine.run(ctl, 50)
    assert kinds(recent)["speculative"] >= 45, kinds(recent)
    assert min(c.gamma for c in recent if kind_of(c) == "speculative") >= 4


def test_larger_gamma_when_the_l3_pass_is_expensive():
    def chosen(l3_s: float) -> float:
        engine = FakeEngine(l3=lambda ctx, rows: l3_s, l2=lambda rows: 0.01, a3=0.9, seed=1)
        engine.run(AdaptiveSpeculation(has_draft=False), 100)
        ctl = AdaptiveSpeculation(has_draft=False)
        late = engine.run(ctl, 200)[100:]
        assert kinds(late)["autoregressive"] == 0
        return sum(c.gamma for c in late) / len(late)

    cheap, expensive = chosen(0.05), chosen(1.0)
    assert 4 <= cheap <= 9  # the optimum at a = 0.9 is 6-7 here
    assert expensive >= 12 > cheap  # (the optimum is beyond the cap of 16)


def test_autoregressive_when_an_l2_step_costs_as_much_as_an_l3_pass():
    engine = FakeEngine(l3=lambda ctx, rows: 0.1 + 0.001 * rows, l2=lambda rows: 0.1, a3=0.7)
    ctl = AdaptiveSpeculation(has_draft=False)
    engine.run(ctl, 50)
    late = engine.run(ctl, 200)
    assert kinds(late)["autoregressive"] >= 190, kinds(late)


def test_l1_is_used_when_cheap_and_accepted_and_dropped_when_not():
    engine = FakeEngine(l3=lambda ctx, rows: 0.5, l2=lambda rows: 0.02 + 0.001 * rows, l1=0.001, a3=0.9, a2=0.9)
    ctl = AdaptiveSpeculation(has_draft=True)
    engine.run(ctl, 100)
    late = engine.run(ctl, 100)
    assert sum(c.draft_gamma > 0 for c in late) >= 95
    engine.a2 = 0.0  # the draft stops agreeing with L2: an L1 check yields one token for its L1 steps
    engine.l1 = 0.015
    engine.run(ctl, 100)
    late = engine.run(ctl, 200)
    assert sum(c.draft_gamma == 0 for c in late) >= 190, Counter(c.draft_gamma for c in late)
    assert kinds(late)["probe"] >= 2  # L1 is still re-tried now and then


def test_backoff_grows_and_resets():
    b = BackOff(first=2, cap=8)
    assert [b.tick(), b.tick(), b.tick()] == [False, False, True]
    b.failed()
    assert b.interval == 4 and [b.tick() for _ in range(5)] == [False, False, False, False, True]
    b.failed(), b.failed(), b.failed()
    assert b.interval == 8
    b.reset()
    assert b.interval == 2 and b.waited == 0
    # in the controller: the gaps between probes while autoregressive wins double up to the cap
    engine = FakeEngine(a3=0.0)
    ctl = AdaptiveSpeculation(has_draft=False, probe_first=4, probe_cap=32)
    choices = engine.run(ctl, 200)
    settled = max((i for i, c in enumerate(choices) if kind_of(c) == "speculative"), default=0)
    probes = [i for i, c in enumerate(choices) if kind_of(c) == "probe" and i > settled]
    gaps = [b - a - 1 for a, b in zip(probes, probes[1:])]  # autoregressive steps between probes
    assert all(kind_of(c) == "autoregressive" for c in choices[probes[0] + 1:] if kind_of(c) != "probe")
    assert gaps[0] >= 4 and all(b == min(2 * a, 32) for a, b in zip(gaps, gaps[1:])) and gaps[-1] == 32, gaps
    engine.a3 = 1.0
    engine.run(ctl, 100)
    assert ctl.ar_backoff.interval == 4  # speculation won back: the next fall-back probes soon again
    assert ctl.report()["rounds"]["speculative"] > 0


def test_one_unlucky_round_does_not_lock_speculation_out():
    engine = FakeEngine(a3=0.0, l3=lambda ctx, rows: 0.3, l2=lambda rows: 0.01)
    ctl = AdaptiveSpeculation(has_draft=False)
    engine.run(ctl, 3)  # warm-up: every proposal rejected
    engine.a3 = 0.9
    engine.run(ctl, 100)
    assert kinds(engine.run(ctl, 50))["speculative"] >= 45


def test_fixed_settings_are_obeyed():
    engine = FakeEngine(a3=0.0)
    fixed = engine.run(AdaptiveSpeculation(has_draft=True, gamma=5, draft_gamma=2), 20)
    assert {(kind_of(c), c.gamma, c.draft_gamma) for c in fixed} == {("speculative", 5, 2)}
    ctl = AdaptiveSpeculation(has_draft=True, gamma=5)  # gamma fixed: never autoregressive, draft gamma chosen
    chosen = engine.run(ctl, 50)
    assert {c.gamma for c in chosen} == {5}
    report = ctl.report()
    assert set(report["rounds"]) <= {"speculative", "probe"} and report["gamma_histogram"] == {5: 50}
    assert {"l3_pass_s", "l2_step_s", "l1_step_s", "l3_acceptance_of_l2"} <= set(report["estimates"])


def test_a_stalled_step_does_not_flip_the_choice():
    """A 50x stall of one autoregressive step (another process took the CPU) leaves autoregressive decoding
    chosen; a lasting slow-down of the L3 pass (a slower link, say) is followed within a few rounds."""
    engine = FakeEngine(a3=0.5, l3=lambda ctx, rows: 0.1, l2=lambda rows: 0.06)
    ctl = AdaptiveSpeculation(has_draft=False)
    engine.run(ctl, 40)
    stall = RoundChoice(False, 0, 0)
    ctl.observe(outcome(stall, engine.context, RoundMeasurement(l3_s=5.0, l3_rows=1), 1))
    assert kind_of(ctl.next_round(1000, engine.context)) == "autoregressive"
    engine.l3 = lambda ctx, rows: 1.0  # lasting: L3 ten times dearer, speculation pays (a = 0.5, L2 0.06 s)
    engine.run(ctl, 60)
    assert kinds(engine.run(ctl, 30))["speculative"] >= 25


def test_pipelined_round_cost_by_hand_and_its_limits():
    """round = l3 + draft - used * min(draft, max(0, hideable - x1's step)), checked by hand, in the limits
    where it is the unpipelined round, and where it is max(l3, pre-draft) + (1 - used) * draft."""
    l3, draft, x1 = 1.0, 0.4, 0.1
    assert cost.pipelined_round_seconds(l3, draft, x1, 0.5, 1.0) == pytest.approx(1.2)  # all of it saved half the time
    assert cost.pipelined_round_seconds(l3, draft, x1, 0.5, 0.3) == pytest.approx(1.3)  # 0.2 of it fits in the waits
    for hideable in (0.0, 0.05):  # no wait long enough for x1: nothing saved (not a negative saving)
        assert cost.pipelined_round_seconds(l3, draft, x1, 0.9, hideable) == pytest.approx(l3 + draft)
    assert cost.pipelined_round_seconds(l3, draft, x1, 0.0, 1.0) == pytest.approx(l3 + draft)  # never used: redrafted
    used = 0.3  # the whole pass hideable, the pre-draft (x1 + draft = 0.5) shorter than it
    assert cost.pipelined_round_seconds(l3, draft, x1, used, l3) == pytest.approx(max(l3, x1 + draft) + (1 - used) * draft)
    c = cost.PhaseCosts(l1_step_s=0.0, l2_step_s=0.1, l3_pass_s=1.0)  # gamma 4 at a = 0.5: used = 0.5^5
    assert cost.round_seconds_per_token(c, 0.5, 4, overlap=1.0) == pytest.approx((1.4 - 0.4 / 32) / 1.9375)
    assert cost.round_seconds_per_token(c, 0.5, 4, overlap=0.0) == pytest.approx(1.4 / 1.9375)
    assert cost.round_seconds_per_token(c, 0.5, 0, overlap=1.0) == 1.0  # an autoregressive step overlaps nothing


def test_the_pipeline_bench_projects_with_the_shared_formula(monkeypatch):
    from bench import pipeline_bench
    off = {"stats": {"time_l2_s": 4.0, "time_l3_s": 10.0, "l3_passes": 10, "l2_forwards": 40}}
    on = {"stats": {"time_overlapped_s": 3.0, "l3_passes": 10}}
    acc = {"all_accepted_share": 0.5, "acceptance": 0.8, "accepted_per_pass": 2.0}
    proj = pipeline_bench.projection(off, on, acc)
    assert proj["on_s_per_token"] == pytest.approx((1.0 + 0.4 - 0.4 * min(0.4, 0.3 - 0.1)) / 2.0)
    monkeypatch.setattr(cost, "pipelined_round_seconds", lambda *args: 7.0)
    assert pipeline_bench.projection(off, on, acc)["on_s_per_token"] == 3.5


def pipelined_choices(tell: bool, hideable: float = 1.0, seed: int = 2) -> tuple[FakeEngine, AdaptiveSpeculation,
                                                                                  list[RoundChoice]]:
    engine = FakeEngine(l3=lambda ctx, rows: 0.05, l2=lambda rows: 0.01, a3=0.95, seed=seed)
    engine.hideable, engine.tell = hideable, tell
    ctl = AdaptiveSpeculation(has_draft=False)
    engine.run(ctl, 100)
    return engine, ctl, engine.run(ctl, 300)


def test_pipelined_rounds_take_the_gamma_whose_predraft_fills_the_pass():
    """L3 pass 5 L2 steps, a = 0.95. Unpipelined the best gamma is 9-11; pipelined the drafting hides in the
    pass's copy waits but helps only when the pre-draft is used (every proposal and x1 accepted: a^(gamma+1)),
    so past the gamma whose pre-draft fills the pass (4) more drafting is on the critical path again and
    rarely used: the optimum moves DOWN, to 4 (0.0131 s/token by the formula, 0.0148 at gamma 10). The
    controller that sees the overlap finds it and is faster on the pipelined engine than one blind to it."""
    engine, ctl, late = pipelined_choices(tell=True)
    seen = engine.seconds / engine.tokens
    mean = sum(c.gamma for c in late if c.speculate) / len(late)
    assert 3 <= mean <= 5.5 and kinds(late)["autoregressive"] == 0, Counter(c.gamma for c in late)
    assert ctl.estimates.hidden.rate > 0.95
    blind_engine, blind, blind_late = pipelined_choices(tell=False)
    assert blind.estimates.hidden.rate == 0.0
    assert sum(c.gamma for c in blind_late) / len(blind_late) >= 8
    assert seen < 0.95 * blind_engine.seconds / blind_engine.tokens
    unpipelined = FakeEngine(l3=lambda ctx, rows: 0.05, l2=lambda rows: 0.01, a3=0.95, seed=2)
    unpipelined.run(AdaptiveSpeculation(has_draft=False), 100)
    assert seen < 0.85 * unpipelined.seconds / unpipelined.tokens  # (its controller: a fresh one on the same costs)


def test_hidden_share_is_measured_where_the_predraft_runs_out_of_waits():
    """A pre-draft cut short by the pass's end measures the share of the pass it hid in; one complete
    before the end counts as 1 (the waits may hold more: a longer gamma is worth trying); none: 0."""
    share = HiddenShare(forget=1.0)
    assert share.rate == 0.0
    share.observe(RoundMeasurement(l3_s=0.5, l3_rows=5, pipelined=True, overlap_s=0.1, predraft_finished=True))
    assert share.rate == 1.0
    share.observe(RoundMeasurement(l3_s=0.5, l3_rows=5, pipelined=True, overlap_s=0.1))
    assert share.rate == pytest.approx((1.0 + 0.2) / 2)
    # on the fake engine, 60% of the pass hides drafting: the estimate finds it, gamma lands between the
    # whole-pass choice (4) and the blind one (~10)
    engine, ctl, late = pipelined_choices(tell=True, hideable=0.6)
    assert ctl.estimates.hidden.rate == pytest.approx(0.6, abs=0.05)
    _, _, blind_late = pipelined_choices(tell=False, hideable=0.6)
    mean = sum(c.gamma for c in late) / len(late)
    assert 4.5 < mean < sum(c.gamma for c in blind_late) / len(blind_late) - 1.5, Counter(c.gamma for c in late)


@pytest.mark.parametrize("l3_s, reach", [(1.0, 2), (0.02, 5)])
def test_the_ramp_jumps_to_what_one_pass_affords(l3_s, reach):
    """After a fully accepted probe the next probe drafts what one L3 pass's time affords (the drafting
    wasted were all rejected): with a pass 100 L2 steps dear, the cap after the first probe; with a pass
    two steps dear, doubling (1, 2, 4, 8, 16)."""
    engine = FakeEngine(l3=lambda ctx, rows: l3_s, l2=lambda rows: 0.01, a3=1.0)
    ctl = AdaptiveSpeculation(has_draft=False)
    gammas = [c.gamma if c.speculate else 0 for c in engine.run(ctl, 8)]
    assert gammas[0] == 0 and gammas[1] == 1  # the warm-up step, then the first probe
    assert gammas.index(16) == reach, gammas
