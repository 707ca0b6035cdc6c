"""Draft/target compatibility is decided by the ids the models can emit, not by tokenizer length."""
from __future__ import annotations

import json

import pytest
import torch

from offload_runtime import loading, synthetic
from offload_runtime.run import main
from offload_runtime.vocabulary import check_same_vocabulary

PROMPT = "Kamiro telan vorsi lu den."
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)


def run_json(capsys, argv):
    code = main(argv + ["--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_target_padding_beyond_the_draft_rows_is_lossless(checkpoint, tokenizer, capsys):
    """A 1000-row target and a 320-row draft over the same 320-token tokenizer: the random target does
    emit padding ids the draft has no row for; the draft is fed a placeholder and the output stays the target's."""
    target = str(checkpoint("llama", vocab_size=1000, eos_token_id=None))
    draft = str(checkpoint("llama", seed=3, eos_token_id=None, **SMALL))
    common = ["--model", target, "--prompt", PROMPT, "--max-new-tokens", "24"]
    reference = run_json(capsys, common + ["--mode", "autoregressive"])["token_ids"]
    assert max(reference) >= len(tokenizer)  # the case under test: ids past the draft's 320 rows
    speculative = run_json(capsys, common + ["--draft", draft, "--gamma", "3", "--draft-gamma", "2"])
    assert speculative["token_ids"] == reference
    assert speculative["stats"]["l1_forwards"] > 0
    sampled = run_json(capsys, common + ["--draft", draft, "--temperature", "1", "--seed", "5"])
    assert len(sampled["token_ids"]) == 24


def test_target_tokens_beyond_the_draft_rows_are_refused(checkpoint, tmp_path, capsys):
    """Real tokens (not padding) at ids the draft cannot take: refused up front."""
    target = synthetic.make_checkpoint(tmp_path / "t", "llama", tokenizer=synthetic.train_tokenizer(vocab_size=400))
    code = main(["--model", str(target), "--draft", str(checkpoint("llama", seed=3, **SMALL)), "--prompt", PROMPT])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == "error: the target can emit token 'Ġpa' (id 320) but the draft has only 320 embedding rows: " \
                     "vocabularies differ"


def test_qwen2_target_with_llama_draft_over_the_same_tokenizer_files(checkpoint, capsys):
    """transformers loads a qwen2 checkpoint's tokenizer with an extra <|endoftext|> (321 entries vs 320):
    beyond both models' rows, so it does not count."""
    target_path, draft_path = checkpoint("qwen2"), checkpoint("llama", seed=3, **SMALL)
    target = loading.load(str(target_path), torch.device("cpu"))
    draft = loading.load(str(draft_path), torch.device("cpu"))
    assert len(target.tokenizer) == len(draft.tokenizer) + 1  # the case of the issue
    check_same_vocabulary(target, draft)
    out = run_json(capsys, ["--model", str(target_path), "--draft", str(draft_path), "--prompt", PROMPT,
                            "--max-new-tokens", "4"])
    assert len(out["token_ids"]) >= 1


def test_different_mappings_are_refused(checkpoint, tmp_path, capsys):
    other = synthetic.make_checkpoint(tmp_path / "d", "llama", tokenizer=synthetic.train_tokenizer(seed=1), **SMALL)
    code = main(["--model", str(checkpoint("llama")), "--draft", str(other), "--prompt", PROMPT])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: draft and target tokenizers map id ") and err[0].endswith("vocabularies differ")


@pytest.mark.parametrize("target_rows,draft_rows", [(320, 512), (512, 512)])
def test_padding_on_either_side_is_accepted(checkpoint, target_rows, draft_rows):
    target = loading.load(str(checkpoint("llama", vocab_size=target_rows)), torch.device("cpu"))
    draft = loading.load(str(checkpoint("llama", seed=3, vocab_size=draft_rows, **SMALL)), torch.device("cpu"))
    check_same_vocabulary(target, draft)
