"""ModelConfig: the few numbers our forward needs, read from a transformers config.

The transformers config object is kept beside them because RoPE is computed with
transformers' own initialisation functions, which take the config itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool  # bias on q/k/v projections (qwen2 always, llama if attention_bias)
    o_bias: bool  # bias on o_proj (llama attention_bias only)
    mlp_bias: bool
    max_position_embeddings: int
    sliding_windows: tuple[int | None, ...]  # per layer; None = full causal attention
    hf_config: Any = field(compare=False, repr=False)

    @property
    def kv_groups(self) -> int:
        """Query heads that share one KV head (GQA ratio)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        model_type = getattr(hf, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise UserError(f"unsupported hidden_act {act!r} (only silu)")
        num_heads = hf.num_attention_heads
        num_kv = getattr(hf, "num_key_value_heads", None) or num_heads
        if num_heads % num_kv:
            raise UserError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv}")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        n_layers = hf.num_hidden_layers
        _check_rope_type(hf)
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=n_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            o_bias=model_type == "llama" and bool(getattr(hf, "attention_bias", False)),
            mlp_bias=model_type == "llama" and bool(getattr(hf, "mlp_bias", False)),
            max_position_embeddings=hf.max_position_embeddings,
            sliding_windows=_sliding_windows(hf, model_type, n_layers),
            hf_config=hf,
        )


def _check_rope_type(hf: Any) -> None:
    """A RoPE scaling we cannot compute is refused by name before any weight loads."""
    from .rope import rope_parameters, supported_rope_types

    rope_type = rope_parameters(hf)["rope_type"]
    if rope_type not in supported_rope_types():
        raise UserError(f"unsupported rope_type {rope_type!r} in config.json; supported: "
                        f"{', '.join(supported_rope_types())}")


def _sliding_windows(hf: Any, model_type: str, n_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding window, following what transformers' modeling code applies."""
    window = getattr(hf, "sliding_window", None)
    if model_type == "mistral":
        return (window,) * n_layers
    if model_type == "qwen2":
        layer_types = getattr(hf, "layer_types", None)
        if not window or not layer_types:
            return (None,) * n_layers
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (None,) * n_layers
