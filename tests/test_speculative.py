"""The verification rule turns proposals drawn from q into samples of p (vectorised, many samples)."""
from __future__ import annotations

import pytest
import torch

from offload_runtime.sampling import SamplingParams, probabilities, sample, top_p_filter
from offload_runtime.speculative import residual, speculative_accept, verify

N = 200_000


def _pairs():
    g = torch.Generator().manual_seed(0)
    v = 7
    pairs = []
    for sharp_p, sharp_q in [(1.0, 1.0), (3.0, 0.5), (0.5, 3.0)]:
        p = torch.softmax(sharp_p * torch.randn(v, generator=g), -1)
        q = torch.softmax(sharp_q * torch.randn(v, generator=g), -1)
        pairs.append((p, q))
    p = torch.softmax(torch.randn(v, generator=g), -1)
    pairs.append((top_p_filter(p, 0.8), top_p_filter(torch.softmax(torch.randn(v, generator=g), -1), 0.7)))
    return pairs


def _emitted_first_token(p, q, rule, gen):
    """One proposal x ~ q per sample; the emitted first token (accepted x, or the replacement)."""
    x = sample(q.expand(N, -1), gen)
    p2 = torch.stack([p, p]).expand(N, -1, -1)  # p at the proposal and at the bonus position
    n, nxt = rule(x[:, None], q.expand(N, 1, -1), p2, gen)
    return torch.where(n == 1, x, nxt)


def _wrong_rule(tokens, q, p, gen):
    """Samples from q at a rejection (the reference code's bug): must be caught by the test."""
    n, _ = speculative_accept(tokens, q, p, gen)
    return n, sample(q[:, 0], gen)


def _tv(counts, p):
    return 0.5 * (counts / counts.sum() - p).abs().sum().item()


@pytest.mark.parametrize("i", range(4))
def test_first_token_has_target_distribution(i):
    p, q = _pairs()[i]
    gen = torch.Generator().manual_seed(i)
    out = _emitted_first_token(p, q, speculative_accept, gen)
    counts = torch.bincount(out, minlength=p.numel()).float()
    # the bound: 5 sigma of the binomial noise per token, summed
    bound = 0.5 * sum(5 * (pi * (1 - pi) / N) ** 0.5 for pi in p.tolist())
    assert _tv(counts, p) < bound
    assert counts[p == 0].sum() == 0  # top-p truncated tokens never come out
    wrong = torch.bincount(_emitted_first_token(p, q, _wrong_rule, gen), minlength=p.numel()).float()
    assert _tv(wrong, p) > 3 * bound, "the test must be able to fail on a wrong rejection rule"


def test_block_of_two_and_bonus_token():
    """gamma = 2: the joint law of the first two emitted tokens is p1 x p2 (independent positions here)."""
    g = torch.Generator().manual_seed(3)
    v = 5
    p = torch.softmax(2 * torch.randn(3, v, generator=g), -1)
    q = torch.softmax(torch.randn(2, v, generator=g), -1)
    x = torch.stack([sample(q[0].expand(N, -1), g), sample(q[1].expand(N, -1), g)], 1)
    n, nxt = speculative_accept(x, q.expand(N, -1, -1), p.expand(N, -1, -1), g)
    first = torch.where(n >= 1, x[:, 0], nxt)
    second = torch.where(n == 2, x[:, 1], nxt)[n >= 1]  # the second emitted token exists when the first passed
    bonus = nxt[n == 2]
    for got, want in [(first, p[0]), (second, p[1]), (bonus, p[2])]:
        counts = torch.bincount(got, minlength=v).float()
        bound = 0.5 * sum(5 * (pi * (1 - pi) / counts.sum().item()) ** 0.5 for pi in want.tolist())
        assert _tv(counts, want) < bound


def test_greedy_is_exact_argmax_matching():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(1))
    p = probabilities(logits, SamplingParams(0.0))
    target = logits.argmax(-1).tolist()
    q_tokens = target[:2] + [(target[2] + 1) % 11, target[3]]
    q = torch.nn.functional.one_hot(torch.tensor(q_tokens), 11).float()
    for _ in range(50):
        n, nxt = verify(q_tokens, q, p)
        assert (n, nxt) == (2, target[2])
    n, nxt = verify(target[:4], torch.nn.functional.one_hot(torch.tensor(target[:4]), 11).float(), p)
    assert (n, nxt) == (4, target[4])


def test_residual_is_normalised_and_safe():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.2, 0.3, 0.5])
    assert torch.allclose(residual(p, q), torch.tensor([0.6, 0.4, 0.0]))
    assert torch.equal(residual(p, p), p)


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert torch.allclose(top_p_filter(probs, 0.7), torch.tensor([0.0, 0.625, 0.375, 0.0]))
    assert torch.allclose(top_p_filter(probs, 0.5), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.allclose(top_p_filter(probs, 1.0), probs)
