"""The trained recall-320K model (assets/recall-320K, recall_task.py): it recalls records planted
thousands of tokens back, through the real loading path, and the engine's greedy tokens on it
equal transformers' own, whatever the L2 selection keeps."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from offload_runtime import loading, recall_task, trained
from offload_runtime.generate import generate_autoregressive, generate_triforce
from offload_runtime.sampling import SamplingParams
from offload_runtime.settings import EngineSettings

CONTEXT, FAR = 4096, 2048


@pytest.fixture(scope="module")
def recall_model():
    with trained.one_thread():
        yield loading.load(str(trained.RECALL), torch.device("cpu"), "float32")


def prompts(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [recall_task.recall_prompt(recall_task.document(rng, CONTEXT), rng, FAR) for _ in range(n)]


def test_it_recalls_records_planted_more_than_2k_tokens_back(recall_model):
    """Greedy decoding with the full cache copies the rest of a record seen > 2K tokens before its cue."""
    right = total = 0
    for prompt, expected in prompts(4, seed=7):
        got = generate_autoregressive(recall_model.model, prompt, len(expected), SamplingParams(), []).token_ids
        right += sum(g == e for g, e in zip(got, expected))
        total += len(expected)
    assert right / total >= 0.9


def test_streaming_alone_cannot_recall_so_the_task_needs_retrieval(recall_model):
    """The recall depends on the far chunks: with only sinks and a recent window in L2, L3 rejects
    most of what L2 proposes (so the retrieval benchmark measures something)."""
    prompt, expected = prompts(1, seed=8)[0]
    settings = EngineSettings(budget=256, chunk_size=8, gamma=4, draft_gamma=1)
    near = generate_triforce(recall_model.model, None, prompt, len(expected), SamplingParams(), [],
                             replace(settings, selection="recent"))
    ours = generate_triforce(recall_model.model, None, prompt, len(expected), SamplingParams(), [], settings)
    assert near.token_ids == ours.token_ids  # lossless either way
    assert near.stats["l3_acceptance_of_l2"] < 0.5 < ours.stats["l3_acceptance_of_l2"]


def test_engine_equals_transformers_generate(recall_model):
    prompt, expected = prompts(1, seed=9)[0]
    ref = AutoModelForCausalLM.from_pretrained(trained.RECALL, dtype=torch.float32).eval()
    want = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24)[0, len(prompt):].tolist()
    settings = EngineSettings(budget=CONTEXT // 16, chunk_size=8, gamma=6, draft_gamma=1)
    got = generate_triforce(recall_model.model, None, prompt, 24, SamplingParams(), [], settings).token_ids
    assert got == want
