"""L2's chunk scorers (caches/selection.py): each picks what it says, the engine's equals the kernel
reference, and whatever L2 selects, TriForce's greedy tokens stay the target's own."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from offload_runtime import loading
from offload_runtime.caches import selection
from offload_runtime.errors import UserError
from offload_runtime.generate import generate_autoregressive, generate_triforce
from offload_runtime.kernels import select_chunks_reference
from offload_runtime.kernels.reference import top_chunks
from offload_runtime.sampling import SamplingParams
from offload_runtime.settings import EngineSettings

HKV, G, D, C = 2, 2, 16, 4


def keys_and_query(n_chunks: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(HKV, n_chunks * C, D, generator=gen), torch.randn(HKV * G, D, generator=gen)


def test_mean_key_scores_select_like_the_kernel_reference():
    keys, query = keys_and_query()
    chunk_means = keys.reshape(HKV, -1, C, D).mean(2)
    ours = top_chunks(selection.mean_key_scores(keys, query, C), 5)
    assert torch.equal(ours, select_chunks_reference(chunk_means, query, 5))


def test_attention_mass_is_the_true_softmax_mass_per_chunk():
    keys, query = keys_and_query()
    mass = selection.attention_mass_scores(keys, query, C)
    assert mass.shape == (HKV, keys.shape[1] // C)
    torch.testing.assert_close(mass.sum(1), torch.full((HKV,), float(G)))  # each query head's mass sums to 1
    # one chunk's key aligned with every query head of KV head 1 takes its mass
    keys[1, 7 * C + 2] = 20 * query[G:].sum(0) / query[G:].sum(0).norm()
    assert selection.attention_mass_scores(keys, query, C)[1].argmax() == 7


def test_attention_mass_of_several_query_rows_adds_theirs():
    keys, query = keys_and_query()
    other = torch.randn(query.shape, generator=torch.Generator().manual_seed(5))
    both = selection.attention_mass_scores(keys, torch.stack([query, other], 1), C)
    torch.testing.assert_close(both, selection.attention_mass_scores(keys, query, C) +
                               selection.attention_mass_scores(keys, other, C))


def test_attention_mass_sees_a_key_a_chunk_mean_hides():
    """One sharp key in a chunk of opposite keys: its mean scores nothing, the oracle finds it."""
    keys, query = keys_and_query()
    keys.mul_(0.01)
    q = query[:G].sum(0)
    keys[0, 4 * C] = 8 * q / q.norm()
    keys[0, 4 * C + 1] = -8 * q / q.norm()
    assert selection.attention_mass_scores(keys, query, C)[0].argmax() == 4
    assert selection.max_key_scores(keys, query, C)[0].argmax() == 4
    assert selection.mean_key_scores(keys, query, C)[0].argmax() != 4


def test_max_key_is_each_chunks_best_key_against_the_summed_query():
    keys, query = keys_and_query()
    q = query.reshape(HKV, G, D).sum(1)
    want = torch.einsum("hd,hnd->hn", q, keys).reshape(HKV, -1, C).amax(-1)
    torch.testing.assert_close(selection.max_key_scores(keys, query, C), want)


def test_best_key_keeps_the_chunk_after_the_one_the_query_found():
    """A recalled span runs past the chunk its cue matched: the engine keeps the next chunk with it."""
    keys, query = keys_and_query()
    keys.mul_(0.01)
    q = query[:G].sum(0)
    keys[0, 4 * C + 3] = 8 * q / q.norm()  # the match at the end of chunk 4; the span goes on in chunk 5
    assert top_chunks(selection.best_key_scores(keys, query, C), 3)[0].tolist() == [0, 4, 5]
    assert 5 not in top_chunks(selection.max_key_scores(keys, query, C), 3)[0].tolist()


def test_recent_keeps_the_newest_chunks_and_random_is_seeded_by_length():
    keys, query = keys_and_query(n_chunks=10)
    assert top_chunks(selection.recency_scores(keys, query, C), 4).tolist() == [[0, 7, 8, 9]] * HKV
    a = selection.random_scores(keys, query, C)
    assert torch.equal(a, selection.random_scores(keys, query, C))
    assert not torch.equal(a, selection.random_scores(*keys_and_query(n_chunks=11), C)[:, :10])


def test_an_unknown_selection_is_refused():
    with pytest.raises(UserError, match="selection must be one of"):
        EngineSettings(selection="best")


@pytest.mark.parametrize("name", sorted(selection.SCORERS))
def test_every_selection_keeps_greedy_tokens_exact(checkpoint, name):
    model = loading.load(str(checkpoint("llama")), torch.device("cpu"), with_tokenizer=False).model
    prompt = torch.randint(2, model.cfg.vocab_size, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = generate_autoregressive(model, prompt, 24, SamplingParams(), []).token_ids
    settings = EngineSettings(budget=48, chunk_size=8, gamma=4, draft_gamma=1, selection=name)
    for s in (settings, replace(settings, refresh_every=1)):
        assert generate_triforce(model, None, prompt, 24, SamplingParams(), [], s).token_ids == expected
