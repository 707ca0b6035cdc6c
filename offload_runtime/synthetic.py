"""Small random checkpoints with a real trained tokenizer, for the demo, the tests and the benchmarks.

Weights are drawn with a larger std than transformers' default init (0.15): default-init
models give near-uniform logits and one repeated greedy token, which hides bugs; a
larger std gives peaked attention and varied text, like a trained model.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

_SYLLABLES = ["ka", "ro", "mi", "tel", "an", "vor", "si", "lu", "den", "pa", "qui", "ast", "ber", "on", "ul",
              "ze", "ha", "nim", "tro", "gal", "es", "fi", "ward", "ly", "ch", "ou", "ment", "ing"]


def synthetic_text(n_words: int, seed: int = 0) -> str:
    """Deterministic pseudo-English: words from syllables, sentences, punctuation."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    out, sentence = [], []
    for _ in range(n_words):
        sentence.append(rng.choice(words))
        if len(sentence) > rng.randint(5, 14):
            out.append(" ".join(sentence).capitalize() + rng.choice([".", ".", "?", "!", ","]))
            sentence = []
    out.append(" ".join(sentence))
    return " ".join(out)


def train_tokenizer(vocab_size: int = 320, seed: int = 0) -> Any:
    """A byte-level BPE trained on synthetic text, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([synthetic_text(4000, seed + i) for i in range(4)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def hf_config(model_type: str, vocab_size: int, **overrides: Any) -> Any:
    from transformers import AutoConfig

    base = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    )
    if model_type == "mistral":
        base["sliding_window"] = None
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def randomize(model: torch.nn.Module, std: float = 0.15, seed: int = 0) -> None:
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=device)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(std * noise)


def make_checkpoint(
    dest: str | Path,
    model_type: str = "llama",
    tokenizer: Any = None,
    std: float = 0.15,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    dtype: torch.dtype = torch.float32,
    **config_overrides: Any,
) -> Path:
    """Write a random checkpoint (config, safetensors, tokenizer, generation config) to dest."""
    from transformers import AutoModelForCausalLM

    dest = Path(dest)
    tokenizer = tokenizer if tokenizer is not None else train_tokenizer()
    vocab = config_overrides.pop("vocab_size", len(tokenizer))  # larger = padded embedding rows
    config = hf_config(model_type, vocab, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    randomize(model, std, seed)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(dest, **kwargs)
    tokenizer.save_pretrained(dest)
    return dest
