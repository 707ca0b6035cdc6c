"""The cost model of a speculative round: expected tokens per pass and seconds per emitted token.

One implementation, used by the engine's adaptive controller (offload_runtime/adaptive.py) to
choose gamma online, and by the benchmark's projections (bench/cost_model.py).

A round costs one L3 pass plus the L2 and L1 steps that drafted it, and yields on average
`expected_tokens_per_pass` tokens:

    s/token = (t_L3 + n_L2 * t_L2 + n_L1 * t_L1) / accepted_per_pass

For a chain of gamma proposals each accepted with probability a (independently), the
verifier emits the accepted prefix plus one token of its own: (1 - a^(gamma+1)) / (1 - a)
tokens per pass (gamma + 1 at a = 1; 1 at a = 0). Autoregressive decoding is gamma = 0.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PhaseCosts:
    l1_step_s: float  # one draft-model forward (L1)
    l2_step_s: float  # one target forward over the retrieval cache (L2)
    l3_pass_s: float  # one target forward over the full cache (L3)


def expected_tokens_per_pass(acceptance: float, gamma: int) -> float:
    """Mean tokens a verifier emits from gamma proposals with per-token acceptance `acceptance`."""
    a = min(max(acceptance, 0.0), 1.0)
    if a >= 1.0 - 1e-12:
        return float(gamma + 1)
    return (1.0 - a ** (gamma + 1)) / (1.0 - a)


def seconds_per_token(costs: PhaseCosts, accepted_per_pass: float, l2_steps_per_pass: float,
                      l1_steps_per_pass: float) -> float:
    round_s = costs.l3_pass_s + l2_steps_per_pass * costs.l2_step_s + l1_steps_per_pass * costs.l1_step_s
    return round_s / max(accepted_per_pass, 1e-9)


def drafting_steps(gamma: int, draft_acceptance: float = 0.0, draft_gamma: int = 0) -> tuple[float, float]:
    """Expected (L2 steps, L1 steps) to draft gamma L2 tokens.

    Without L1 (draft_gamma 0) L2 decodes its gamma tokens one step each. With L1, each L2 step
    checks draft_gamma L1 proposals and yields expected_tokens_per_pass(draft_acceptance,
    draft_gamma) tokens, so gamma tokens take gamma / that many L2 steps (at least one).
    """
    if draft_gamma <= 0:
        return float(gamma), 0.0
    l2 = max(1.0, gamma / expected_tokens_per_pass(draft_acceptance, draft_gamma))
    return l2, l2 * draft_gamma


def round_seconds_per_token(costs: PhaseCosts, acceptance: float, gamma: int, draft_acceptance: float = 0.0,
                            draft_gamma: int = 0) -> float:
    """Expected seconds per emitted token of rounds with these settings (gamma 0: autoregressive)."""
    l2, l1 = drafting_steps(gamma, draft_acceptance, draft_gamma) if gamma else (0.0, 0.0)
    return seconds_per_token(costs, expected_tokens_per_pass(acceptance, gamma), l2, l1)
