"""Greedy `--mode autoregressive` equals transformers' generate(do_sample=False), through the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from offload_runtime.run import main

FAMILIES = {
    "llama": ("llama", dict()),
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "mistral": ("mistral", dict()),
    "qwen2": ("qwen2", dict()),
}
PROMPT = "Kamiro telan vorsi lu den. Paqui astber onul zeha? Nimtro gal esfi ward lych ment."


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_equals_transformers_generate(family, checkpoint, tokenizer, capsys):
    model_type, overrides = FAMILIES[family]
    path = checkpoint(model_type, **overrides)
    out = run_json(capsys, ["--model", str(path), "--prompt", PROMPT, "--mode", "autoregressive",
                            "--temperature", "0", "--max-new-tokens", "40", "--json"])
    ids = tokenizer(PROMPT)["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=40)[0, len(ids):].tolist()
    assert out["token_ids"] == want
    assert out["prompt_tokens"] == len(ids)
    assert len(set(want)) > 8, "greedy text should be varied, not a repeated token"
    assert out["text"] == tokenizer.decode(want, skip_special_tokens=True)
    assert out["stats"]["new_tokens"] == len(want)


def test_eos_from_generation_config_stops(checkpoint, tokenizer, capsys):
    """The first greedy token is made the EOS id: generation stops right there (EOS kept, as transformers does)."""
    path = checkpoint("llama")
    first = run_json(capsys, ["--model", str(path), "--prompt", PROMPT, "--mode", "autoregressive",
                              "--max-new-tokens", "5", "--json"])["token_ids"]
    i = next(i for i in range(1, 5) if first[i] not in first[:i])
    eos_path = checkpoint("llama", eos_token_id=first[i])
    gen = json.loads((eos_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == first[i]
    out = run_json(capsys, ["--model", str(eos_path), "--prompt", PROMPT, "--mode", "autoregressive",
                            "--max-new-tokens", "20", "--json"])
    assert out["token_ids"] == first[: i + 1]


def test_sampling_is_seeded(checkpoint, capsys):
    path = str(checkpoint("llama"))
    argv = ["--model", path, "--prompt", PROMPT, "--mode", "autoregressive", "--temperature", "1.0",
            "--top-p", "0.9", "--max-new-tokens", "20", "--json"]
    a = run_json(capsys, argv + ["--seed", "1"])["token_ids"]
    b = run_json(capsys, argv + ["--seed", "1"])["token_ids"]
    c = run_json(capsys, argv + ["--seed", "2"])["token_ids"]
    assert a == b and a != c
