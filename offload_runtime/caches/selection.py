"""How L2 scores the context's chunks: the scorers behind the retrieval cache's selection.

A scorer maps one layer's prompt keys [Hkv, n, D] (n a whole number of chunks) and the
current query [Hq, D] to a score per KV head and chunk [Hkv, n / chunk]; the retrieval cache
keeps chunk 0 (the attention sinks) and the best-scoring others up to its budget. The engine
uses `mean-key` (TriForce's: each chunk's mean key against the query). The others are the
retrieval benchmark's baselines (bench/retrieval_bench.py): `attention`, the oracle (the true
attention mass of the query on each chunk: it reads every key, so it is a measuring stick
rather than a policy), `recent` (StreamingLLM: sinks and the most recent chunks) and
`random`.
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


def attention_mass_scores(keys: torch.Tensor, query: torch.Tensor, chunk: int) -> torch.Tensor:
    """The oracle: the query's softmax attention mass on each chunk, the query heads of a KV head added."""
    hkv, n, d = keys.shape
    q = query.to(keys.device).float().reshape(hkv, -1, d)  # [Hkv, G, D]
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
    "mean-key": mean_key_scores, "attention": attention_mass_scores, "recent": recency_scores, "random": random_scores,
}
