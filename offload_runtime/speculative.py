"""Speculative-sampling verification: turns proposals drawn from q into samples of p.

Used at both levels of the hierarchy (L2 checking L1, L3 checking L2). For each
proposed x_i ~ q_i: accept with probability min(1, p_i(x_i) / q_i(x_i)); at the first
rejection draw from the residual norm(max(p_i - q_i, 0)); if every proposal is accepted
draw a bonus token from p_{g+1}. With one-hot (temperature 0) distributions this is
exactly "accept while x_i == argmax p_i, then emit argmax p".
"""
from __future__ import annotations

import torch

from .sampling import sample


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(p - q, 0)) row-wise; p itself where p == q (a rejection cannot happen there)."""
    r = (p - q).clamp_min_(0.0)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp_min(1e-30), p)


def speculative_accept(
    tokens: torch.Tensor, q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched verification.

    tokens [B, g] proposals; q [B, g, V] their proposal distributions; p [B, g+1, V] the
    verifier's distributions at the same positions plus one. Returns (accepted count
    [B], next token [B]): the emitted block is tokens[:n] followed by next.
    """
    batch, g = tokens.shape
    if g:
        p_x = p[:, :g].gather(-1, tokens[..., None]).squeeze(-1)
        q_x = q.gather(-1, tokens[..., None]).squeeze(-1)
        u = torch.rand(batch, g, generator=generator, device=p.device)
        ok = u * q_x < p_x  # strict: a token the verifier gives probability 0 is never accepted
        n = torch.cumprod(ok.long(), dim=1).sum(1)
    else:
        n = torch.zeros(batch, dtype=torch.long, device=p.device)
    rows = torch.arange(batch, device=p.device)
    p_n = p[rows, n]
    q_pad = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1) if g else torch.zeros_like(p)
    # at n == g every proposal passed: residual against a zero q is p_{g+1} itself (the bonus token)
    final = residual(p_n, q_pad[rows, n])
    return n, sample(final, generator)


def verify(tokens: list[int], q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None) -> tuple[int, int]:
    """One sequence: tokens (g proposals), q [g, V], p [g+1, V] -> (accepted, next token)."""
    t = torch.tensor([tokens], dtype=torch.long, device=p.device).reshape(1, len(tokens))
    n, nxt = speculative_accept(t, q[None], p[None], generator)
    return int(n[0]), int(nxt[0])


def verify_one(token: int, q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None) -> tuple[bool, int]:
    """One proposal token ~ q [V] against the verifier's p [V], with no bonus draw: (accepted, the token
    to emit: `token`, or a draw from the residual norm(max(p - q, 0)) after a rejection)."""
    u = torch.rand((), generator=generator, device=p.device)
    if u * q[token] < p[token]:
        return True, token
    return False, int(sample(residual(p[None], q[None]), generator)[0])
