"""Session.reconfigure: settings and sampling changed between answers reach every holder.

A benchmark once assigned `session.settings` for its "budget 1/8" run while the caches kept their
own copy, so L2 was rebuilt with the full budget and the cost model's input was wrong."""
from __future__ import annotations

import dataclasses

import torch

from offload_runtime import loading
from offload_runtime.generate import generate_autoregressive
from offload_runtime.sampling import SamplingParams
from offload_runtime.session import Session
from offload_runtime.settings import EngineSettings

SETTINGS = EngineSettings(budget=4096, chunk_size=8, gamma=4, draft_gamma=2)


def _session(checkpoint, tokenizer, long_text):
    target = loading.load(str(checkpoint("llama")), torch.device("cpu"), "float32").model
    prompt = tokenizer(long_text)["input_ids"][:200]
    session = Session(target, None, SamplingParams(), [], SETTINGS, torch.Generator(), "triforce",
                      capacity=len(prompt) + 64)
    session.extend(prompt)
    return target, session, prompt


def test_a_new_budget_reaches_the_retrieval_cache(checkpoint, tokenizer, long_text):
    target, session, prompt = _session(checkpoint, tokenizer, long_text)
    first = session.generate(6)
    assert first.stats["retrieval_rows"] == len(prompt)  # the budget holds the whole prompt
    session.truncate(len(prompt))
    session.reconfigure(dataclasses.replace(SETTINGS, budget=48))
    second = session.generate(6)
    assert second.stats["retrieval_rows"] == 48 and session.caches.settings.budget == 48
    want = generate_autoregressive(target, prompt, 6, SamplingParams(), [], torch.Generator()).token_ids
    assert first.token_ids == second.token_ids == want  # lossless at either budget


def test_assigning_settings_alone_is_the_bug_reconfigure_fixes(checkpoint, tokenizer, long_text):
    """Sabotage: the old way (an attribute assignment) leaves L2 at the old budget: the check above
    would catch it."""
    _, session, prompt = _session(checkpoint, tokenizer, long_text)
    session.use("autoregressive")
    session.settings = dataclasses.replace(SETTINGS, budget=48)
    session.use("triforce")
    assert session.generate(4).stats["retrieval_rows"] == len(prompt)  # not 48


def test_sampling_changes_between_answers(checkpoint, tokenizer, long_text):
    _, session, prompt = _session(checkpoint, tokenizer, long_text)
    params = SamplingParams(0.8, 0.9)
    session.reconfigure(params=params, generator=torch.Generator().manual_seed(5))
    a = session.generate(8).token_ids
    session.truncate(len(prompt))
    session.reconfigure(params=params, generator=torch.Generator().manual_seed(5))
    assert session.generate(8).token_ids == a and session.sampler.params is params
