"""The per-round choice of the decode loop: speculate (and how far) or take one plain step.

`Session.generate` asks `policy.next_round(...)` before every round and tells it the
outcome with `policy.observe(...)` after, so a controller that adapts gamma to the measured
acceptance and costs plugs in here without touching the loop. `FixedPolicy` is the default:
the EngineSettings' gamma and draft gamma every round (autoregressive mode: plain steps).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .settings import EngineSettings


@dataclass(frozen=True)
class RoundChoice:
    speculate: bool  # False: one autoregressive target step over the full cache
    gamma: int = 1  # L2 tokens drafted for one L3 pass (1 <= gamma < RECENT_QUERIES)
    draft_gamma: int = 1  # L1 tokens per L2 check (with a draft model)


@dataclass(frozen=True)
class RoundOutcome:
    """What one round did: tokens proposed to and accepted by L3 (and by L2 of L1), tokens emitted,
    the seconds each level spent, and the context length before the round."""
    choice: RoundChoice
    proposed: int
    accepted: int
    emitted: int
    l1_proposed: int = 0
    l1_accepted: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # "l1", "l2", "l3"
    context: int = 0


class RoundPolicy(Protocol):
    def next_round(self, remaining: int, context: int) -> RoundChoice:
        """The next round's shape; `remaining`: tokens the answer may still take, `context`: tokens held."""

    def observe(self, outcome: RoundOutcome) -> None:
        """Called after every round with what it did."""


class FixedPolicy:
    """The same round every time, from the settings: TriForce rounds, or plain steps in autoregressive mode."""

    def __init__(self, settings: EngineSettings, speculate: bool = True) -> None:
        self.choice = RoundChoice(speculate, settings.gamma, settings.draft_gamma)

    def next_round(self, remaining: int, context: int) -> RoundChoice:
        return self.choice

    def observe(self, outcome: RoundOutcome) -> None:
        pass
