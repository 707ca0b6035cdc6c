"""Rotary position embeddings, with frequencies from transformers' own RoPE code.

Every scaling transformers supports for the Llama family (default, linear, dynamic,
yarn, llama3) comes from `transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`;
nothing is re-derived here. Dynamic NTK keeps transformers' stateful rule: the
frequencies grow with the largest position seen in a forward and reset when a forward
falls back under the original context.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def rope_parameters(hf_config: Any) -> dict:
    """The RoPE settings as a dict with `rope_type` (transformers 5 `rope_parameters`, or 4.x fields)."""
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        params = dict(params)
    else:  # transformers 4.x layout
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def supported_rope_types() -> tuple[str, ...]:
    """The rope_type values transformers (and so this runtime) can compute."""
    return tuple(sorted({"default", *ROPE_INIT_FUNCTIONS}))


def _init_fn(rope_type: str) -> Callable[..., tuple[torch.Tensor, float]]:
    if rope_type in ROPE_INIT_FUNCTIONS:
        return ROPE_INIT_FUNCTIONS[rope_type]
    if rope_type == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        def default(config: Any, device: Any = None, **kwargs: Any) -> tuple[torch.Tensor, float]:
            # `device` is not passed on: transformers < 5.18 warns that it is deprecated, later
            # versions drop it. The caller builds inv_freq under its device and moves it there.
            return LlamaRotaryEmbedding.compute_default_rope_parameters(config, **kwargs)

        return default
    raise ValueError(f"unsupported rope_type {rope_type!r}")


class RotaryEmbedding:
    """cos/sin tables for a set of positions; one object per model."""

    def __init__(self, hf_config: Any, device: torch.device | str = "cpu") -> None:
        self.hf_config = hf_config
        self.rope_type = rope_parameters(hf_config)["rope_type"]
        self._init = _init_fn(self.rope_type)
        with torch.device(device):  # also escapes a surrounding meta-device context
            inv_freq, self.attention_scaling = self._init(hf_config, device=torch.device(device))
        self.inv_freq = inv_freq.to(device)
        self.original_inv_freq = self.inv_freq
        self.original_scaling = self.attention_scaling
        self.original_max_seq_len = hf_config.max_position_embeddings
        self.max_seq_len_cached = self.original_max_seq_len

    def to(self, device: torch.device | str) -> "RotaryEmbedding":
        self.inv_freq = self.inv_freq.to(device)
        self.original_inv_freq = self.original_inv_freq.to(device)
        return self

    def _dynamic_update(self, seq_len: int, device: torch.device) -> None:
        cached = self.max_seq_len_cached
        if seq_len > cached:  # grow
            inv_freq, self.attention_scaling = self._init(self.hf_config, device=device, seq_len=seq_len)
            self.inv_freq = inv_freq.to(device)
            self.max_seq_len_cached = seq_len
        if seq_len < self.original_max_seq_len and cached > self.original_max_seq_len:  # reset
            self.inv_freq = self.original_inv_freq
            self.attention_scaling = self.original_scaling
            self.max_seq_len_cached = self.original_max_seq_len

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape [T, head_dim] for the positions of one forward."""
        inv_freq, scaling = self.tables_for(positions)
        return rope_tables(positions, inv_freq, scaling, dtype)

    def tables_for(self, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The frequencies [head_dim / 2] (fp32, on the positions' device) and scaling for these
        positions (dynamic NTK first updates its state, as transformers does)."""
        if "dynamic" in self.rope_type and positions.numel():
            self._dynamic_update(int(positions.max()) + 1, positions.device)
        return self.inv_freq.to(positions.device, torch.float32), self.attention_scaling

    def shift(self, x: torch.Tensor, delta: int) -> torch.Tensor:
        """Rotate already-rotated vectors by `delta` positions (RoPE rotations compose exactly)."""
        freqs = float(delta) * self.inv_freq.to(x.device, torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        return apply_rotary(x.float(), emb.cos(), emb.sin()).to(x.dtype)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim] of `positions` [T] (a pure function: the compiled step traces it)."""
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., T, D]; cos/sin: [T, D]."""
    return x * cos + rotate_half(x) * sin
