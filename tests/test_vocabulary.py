"""Draft/target compatibility is decided by the ids the models can emit, not by tokenizer length."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from offload_runtime import loading, synthetic
from offload_runtime.generate import generate_triforce
from offload_runtime.settings import EngineSettings
from offload_runtime.generate import generate_autoregressive
from offload_runtime.run import main
from offload_runtime.sampling import SamplingParams
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
    sampled_argv = common + ["--draft", draft, "--gamma", "3", "--draft-gamma", "2", "--temperature", "1",
                             "--top-p", "0.5", "--seed", "5"]
    sampled = run_json(capsys, sampled_argv)["token_ids"]
    assert run_json(capsys, sampled_argv)["token_ids"] == sampled  # the seed fixes the draws
    assert sampled != reference
    # every sampled token lies in the target's top-p nucleus at its position (transformers' logits): a
    # token the draft proposed and the verification let through unchecked would fall outside it
    tok = loading.load_tokenizer(Path(target))
    outside, wide = nucleus_misses(target, tok(PROMPT)["input_ids"], sampled, top_p=0.5)
    assert outside == [] and wide > 0, (outside, wide)


def nucleus_misses(path, prompt: list[int], sampled: list[int], top_p: float) -> tuple[list[int], int]:
    """(positions whose sampled token is outside the target's top-p nucleus, positions with a nucleus of
    more than one token), from transformers' logits at temperature 1 (1e-4 of slack at the edge)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + sampled])).logits[0, len(prompt) - 1:-1]
    probs = torch.softmax(logits, -1)
    ranked, order = probs.sort(-1, descending=True)
    before = ranked.cumsum(-1) - ranked  # the mass of the more likely tokens
    outside, wide = [], 0
    for i, token in enumerate(sampled):
        rank = int((order[i] == token).nonzero())
        outside += [i] if before[i, rank] >= top_p + 1e-4 else []
        wide += int(before[i, 1] < top_p)
    return outside, wide


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
    triforce, reference = qwen2_llama_runs(target_path, draft_path, capsys)
    assert triforce["token_ids"] == reference["token_ids"] and len(reference["token_ids"]) >= 8
    assert triforce["stats"]["l1_forwards"] > 0 and triforce["stats"]["levels"] == 3  # the llama draft was used


def qwen2_llama_runs(target_path, draft_path, capsys) -> tuple[dict, dict]:
    """Greedy 3-level TriForce with the llama draft, and autoregressive decoding, through the CLI."""
    common = ["--model", str(target_path), "--prompt", PROMPT, "--max-new-tokens", "12"]
    triforce = run_json(capsys, common + ["--draft", str(draft_path), "--gamma", "3", "--draft-gamma", "2",
                                          "--budget", "16", "--chunk-size", "4"])
    return triforce, run_json(capsys, common + ["--mode", "autoregressive"])


def test_qwen2_llama_check_catches_unverified_proposals(checkpoint, capsys, monkeypatch):
    """Sabotage: L3 takes every proposal unverified. A token still comes out (the old check passed);
    the tokens are no longer autoregressive decoding's."""
    from offload_runtime.sampler import Sampler

    monkeypatch.setattr(Sampler, "verify", lambda self, drafted, q, p: (len(drafted), int(p[len(drafted)].argmax())))
    triforce, reference = qwen2_llama_runs(checkpoint("qwen2"), checkpoint("llama", seed=3, **SMALL), capsys)
    assert len(triforce["token_ids"]) >= 1 and triforce["token_ids"] != reference["token_ids"]


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
    check_same_vocabulary(target, draft)  # accepted (no UserError), and the pair then decodes losslessly:
    ids = target.tokenizer(PROMPT)["input_ids"]
    greedy = SamplingParams(0.0)
    settings = EngineSettings(budget=16, chunk_size=4, gamma=3, draft_gamma=2, sinks=4, window=40)
    got = generate_triforce(target.model, draft.model, ids, 12, greedy, [], settings)
    assert got.token_ids == generate_autoregressive(target.model, ids, 12, greedy, []).token_ids
    assert got.stats["l1_forwards"] > 0 and max(got.token_ids) < target_rows
