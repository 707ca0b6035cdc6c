"""The cost model of a speculative round: expected tokens per pass and seconds per emitted token.

One implementation, used by the engine's adaptive controller (offload_runtime/adaptive.py) to
choose gamma online, and by the benchmarks' projections (bench/cost_model.py, bench/pipeline_bench.py).

A round costs one L3 pass plus the L2 and L1 steps that drafted it, and yields on average
`expected_tokens_per_pass` tokens:

    s/token = (t_L3 + n_L2 * t_L2 + n_L1 * t_L1) / accepted_per_pass

For a chain of gamma proposals each accepted with probability a (independently), the
verifier emits the accepted prefix plus one token of its own: (1 - a^(gamma+1)) / (1 - a)
tokens per pass (gamma + 1 at a = 1; 1 at a = 0). Autoregressive decoding is gamma = 0.

A pipelined round (offload_runtime/pipelined.py) drafts the next round inside its L3 pass's
copy waits; that drafting is off the critical path only when the next round uses it, i.e.
when every proposal and the pre-draft's first token are accepted (pipelined_round_seconds).
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


def pipelined_round_seconds(l3_pass_s: float, draft_s: float, first_token_s: float, used: float,
                            hideable_s: float) -> float:
    """Expected seconds of a pipelined round: `draft_s` of drafting at its start, then an L3 pass during
    whose copy waits (`hideable_s` of it) the next round is pre-drafted: first its token x1 (`first_token_s`;
    x1 takes the bonus token's place), then as much of the next round's draft as fits. The pre-draft stops
    when the pass ends (it never lengthens it). With probability `used` (every proposal and x1 accepted)
    the next round starts from it and skips that much of its drafting; otherwise it drafts from scratch:

        round = l3 + draft - used * min(draft, max(0, hideable - first_token))

    Nothing hideable: the unpipelined l3 + draft. A whole pass hideable and a pre-draft (x1 + draft) that
    fits in it: max(l3, pre-draft) + (1 - used) * draft.
    """
    saved = min(draft_s, max(0.0, hideable_s - first_token_s))
    return l3_pass_s + draft_s - used * saved


def round_seconds_per_token(costs: PhaseCosts, acceptance: float, gamma: int, draft_acceptance: float = 0.0,
                            draft_gamma: int = 0, overlap: float = 0.0) -> float:
    """Expected seconds per emitted token of rounds with these settings (gamma 0: autoregressive).

    `overlap`: the share of the L3 pass whose copy waits pipelined rounds draft in (0: unpipelined). The
    pre-draft is used with probability acceptance^(gamma + 1) (all gamma proposals and x1 accepted); the
    tokens per pass are the same as unpipelined (an accepted x1 is the bonus token).
    """
    l2, l1 = drafting_steps(gamma, draft_acceptance, draft_gamma) if gamma else (0.0, 0.0)
    tokens = expected_tokens_per_pass(acceptance, gamma)
    if overlap <= 0.0 or not gamma:
        return seconds_per_token(costs, tokens, l2, l1)
    draft = l2 * costs.l2_step_s + l1 * costs.l1_step_s
    used = min(max(acceptance, 0.0), 1.0) ** (gamma + 1)
    round_s = pipelined_round_seconds(costs.l3_pass_s, draft, draft / gamma, used, overlap * costs.l3_pass_s)
    return round_s / max(tokens, 1e-9)
