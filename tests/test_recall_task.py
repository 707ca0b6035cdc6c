"""The recall task's data (recall_task.py): what the recall model is trained and measured on."""
from __future__ import annotations

import random

import pytest

from offload_runtime import recall_task as task


def test_documents_plant_unique_records_and_recall_one_far_back():
    rng = random.Random(0)
    doc = task.document(rng, 6000)
    assert len(doc.tokens) == 6000 and doc.tokens[0] == task.BOS
    symbols = [t for t in doc.tokens if t >= task.FIRST_SYMBOL]
    assert len(symbols) == len(set(symbols)) >= 8 * task.RECORD_LEN[0]  # unique: a recall has one source
    for start, body in doc.records:
        assert doc.tokens[start:start + len(body) + 2] == task.record(body)
    prompt, expected = task.recall_prompt(doc, rng, 4000)
    cue = prompt[-task.CUE:]
    start = next(s for s, body in doc.records if body[:task.CUE] == cue)
    assert len(doc.tokens) - start >= 4000
    assert prompt[:6000] == doc.tokens and prompt[6000] == task.OPEN
    assert doc.tokens[start + 1:start + 1 + task.CUE + len(expected) - 1] + [task.CLOSE] == cue + expected
    with pytest.raises(ValueError, match="no record"):
        task.recall_prompt(doc, rng, 6001)


def test_training_samples_jump_forward_within_the_context_and_repeat_records():
    rng = random.Random(1)
    for _ in range(20):
        tokens, positions = task.training_sample(rng, 512)
        assert len(tokens) == len(positions) == 512
        steps = [b - a for a, b in zip(positions, positions[1:])]
        assert min(steps) >= 1 and positions[-1] < task.MAX_CONTEXT
        for i, step in enumerate(steps):
            if step > 1:  # a jump falls between filler and a record, never inside one
                assert task.FIRST_FILLER <= tokens[i] < task.FIRST_SYMBOL and tokens[i + 1] == task.OPEN
    assert max(p[-1] for p in (task.training_sample(rng, 512)[1] for _ in range(20))) > 8000


def test_copy_mask_marks_recalled_symbols_but_the_first():
    o, c, f = task.OPEN, task.CLOSE, task.FIRST_FILLER
    s = [task.FIRST_SYMBOL + i for i in range(3)]
    tokens = [task.BOS, f, o, *s, c, f, o, *s, c]
    assert task.copy_mask(tokens) == [False] * 8 + [False, False, True, True, False]


def test_tokenizer_round_trips_a_document():
    tok = task.tokenizer()
    doc = task.document(random.Random(2), 300)
    text = tok.decode(doc.tokens)
    assert text.startswith("<s> w") and "<r> s" in text
    assert tok(text)["input_ids"] == doc.tokens
