"""The round policy is the decode loop's one seam: whatever it chooses (speculate or not, any gamma),
the tokens stay the target's greedy tokens, and it hears what every round did."""
from __future__ import annotations

import pytest
import torch

from offload_runtime import loading
from offload_runtime.adaptive import AdaptiveSpeculation
from offload_runtime.session import Session
from offload_runtime.settings import EngineSettings
from offload_runtime.generate import generate_autoregressive
from offload_runtime.policy import FixedPolicy, RoundChoice, RoundOutcome
from offload_runtime.sampling import SamplingParams

GREEDY = SamplingParams(0.0)
SETTINGS = EngineSettings(budget=48, chunk_size=8, gamma=3, draft_gamma=2, sinks=4, window=64)


class Scripted:
    """Cycles through a list of choices and records every call."""

    def __init__(self, choices: list[RoundChoice]) -> None:
        self.choices, self.asked, self.outcomes = choices, [], []

    def next_round(self, remaining: int, context: int) -> RoundChoice:
        self.asked.append((remaining, context))
        return self.choices[(len(self.asked) - 1) % len(self.choices)]

    def observe(self, outcome: RoundOutcome) -> None:
        self.outcomes.append(outcome)


@pytest.fixture(scope="module")
def models(checkpoint):
    load = lambda path: loading.load(str(path), torch.device("cpu"), with_tokenizer=False).model  # noqa: E731
    return load(checkpoint("llama", num_hidden_layers=2)), load(checkpoint("llama", seed=3, num_hidden_layers=1))


@pytest.fixture(scope="module")
def prompt(tokenizer, long_text):
    return tokenizer(long_text)["input_ids"][:90]


@pytest.mark.parametrize("with_draft", [False, True])
def test_any_choice_sequence_is_lossless(models, prompt, with_draft):
    target, draft = models
    want = generate_autoregressive(target, prompt, 24, GREEDY, []).token_ids
    policy = Scripted([RoundChoice(True, 2, 1), RoundChoice(False), RoundChoice(True, 9, 5), RoundChoice(True, 1, 3),
                       RoundChoice(True, 4, 0)])  # draft gamma 0: L1 unused this round (the adaptive controller)
    session = Session(target, draft if with_draft else None, GREEDY, [], SETTINGS, policy=policy)
    session.extend(prompt)
    got = session.generate(24)
    assert got.token_ids == want
    # one next_round and one observe per round; the outcomes add up to the answer
    assert len(policy.asked) == len(policy.outcomes) >= 4
    assert 1 + sum(o.emitted for o in policy.outcomes) == len(want)  # the first token comes from the prefill
    assert all(o.proposed == 0 for o in policy.outcomes if not o.choice.speculate)
    assert any(o.proposed > 0 for o in policy.outcomes if o.choice.speculate)
    assert [c for _, c in policy.asked] == [len(prompt) + 1 + sum(o.emitted for o in policy.outcomes[:i])
                                            for i in range(len(policy.outcomes))]
    assert all(o.seconds["l3"] > 0 for o in policy.outcomes)
    assert all(o.l3_rows == o.proposed + 1 and not o.pipelined for o in policy.outcomes)  # (on-device: unpipelined)
    assert got.stats["l3_passes"] == len(policy.outcomes)
    assert session.full.length == len(session.context) - 1 == session.retrieval.length  # L2 kept in step
    for o in policy.outcomes:  # the adaptive controller's cost inputs
        assert o.l2_rows >= o.l2_forwards and (o.l2_forwards > 0) == (o.choice.speculate and o.proposed > 0)
        l1_used = with_draft and o.choice.speculate and o.choice.draft_gamma > 0 and o.proposed > 0
        assert (o.l1_forwards > 0) == l1_used and o.l1_rejections <= o.l2_forwards


def test_default_policy_is_the_settings(models, prompt):
    target, _ = models
    session = Session(target, None, GREEDY, [], SETTINGS)
    assert isinstance(session.policy, FixedPolicy) and session.policy.next_round(10, 100) == RoundChoice(True, 3, 2)
    session.use("autoregressive")
    assert session.policy.next_round(10, 100) == RoundChoice(False, 3, 2)


def test_default_policy_is_adaptive_unless_both_gammas_are_fixed(models):
    target, draft = models
    auto = EngineSettings(budget=48, chunk_size=8, sinks=4, window=64)
    assert isinstance(Session(target, draft, GREEDY, [], auto).policy, AdaptiveSpeculation)
    assert isinstance(Session(target, None, GREEDY, [], auto).policy, AdaptiveSpeculation)
    only_gamma = EngineSettings(budget=48, chunk_size=8, gamma=3, sinks=4, window=64)
    assert isinstance(Session(target, draft, GREEDY, [], only_gamma).policy, AdaptiveSpeculation)  # draft gamma chosen
    assert isinstance(Session(target, None, GREEDY, [], only_gamma).policy, FixedPolicy)  # no draft: nothing to choose
    assert isinstance(Session(target, draft, GREEDY, [], auto, mode="autoregressive").policy, FixedPolicy)
