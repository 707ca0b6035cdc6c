"""How L2 scores the context's chunks: the scorers behind the retrieval cache's selection.

A scorer maps one layer's prompt keys [Hkv, n, D] (n a whole number of chunks) and the
current query [Hq, D] to a score per KV head and chunk [Hkv, n / chunk]; the retrieval cache
keeps chunk 0 (the attention sinks) and the best-scoring others up to its budget. The engine
uses `best-key`: each chunk's best key against the query, and the chunk after a well-scored
one kept with it. It replaced TriForce's `mean-key` (each chunk's mean key), which the
retrieval benchmark (bench/retrieval_bench.py) found at 0.38x the oracle's tokens per L3 pass
on a recall at 4K tokens: a mean dilutes one sharp match by the chunk's other keys, and a
recalled span runs past the chunk the query found. The benchmark's other baselines:
`attention`, the oracle's (the true attention mass of the queries on each chunk: it reads
every key, and the benchmark gives it the queries of the tokens still to come, so it is a
measuring stick rather than a policy), `recent` (StreamingLLM: sinks and the most recent
chunks), `random`; and `max-key` (best-key without the next chunk).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..kernels import chunk_scores

Scorer = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
_MEAN_BLOCK = 1024  # chunks averaged at a time: no fp32 copy of a whole 128K-token layer


def mean_key_scores(keys: torch.Tensor, query: torch.Tensor, chunk: int) -> torch.Tensor:
    """Each chunk's mean key against the query (GQA: the query heads of a KV head add their scores)."""
    hkv, n, d = keys.shape
    n_chunks = n // chunk
    chunk_keys = torch.empty(hkv, n_chunks, d, dtype=torch.float32, device=keys.device)
    for a in range(0, n_chunks, _MEAN_BLOCK):
        b = min(n_chunks, a + _MEAN_BLOCK)
        chunk_keys[:, a:b] = keys[:, a * chunk : b * chunk].reshape(hkv, b - a, chunk, d).float().mean(2)
    return chunk_scores(chunk_keys.to(query.device), query)


def max_key_scores(keys: torch.Tensor, query: torch.Tensor, chunk: int) -> torch.Tensor:
    """Each chunk's best key against the query (the query heads of a KV head added): one sharp match
    in a chunk counts in full, where a mean dilutes it by the chunk's other keys."""
    hkv, n, d = keys.shape
    q = query.to(keys.device).float().reshape(hkv, -1, d).sum(1, keepdim=True)  # [Hkv, 1, D]
    out = torch.empty(hkv, n // chunk, dtype=torch.float32, device=keys.device)
    step = _MEAN_BLOCK * chunk
    for a in range(0, n, step):  # in blocks: no fp32 copy of a whole 128K-token layer
        b = min(n, a + step)
        out[:, a // chunk:b // chunk] = torch.matmul(q, keys[:, a:b].float().transpose(1, 2))[:, 0].reshape(
            hkv, -1, chunk).amax(-1)
    return out.to(query.device)


def best_key_scores(keys: torch.Tensor, query: torch.Tensor, chunk: int) -> torch.Tensor:
    """The engine's: each chunk's best key (max_key_scores), and a chunk right after a well-scored one
    scores as well as it: what the query found is where generation goes on reading (a recalled span
    runs into the next chunk), so the two are kept together."""
    scores = max_key_scores(keys, query, chunk)
    scores[:, 1:] = torch.maximum(scores[:, 1:], scores[:, :-1])
    return scores


def attention_mass_scores(keys: torch.Tensor, query: torch.Tensor, chunk: int) -> torch.Tensor:
    """The oracle: the query's softmax attention mass on each chunk, the query heads of a KV head added
    (query [Hq, D], or [Hq, R, D]: R query rows, their masses added)."""
    hkv, n, d = keys.shape
    q = query.to(keys.device).float().reshape(hkv, -1, d)  # [Hkv, G (x R), D]
    mass = torch.softmax(torch.matmul(q, keys.float().transpose(1, 2)) / d**0.5, dim=-1).sum(1)  # [Hkv, n]
    return mass.reshape(hkv, n // chunk, chunk).sum(-1).to(query.device)


def recency_scores(keys: torch.Tensor, query: torch.Tensor, chunk: int) -> torch.Tensor:
    """StreamingLLM: the newest chunks score highest (chunk 0, the sinks, is kept anyway)."""
    hkv, n, _ = keys.shape
    return torch.arange(n // chunk, dtype=torch.float32, device=query.device).expand(hkv, -1)


def random_scores(keys: torch.Tensor, query: torch.Tensor, chunk: int) -> torch.Tensor:
    """Random chunks, the same for a given context length (seeded by it)."""
    hkv, n, _ = keys.shape
    generator = torch.Generator().manual_seed(n)
    return torch.rand(hkv, n // chunk, generator=generator).to(query.device)


SCORERS: dict[str, Scorer] = {
    "best-key": best_key_scores, "mean-key": mean_key_scores, "max-key": max_key_scores, "attention": attention_mass_scores, "recent": recency_scores, "random": random_scores,
}
