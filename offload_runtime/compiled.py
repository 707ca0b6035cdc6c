"""The one-token decode step compiled into one graph (torch.compile, inductor, C++ wrapper): opt-in, CPU.

Why: on a CPU a decode step should cost the read of the weights and of the cache rows. In eager
mode it costs that plus ~40 small ops per layer (norms, RoPE, residuals, slicing, the attention
call), each a few microseconds of dispatch made slower by the weight stream evicting the
interpreter's caches: ~9-10 ms of a 2K-context step of a 16-layer 1024-wide model on a 2-core
Xeon, beside ~35 ms of matrix-vector products and ~6 of attention (README, "CPU decoding
against the bandwidth floor"). Compiled, the small ops become a few fused C++ loops and every
call (products, SDPA) is made from C++: 43 ms instead of 52, 0.69-0.70x transformers' step.

What it covers: one new token, on CPU, with the projections fused (model.fuse_projections), the
model not tensor-parallel, and a cache that can say where the token's K/V row goes and that the
token sees every stored row without a mask (`KVCache.one_token_rows`: the full cache and the
retrieval cache; not where a sliding window would hide rows). Anything else -- prompt chunks,
verification blocks, the offloaded or streaming caches, CUDA -- runs the eager forward, so the
compiled step is never the only path. Its numbers equal the eager step's up to fp32 summation
order (the compiler fuses the norms' reductions), which the tests bound and which leaves greedy
tokens equal to transformers' in the benchmark.

Cost: compiling takes 40-76 s when it is enabled (`warm_up`: before any answer, 2 cores) and
needs a C++ compiler; one graph serves every context length (dynamic shapes).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any, Callable

import torch
import torch.fx.experimental._config as shape_config
import torch.nn.functional as F

from .caches.base import KVCache
from .config import ModelConfig
from .errors import UserError
from .model import live_fused, rms_norm
from .rope import apply_rotary, rope_tables

LayerWeights = tuple[torch.Tensor | None, ...]  # norm, qkv (w, b), o (w, b), norm, gate_up (w, b), down (w, b)


def compiler_problem() -> str | None:
    """Why torch.compile cannot build CPU code here (None when it can): inductor needs a C++ compiler."""
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None and shutil.which("c++") is None:
        return f"no C++ compiler found ({cxx}, c++); install one (e.g. `apt install g++`) or set CXX"
    return None


def one_token_graph(eps: float, n_heads: int, n_kv_heads: int,
                    head_dim: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The step for one model shape; its sizes and eps are constants of the graph (as arguments
    they would be symbolic under dynamic shapes: slower code and more guards)."""
    nq, nk, g = n_heads, n_kv_heads, n_heads // n_kv_heads

    def one_token(token: torch.Tensor, position: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
                  embed_w: torch.Tensor, row: int, layers: list[LayerWeights], k_bufs: list[torch.Tensor],
                  v_bufs: list[torch.Tensor], norm_w: torch.Tensor,
                  head_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward of one token [1] at `position` [1]: writes its K/V at `row` of every layer's
        buffers, attends to rows [0, row] (no mask: all visible); returns fp32 logits [1, V] and
        the rotated queries [layers, Hq, 1, D]. The ops of CausalLM.forward, attention maskless."""
        x = F.embedding(token, embed_w)
        cos, sin = rope_tables(position, inv_freq, scaling, x.dtype)
        end, queries = row + 1, []
        for (ln1, qkv_w, qkv_b, o_w, o_b, ln2, gu_w, gu_b, down_w, down_b), kb, vb in zip(layers, k_bufs, v_bufs):
            heads = F.linear(rms_norm(x, ln1, eps), qkv_w, qkv_b).view(1, -1, head_dim).transpose(0, 1)
            qk = apply_rotary(heads[:nq + nk], cos, sin)
            q = qk[:nq]
            kb[:, row:end] = qk[nq:]
            vb[:, row:end] = heads[nq + nk:]
            out = F.scaled_dot_product_attention(q.reshape(1, nk, g, head_dim), kb[None, :, :end], vb[None, :, :end])
            x = x + F.linear(out.reshape(1, nq * head_dim), o_w, o_b)
            gate, up = F.linear(rms_norm(x, ln2, eps), gu_w, gu_b).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, down_w, down_b)
            queries.append(q)
        return F.linear(rms_norm(x, norm_w, eps), head_w).float(), torch.stack(queries)

    return one_token


def layer_weights(model: Any) -> list[LayerWeights] | None:
    """Every layer's weights in `one_token`'s order, or None if some layer's fused matrices are
    missing or stale (FusedLinear.current): then the step runs eagerly. Read through the modules'
    `_modules` / `_parameters` dicts: it runs every step, and `module.attr` costs ~0.5 us each."""
    out = []
    for layer in model.model.layers:
        mods = layer._modules
        attn, mlp = mods["self_attn"], mods["mlp"]
        a, m = attn._modules, mlp._modules
        qkv = live_fused(attn, "qkv", [a["q_proj"], a["k_proj"], a["v_proj"]])
        gate_up = live_fused(mlp, "gate_up", [m["gate_proj"], m["up_proj"]])
        if qkv is None or gate_up is None:
            return None
        o, down = a["o_proj"]._parameters, m["down_proj"]._parameters
        out.append((mods["input_layernorm"]._parameters["weight"], qkv.weight, qkv.bias, o["weight"], o["bias"],
                    mods["post_attention_layernorm"]._parameters["weight"], gate_up.weight, gate_up.bias,
                    down["weight"], down["bias"]))
    return out


class CompiledStep:
    """`model.one_token_step`: the compiled graph and when to use it (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, eps: float) -> None:
        self.graph = torch.compile(one_token_graph(eps, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim),
                                   dynamic=True, fullgraph=True, options={"cpp_wrapper": True})
        self.calls = 0  # compiled steps taken (the tests and the bench check it is used)

    def __call__(self, model: Any, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """fp32 logits [1, V] of the one token, written to `cache` (not advanced); None: not taken."""
        if tokens.shape[0] != 1 or tokens.device.type != "cpu" or getattr(model, "tp_world_size", 1) != 1:
            return None
        weights = layer_weights(model)
        if weights is None:
            return None
        position = cache.positions(1, tokens.device)  # before one_token_rows reserves the row
        slots = cache.one_token_rows()
        if slots is None:
            return None
        k_bufs, v_bufs, row = slots
        # Shapes that would be a second graph: row 0 (dynamo specializes it; a token that sees itself
        # alone) and a slice [0, row] that is the whole buffer. One_token_rows only reserved what the
        # eager step reserves too, so it takes over.
        if row == 0 or row + 1 >= k_bufs[0].shape[1]:
            return None
        inv_freq, scaling = model.rope.tables_for(position)
        # No "duck" sizes: a weight's width that happens to equal a buffer's row count must not
        # become a guard (it would recompile when the buffers grow).
        with shape_config.patch(use_duck_shape=False):
            logits, queries = self.graph(tokens, position, inv_freq, scaling, model.model.embed_tokens.weight, row,
                                         weights, k_bufs, v_bufs, model.model.norm.weight, model.lm_head.weight)
        cache.one_token_queries(queries)
        self.calls += 1
        return logits


def build(model: Any) -> CompiledStep:
    """A compiled step for this model's shape (compiled at its first call), not yet attached."""
    return CompiledStep(model.cfg, model.model.norm.eps)


def warm_up(model: Any, quiet: bool = False) -> float:
    """Compile now, with one step on a scratch cache of a few rows (the graph is the same for every
    length), so that no answer's timing includes it; says so on stderr. Returns the seconds."""
    from .caches.full import FullCache

    if not quiet:
        print("compiling the one-token decode step (--compile; about a minute on 2 cores) ...", file=sys.stderr,
              flush=True)
    start = time.perf_counter()
    cache = FullCache(model.cfg, model.device, model.dtype)
    # Tokens made as the engine makes them (int64, outside inference mode: an inference tensor
    # would be another guard, hence another graph at the first real step).
    model(torch.zeros(3, dtype=torch.long, device=model.device), cache)  # rows 0-2, eager
    model(torch.zeros(1, dtype=torch.long, device=model.device), cache)  # row 3, compiled (rows 0, 1 would specialize)
    return time.perf_counter() - start


def enable(model: Any, quiet: bool = False) -> Any:
    """Give `model` the compiled one-token step and compile it (`warm_up`). Returns the model.
    Raises UserError where it cannot work: no C++ compiler, a CUDA model (not measured there), TP,
    or the compile itself failing (the model is then left eager)."""
    if model.device.type != "cpu":
        raise UserError("--compile is for CPU decoding (the compiled step has not been measured on a GPU)")
    if getattr(model, "tp_world_size", 1) != 1:
        raise UserError("--compile does not take a tensor-parallel model (the compiled step has no all-reduce)")
    problem = compiler_problem()
    if problem is not None:
        raise UserError(f"--compile needs a C++ compiler for torch.compile: {problem}")
    model.one_token_step = build(model)
    try:
        warm_up(model, quiet)
    except Exception as exc:  # e.g. a compiler without Python's headers: one line, not inductor's traceback
        model.one_token_step = None
        detail = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UserError(f"--compile: compiling the decode step failed ({type(exc).__name__}: {detail}); "
                        "run without --compile") from exc
    return model
