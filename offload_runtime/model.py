"""One Llama-family forward (llama, mistral, qwen2) whose attention runs against a pluggable cache.

Parameter names match transformers' checkpoints (`model.layers.N.self_attn.q_proj.weight`,
...), so a checkpoint's state dict loads as it is. The model holds no K/V: every forward
gets a cache object (full, retrieval or streaming), which stores the new rows and
computes attention. Tensor parallelism shards these same modules in place.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .caches.base import RECENT_QUERIES, KVCache
from .config import ModelConfig
from .fused import FusedLinear, project
from .rope import RotaryEmbedding, apply_rotary

# (layer index, layer, hidden states, cos, sin) -> hidden states after the layer: how a forward runs a layer
LayerRunner = Callable[[int, "DecoderLayer", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm arithmetic (fp32 inside); also traced by the compiled step."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.qkv: FusedLinear | None = None  # set by fuse_projections

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                rows: int | None = None) -> torch.Tensor:
        """Every token's K/V goes to the cache; the output is that of the last `rows` tokens (all by default)."""
        t = x.shape[0]
        rows = t if rows is None else rows
        # Head counts come from the weights, so a tensor-parallel shard of this module works unchanged.
        nq, nk = self.q_proj.weight.shape[0] // self.head_dim, self.k_proj.weight.shape[0] // self.head_dim
        heads = project(self, "qkv", [self.q_proj, self.k_proj, self.v_proj], x).view(t, -1, self.head_dim).transpose(0, 1)
        qk = apply_rotary(heads[:nq + nk], cos, sin)  # q and k rotated in one go
        out = cache.attend(self.layer, qk[:nq, t - rows:], qk[nq:], heads[nq + nk:])  # [Hq, rows, D]
        return self.o_proj(out.transpose(0, 1).reshape(rows, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_up: FusedLinear | None = None  # set by fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(self, "gate_up", [self.gate_proj, self.up_proj], x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                rows: int | None = None) -> torch.Tensor:
        """Hidden states of the last `rows` tokens (all by default) after the layer; every token's K/V is cached.
        A prompt's last layer needs few rows: the rest of its attention and MLP would feed no logit."""
        x_in = x if rows is None else x[x.shape[0] - rows:]
        x = x_in + self.self_attn(self.input_layernorm(x), cos, sin, cache, rows)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Named `model` inside CausalLM so parameter names match the checkpoints."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def last_layer_rows(a: int, b: int, n: int) -> int:
    """Rows of a prompt's chunk [a, b) (of n tokens) whose last-layer output is computed: those among the
    last RECENT_QUERIES, whose queries the full cache keeps, and at least one; the rest would feed no logit."""
    return max(1, b - max(a, n - RECENT_QUERIES))


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.hf_config)
        # (model, tokens, cache) -> logits or None: a faster path for one-token steps (compiled.enable)
        self.one_token_step: Callable[["CausalLM", torch.Tensor, KVCache], torch.Tensor | None] | None = None

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def _embed(self, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden states [T, H] of the tokens and the rotary tables of their positions in `cache`."""
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rope.cos_sin(cache.positions(tokens.shape[0], tokens.device), x.dtype)
        return x, cos, sin

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits of hidden states [T, H]: the final norm, then the LM head."""
        return self.lm_head(self.model.norm(x)).float()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False,
                run_layer: LayerRunner | None = None) -> torch.Tensor:
        """tokens: [T] (one sequence). Returns fp32 logits [T, V] (or [1, V] with last_only).

        The one layer loop: decode steps, verification blocks, prompt chunks. `run_layer(i, layer,
        x, cos, sin)` runs each layer instead of `layer(x, cos, sin, cache)`: the pipelined pass
        drafts there while a layer's copy is in flight (pipelined.py), the layer-major prefill
        feeds a whole prompt through one layer at a time (prefill.py)."""
        if run_layer is None and self.one_token_step is not None and tokens.shape[0] == 1:
            logits = self.one_token_step(self, tokens, cache)
            if logits is not None:
                cache.advance(1)
                return logits
        x, cos, sin = self._embed(tokens, cache)
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            if run_layer is not None:
                x = run_layer(i, layer, x, cos, sin)
            else:  # with last_only, the last layer's attention and MLP run for the rows the cache keeps queries of
                t = x.shape[0]
                x = layer(x, cos, sin, cache, last_layer_rows(0, t, t) if last_only and i == last else None)
        cache.advance(tokens.shape[0])
        return self.head(x[-1:] if last_only else x)
