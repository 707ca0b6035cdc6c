"""Extreme but valid sampling parameters give a real distribution, never NaN (found by the server's fuzz
review: temperature 1e-300 or top_p 1e-300 returned the last token id every step)."""
from __future__ import annotations

import pytest
import torch

from offload_runtime.sampling import SamplingParams, probabilities, sample


@pytest.mark.parametrize("temperature", [1e-3, 1e-20, 1e-45, 1e-300, 5e-324])
def test_a_tiny_temperature_is_the_argmax(temperature):
    logits = torch.tensor([[1.0, 3.5, 3.25, -2.0], [900.0, -900.0, 899.0, 0.0]])
    probs = probabilities(logits, SamplingParams(temperature))
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(2))
    assert probs.argmax(-1).tolist() == [1, 0] and (probs.max(-1).values > 0.99).all()
    assert sample(probs, torch.Generator().manual_seed(0)).tolist() == [1, 0]


@pytest.mark.parametrize("top_p", [1e-300, 1e-50, 1e-8])
def test_a_tiny_top_p_keeps_the_most_likely_token(top_p):
    logits = torch.tensor([[0.1, 0.3, 0.2], [2.0, 1.0, 0.0]])
    probs = probabilities(logits, SamplingParams(1.0, top_p))
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))


def test_ordinary_parameters_are_unchanged():
    """The fp64 path is only for tiny temperatures: at 0.7 the result is softmax(logits / 0.7) as before."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(probabilities(logits, SamplingParams(0.7)), torch.softmax(logits / 0.7, dim=-1))
