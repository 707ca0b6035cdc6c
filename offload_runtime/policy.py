"""The per-round choice of the decode loop: speculate (and how far) or take one plain step.

`Session.generate` asks `policy.next_round(...)` before every round and tells it the
outcome with `policy.observe(...)` after, so a controller that adapts gamma to the measured
acceptance and costs plugs in here without touching the loop. `FixedPolicy` is the default:
the EngineSettings' gamma and draft gamma every round (autoregressive mode: plain steps).
In TriForce mode the Session uses the adaptive controller (adaptive.py) unless both are fixed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .settings import EngineSettings


@dataclass(frozen=True)
class RoundChoice:
    speculate: bool  # False: one autoregressive target step over the full cache
    gamma: int = 1  # L2 tokens drafted for one L3 pass (1 <= gamma < RECENT_QUERIES)
    draft_gamma: int = 1  # L1 tokens per L2 check (with a draft model; 0: L2 drafts alone this round)
    probe: bool = False  # a short round the adaptive controller runs to re-measure speculation (adaptive.py)


@dataclass(frozen=True)
class RoundOutcome:
    """What one round did: tokens proposed to and accepted by L3 (and by L2 of L1), tokens emitted,
    the seconds each level spent, and the context length before the round. A pipelined round
    (pipelined.py) pre-drafted the next round during its L3 pass: seconds["overlap"] is the drafting
    hidden in the pass's copy waits, `predraft_finished` whether the pre-draft was complete by its end."""
    choice: RoundChoice
    proposed: int
    accepted: int
    emitted: int
    l1_proposed: int = 0
    l1_accepted: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # "l1", "l2", "l3", "overlap" (l2 includes l1)
    context: int = 0
    l2_forwards: int = 0  # L2 forwards while drafting, and their query rows (the adaptive controller's costs)
    l2_rows: int = 0
    l1_forwards: int = 0
    l1_rejections: int = 0  # L2 checks that stopped at a rejected L1 token
    l3_rows: int = 0  # query rows of the L3 pass (0: proposed + 1; a pipelined round's x1 is proposed, not a row)
    pipelined: bool = False
    predraft_finished: bool = False


class RoundPolicy(Protocol):
    def next_round(self, remaining: int, context: int) -> RoundChoice:
        """The next round's shape; `remaining`: tokens the answer may still take, `context`: tokens held."""

    def observe(self, outcome: RoundOutcome) -> None:
        """Called after every round with what it did."""


class FixedPolicy:
    """The same round every time, from the settings: TriForce rounds, or plain steps in autoregressive mode."""

    def __init__(self, settings: EngineSettings, speculate: bool = True) -> None:
        gamma, draft_gamma = settings.gamma_limits(has_draft=False)
        self.choice = RoundChoice(speculate, gamma, draft_gamma)

    def next_round(self, remaining: int, context: int) -> RoundChoice:
        return self.choice

    def observe(self, outcome: RoundOutcome) -> None:
        pass
