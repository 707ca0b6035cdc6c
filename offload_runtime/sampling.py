"""From logits to a distribution and a token: temperature, top-p, greedy.

Temperature 0 is represented as the one-hot distribution of the argmax, so the
speculative rules below apply unchanged and reduce to exact argmax matching.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


TINY_TEMPERATURE = 1e-4  # below it the distribution is computed relative to the max logit, in fp64


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., V] -> fp32 probabilities [..., V] of the distribution tokens are drawn from."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    if params.temperature >= TINY_TEMPERATURE:
        probs = torch.softmax(logits / params.temperature, dim=-1)
    else:  # in fp32 logits / T overflows (or T itself rounds to 0): 0/0 = NaN. Relative to the max, in fp64
        top = logits.max(-1, keepdim=True).values
        probs = torch.softmax((logits.double() - top) / params.temperature, dim=-1).float()
    if params.top_p < 1.0:
        probs = top_p_filter(probs, params.top_p)
    return probs


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p; renormalise."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    drop = mass_before >= top_p
    drop[..., 0] = False  # the most likely token always stays (a top_p that rounds to 0 in fp32 dropped all)
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs [..., V] (inverse-CDF draw, so one uniform per token)."""
    u = torch.rand(probs.shape[:-1] + (1,), generator=generator, device=probs.device)
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, u * cdf[..., -1:], right=True)
    return idx.clamp_(max=probs.shape[-1] - 1).squeeze(-1)
