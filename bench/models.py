"""Synthetic Llama-shaped models of named sizes, built in memory on the benchmark device.

The transformers model and ours share the same weight tensors (no copy), so both
systems are timed on exactly the same weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from offload_runtime.config import ModelConfig
from offload_runtime.loading import build_model
from offload_runtime.fused import fuse_layer
from offload_runtime.model import CausalLM
from offload_runtime.synthetic import hf_config, randomize


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int = 131072
    rope_theta: float = 10000.0


SHAPES = {
    "tiny": Shape(64, 2, 4, 2, 128, 512),
    "small": Shape(512, 8, 8, 2, 1408, 32000),
    "300m": Shape(1024, 16, 16, 4, 2816, 32000),
    "mha-220m": Shape(1024, 12, 16, 16, 2816, 32000),  # MHA: K/V outweighs the weights from ~9K tokens
    # the shapes the projections are made for (GPU only: too large for CPU benchmarks)
    "7b": Shape(4096, 32, 32, 32, 11008, 32000),  # Llama-2-7B(-128K)
    "8b": Shape(4096, 32, 32, 8, 14336, 128256, rope_theta=500000.0),  # Llama-3.1-8B
}
DRAFTS = {"tiny": Shape(32, 1, 2, 1, 64, 512), "default": Shape(256, 2, 4, 2, 512, 32000)}


def shape_config(shape: Shape, vocab: int | None = None) -> Any:
    return hf_config("llama", vocab or shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                     num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                     intermediate_size=shape.intermediate, max_position_embeddings=shape.max_positions,
                     rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
                     eos_token_id=None, bos_token_id=None)


def parameter_count(shape: Shape) -> int:
    attn = shape.hidden * (shape.heads + 2 * shape.kv_heads) * (shape.hidden // shape.heads) + shape.hidden ** 2
    mlp = 3 * shape.hidden * shape.intermediate
    return shape.layers * (attn + mlp + 2 * shape.hidden) + 2 * shape.vocab * shape.hidden + shape.hidden


def build_pair(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0,
               vocab: int | None = None) -> tuple[Any, CausalLM]:
    """(transformers model, our model) sharing random weights (std 0.15 as in the tests, 0.02 for big shapes)."""
    from transformers import AutoModelForCausalLM

    config = shape_config(shape, vocab)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    randomize(hf, std=0.15 if shape.hidden <= 1024 else 0.02, seed=seed)
    hf.eval().requires_grad_(False)
    ours = build_model(ModelConfig.from_hf(config), dict(hf.state_dict()), device, dtype)
    share_fused(hf, ours)
    return hf, ours


def share_fused(hf: Any, ours: CausalLM) -> None:
    """Fuse our projections layer by layer, transformers' q/k/v and gate/up weights becoming views of
    our fused matrices at once: the two models keep sharing every weight (no second copy, and at most
    one layer's originals alive besides), so both are timed on the same memory."""
    for theirs, mine in zip(hf.model.layers, ours.model.layers):
        fuse_layer(mine)
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(theirs.self_attn, name).weight = getattr(mine.self_attn, name).weight
            getattr(theirs.self_attn, name).bias = getattr(mine.self_attn, name).bias
        for name in ("gate_proj", "up_proj"):
            getattr(theirs.mlp, name).weight = getattr(mine.mlp, name).weight
            getattr(theirs.mlp, name).bias = getattr(mine.mlp, name).bias


def load_pair(path: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, CausalLM, Any]:
    """(transformers model, our model, tokenizer) for a real checkpoint, sharing its weights."""
    from transformers import AutoModelForCausalLM

    from offload_runtime import loading

    resolved = loading.resolve_checkpoint(path)
    hf = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype).to(device).eval().requires_grad_(False)
    ours = build_model(ModelConfig.from_hf(hf.config), dict(hf.state_dict()), device, dtype)
    share_fused(hf, ours)
    return hf, ours, loading.load_tokenizer(resolved)
