"""Turns logits into tokens and verifies speculation, with every decision agreed across TP ranks.

Under tensor parallelism each rank runs the same loop; a sampled token or an acceptance
count is taken from rank 0 (`tp.agree_int`/`agree_ints`), so ranks stay in step. Doing it
here keeps the decoding loops free of TP (as gpt-fast does): they ask the sampler.
"""
from __future__ import annotations

import torch

from .policy import RoundChoice
from .sampling import SamplingParams, probabilities, sample
from .speculative import verify, verify_one
from .tp import agree_int, agree_ints


class Sampler:
    def __init__(self, params: SamplingParams, generator: torch.Generator | None = None) -> None:
        self.params, self.generator = params, generator

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """fp32 probabilities [..., V] tokens are drawn from (one-hot argmax at temperature 0)."""
        return probabilities(logits, self.params)

    def draw(self, dist: torch.Tensor) -> int:
        """One token from a distribution [V] (rank 0's under TP)."""
        return agree_int(int(sample(dist, self.generator)))

    def next_token(self, logits: torch.Tensor) -> int:
        """The token after logits [V]."""
        return self.draw(self.distribution(logits))

    def verify(self, drafted: list[int], q: torch.Tensor, p: torch.Tensor) -> tuple[int, int]:
        """(accepted count, next token): speculative verification of `drafted` ~ q against p (rank 0's)."""
        n, nxt = agree_ints(verify(drafted, q, p, self.generator))
        return n, nxt

    def agree(self, choice: RoundChoice) -> RoundChoice:
        """Rank 0's round choice: ranks time their own work, so an adaptive policy may differ across them."""
        speculate, gamma, draft_gamma, probe = agree_ints([choice.speculate, choice.gamma, choice.draft_gamma,
                                                           choice.probe])
        return RoundChoice(bool(speculate), gamma, draft_gamma, bool(probe))

    def verify_one(self, token: int, q: torch.Tensor, p: torch.Tensor) -> tuple[bool, int]:
        """(accepted, token to emit): one proposal ~ q [V] checked against p [V], no bonus draw (rank 0's)."""
        ok, tok = verify_one(token, q, p, self.generator)
        ok_i, tok = agree_ints((int(ok), tok))
        return bool(ok_i), tok
