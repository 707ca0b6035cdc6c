"""One Llama-family forward (llama, mistral, qwen2) whose attention runs against a pluggable cache.

Parameter names match transformers' checkpoints (`model.layers.N.self_attn.q_proj.weight`,
...), so a checkpoint's state dict loads as it is. The model holds no K/V: every forward
gets a cache object (full, retrieval or streaming), which stores the new rows and
computes attention. Tensor parallelism shards these same modules in place.
"""
from __future__ import annotations

import sys
from typing import Callable, Generator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .caches.base import FullKVCache, KVCache
from .caches.layer_writer import LayerWriter
from .config import ModelConfig
from .rope import RotaryEmbedding, apply_rotary

PREFILL_CHUNK = 1024  # prompt tokens per forward (token-major) or per chunk within a layer (layer-major), at most
MASK_BYTES = 512 << 20  # bound on one chunk's attention mask (SDPA): fewer tokens per chunk at long contexts
PROGRESS_MIN_TOKENS = 8192  # the layer-major prefill shows a progress bar (stderr) from this prompt length on
LayerHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]  # (layer, K, V, last query)


def prefill_chunk(kv_groups: int, context: int) -> int:
    """Tokens per layer-major chunk: PREFILL_CHUNK, fewer when one chunk's mask (G*chunk x context,
    bool and its float bias) would pass MASK_BYTES."""
    return max(64, min(PREFILL_CHUNK, MASK_BYTES // (3 * kv_groups * max(context, 1))))


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


class FusedLinear:
    """Linears over the same input as one matrix: one matrix-vector product per decode step instead
    of several (fewer, larger reads; ~4% of a CPU step at 2K). The Linears' weights become views of
    the one matrix, so nothing is held twice and the checkpoint names still address them. If they
    are later replaced or moved (sharding, `.to()`), `current()` turns false and the caller goes
    back to the separate Linears; `fuse_projections` fuses again."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        with torch.no_grad():
            self.weight = torch.cat([lin.weight for lin in linears])
            has_bias = linears[0].bias is not None
            self.bias = torch.cat([lin.bias for lin in linears]) if has_bias else None
        self.linears, self.sizes, start = linears, [lin.weight.shape[0] for lin in linears], 0
        for lin, n in zip(linears, self.sizes):
            lin.weight = nn.Parameter(self.weight[start:start + n], requires_grad=False)
            if self.bias is not None:
                lin.bias = nn.Parameter(self.bias[start:start + n], requires_grad=False)
            start += n
        self._ptrs = self._pointers()

    @staticmethod
    def can_fuse(linears: list[nn.Linear]) -> bool:
        """Same input width, device and dtype, and all with a bias or none."""
        first = linears[0].weight
        return (len({lin.bias is None for lin in linears}) == 1
                and all(lin.weight.shape[1] == first.shape[1] and lin.weight.device == first.device
                        and lin.weight.dtype == first.dtype and lin.weight.device.type != "meta" for lin in linears))

    def _pointers(self) -> tuple[tuple[int, int | None], ...]:
        return tuple((lin.weight.data_ptr(), None if lin.bias is None else lin.bias.data_ptr()) for lin in self.linears)

    def current(self, linears: list[nn.Linear]) -> bool:
        """Whether these are the Linears fused here and their weights still are views of this matrix
        (a plain loop over the `_parameters` dicts: it runs for every layer of every forward)."""
        if len(linears) != len(self.linears):
            return False
        for lin, mine, n, (w_ptr, b_ptr) in zip(linears, self.linears, self.sizes, self._ptrs):
            params = lin._parameters
            weight, bias = params.get("weight"), params.get("bias")  # no weight entry (parametrized): stale
            if (lin is not mine or weight is None or weight.data_ptr() != w_ptr or weight.shape[0] != n
                    or (None if bias is None else bias.data_ptr()) != b_ptr):
                return False
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def live_fused(module: nn.Module, attr: str, linears: list[nn.Linear]) -> FusedLinear | None:
    """`module.<attr>` if it fuses these Linears as they are now; else None (a stale fused matrix is
    dropped, so it does not hold its memory)."""
    fused = getattr(module, attr)
    if fused is not None and not fused.current(linears):
        setattr(module, attr, None)
        return None
    return fused


def project(module: nn.Module, attr: str, linears: list[nn.Linear], x: torch.Tensor) -> torch.Tensor:
    """The Linears' outputs side by side: one product when `module.<attr>` fuses them, else one per Linear."""
    fused = live_fused(module, attr, linears)
    return fused(x) if fused is not None else torch.cat([lin(x) for lin in linears], dim=-1)


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        t = x.shape[0]
        # Head counts come from the weights, so a tensor-parallel shard of this module works unchanged.
        nq, nk = self.q_proj.weight.shape[0] // self.head_dim, self.k_proj.weight.shape[0] // self.head_dim
        heads = project(self, "qkv", [self.q_proj, self.k_proj, self.v_proj], x).view(t, -1, self.head_dim).transpose(0, 1)
        qk = apply_rotary(heads[:nq + nk], cos, sin)  # q and k rotated in one go
        out = cache.attend(self.layer, qk[:nq], qk[nq:], heads[nq + nk:])  # [Hq, T, D]
        return self.o_proj(out.transpose(0, 1).reshape(t, -1))


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


def fuse_layer(layer: "DecoderLayer") -> None:
    """Fuse one layer's q/k/v and gate/up projections (see FusedLinear)."""
    attn, mlp = layer.self_attn, layer.mlp
    attn.qkv = mlp.gate_up = None  # a stale matrix is not kept alive while the new one is built
    qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
    attn.qkv = FusedLinear(qkv) if FusedLinear.can_fuse(qkv) else None
    mlp.gate_up = FusedLinear(gate_up) if FusedLinear.can_fuse(gate_up) else None


def fuse_projections(model: "CausalLM") -> "CausalLM":
    """Fuse every layer's projections, layer by layer (each replaced weight is freed before the next
    layer's copy is made, unless something else holds it); call it on the final weights (after
    loading, sharding and moving: `.to()` makes the fused matrices stale). Returns the model."""
    for layer in model.model.layers:
        fuse_layer(layer)
    return model


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Named `model` inside CausalLM so parameter names match the checkpoints."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


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

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(x)).float()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """tokens: [T] (one sequence). Returns fp32 logits [T, V] (or [1, V] with last_only)."""
        if self.one_token_step is not None and tokens.shape[0] == 1:
            logits = self.one_token_step(self, tokens, cache)
            if logits is not None:
                cache.advance(1)
                return logits
        x, cos, sin = self._embed(tokens, cache)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache)
        cache.advance(tokens.shape[0])
        return self._head(x[-1:] if last_only else x)

    def forward_steps(self, tokens: torch.Tensor, cache: FullKVCache) -> Generator[None, bool, torch.Tensor]:
        """`forward` as steps: before a layer whose K/V is not on the device yet (`cache.layer_ready`)
        it yields, so the caller can do other work while the copy runs; the caller sends True to
        make it stop asking and wait for the copy. Returns (StopIteration.value) the logits [T, V]."""
        with torch.inference_mode():
            x, cos, sin = self._embed(tokens, cache)
        for i, layer in enumerate(self.model.layers):
            while not cache.layer_ready(i, tokens.shape[0]):
                if (yield):
                    break
            with torch.inference_mode():
                x = layer(x, cos, sin, cache)
        cache.advance(tokens.shape[0])
        with torch.inference_mode():
            return self._head(x)

    @torch.inference_mode()
    def forward_layer_major(self, tokens: torch.Tensor, cache: FullKVCache, on_layer: LayerHook | None = None,
                            chunk_tokens: int | None = None, progress: bool | None = None) -> torch.Tensor:
        """Append `tokens` [T] to `cache` one layer at a time; fp32 logits of the last token, [1, V].

        All tokens go through layer l (in chunks, to bound activation memory), its K/V is final
        (`close_layer`: written back once) and `on_layer(l, K, V, last query)` sees rows [0, end)
        while they are on the device (the retrieval selection is built there), then layer l+1.
        The numbers equal `forward`'s up to fp32 summation order."""
        n = tokens.shape[0]
        start, end = cache.length, cache.length + n
        chunk_tokens = chunk_tokens or prefill_chunk(self.cfg.kv_groups, end)
        x, cos, sin = self._embed(tokens, cache)
        layers = self.model.layers
        with tqdm(total=len(layers) * n, desc="prefill", unit="tok", unit_scale=True, file=sys.stderr,
                  disable=not (n >= PROGRESS_MIN_TOKENS if progress is None else progress),
                  leave=False) as bar:  # (an interrupted prefill clears its bar before the run says `interrupted`)
            for i, layer in enumerate(layers):
                k_buf, v_buf = cache.open_layer(i, n)
                writer = LayerWriter(k_buf, v_buf, start, self.cfg.sliding_windows[i])
                bar.set_postfix_str(f"layer {i + 1}/{len(layers)}", refresh=False)
                for a in range(0, n, chunk_tokens):
                    b = min(n, a + chunk_tokens)
                    x[a:b] = layer(x[a:b], cos[a:b], sin[a:b], writer)
                    bar.update(b - a)
                cache.recent_queries[i] = writer.recent
                if on_layer is not None:
                    on_layer(i, k_buf[:, :end], v_buf[:, :end], writer.recent[:, -1])
                cache.close_layer(i, start, end)
        cache.advance(n)
        return self._head(x[-1:])
