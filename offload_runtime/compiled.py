"""The one-token decode step compiled into one graph (torch.compile, inductor, C++ wrapper): opt-in, CPU.

Why: on a CPU a decode step should cost the read of the weights and of the cache rows. In eager
mode it costs that plus ~40 small ops per layer (norms, RoPE, residuals, slicing, the attention
call), each a few microseconds of dispatch made slower by the weight stream evicting the
interpreter's caches: ~9-10 ms of a 2K-context step of a 16-layer 1024-wide model on a 2-core
Xeon, beside ~35 ms of matrix-vector products and ~6 of attention (README, "CPU decoding
against the bandwidth floor"). Compiled, the small ops become a few fused C++ loops and every
call (products, SDPA) is made from C++: 43 ms instead of 52, 0.69-0.70x transformers' step.

What is compiled: the model's own code, not a copy of it: `one_token` runs the embedding, every
`DecoderLayer` (its norms, `Attention`, `MLP`: model.py) and the head, and dynamo traces them
against `OneTokenRows`, a cache that writes the token's K/V row in place and calls SDPA without a
mask. A change to the layer's code is a change to the compiled step.

What it covers: one new token, on CPU, with the projections fused (fused.fuse_projections), the
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
from typing import Any

import torch
import torch._dynamo.config as dynamo_config
import torch.fx.experimental._config as shape_config
import torch.nn.functional as F

from .caches.base import KVCache
from .errors import UserError
from .fused import all_fused
from .model import CausalLM
from .rope import rope_tables


def compiler_problem() -> str | None:
    """Why torch.compile cannot build CPU code here (None when it can): inductor needs a C++ compiler."""
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None and shutil.which("c++") is None:
        return f"no C++ compiler found ({cxx}, c++); install one (e.g. `apt install g++`) or set CXX"
    return None


class OneTokenRows(KVCache):
    """What the compiled step's layers attend against: the token's K/V written at `row` of each
    layer's buffers (from `KVCache.one_token_rows`), attention over rows [0, row] with no mask (all
    visible), the G query heads of a KV head folded into its rows (K/V read in place, as
    kernels/decode.py does eagerly); each layer's rotated queries kept for the cache."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], row: int) -> None:
        self.k, self.v, self.row, self.length = k, v, row, row
        self.queries: list[torch.Tensor] = []

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_buf, v_buf, row = self.k[layer], self.v[layer], self.row
        k_buf[:, row:row + 1] = k
        v_buf[:, row:row + 1] = v
        self.queries.append(q)
        n_q, n_kv, d = q.shape[0], k_buf.shape[0], q.shape[2]
        out = F.scaled_dot_product_attention(q.reshape(1, n_kv, n_q // n_kv, d), k_buf[None, :, :row + 1],
                                             v_buf[None, :, :row + 1])
        return out.reshape(n_q, 1, d)

    def truncate(self, length: int) -> None:
        raise NotImplementedError("the compiled step's rows are the cache's own; it truncates them")


def one_token(model: CausalLM, token: torch.Tensor, position: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
              k_bufs: list[torch.Tensor], v_bufs: list[torch.Tensor], row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of one token [1] at `position` [1], traced into one graph: the model's own
    layers (DecoderLayer, Attention, MLP) over `OneTokenRows`. Returns fp32 logits [1, V] and the
    rotated queries [layers, Hq, 1, D]. The rotary tables are computed in the graph from the
    frequencies `RotaryEmbedding.tables_for` gave outside it (its dynamic-NTK update reads a value)."""
    rows = OneTokenRows(k_bufs, v_bufs, row)
    x = model.model.embed_tokens(token)
    cos, sin = rope_tables(position, inv_freq, scaling, x.dtype)
    for layer in model.model.layers:
        x = layer(x, cos, sin, rows)
    return model.head(x), torch.stack(rows.queries)


class CompiledStep:
    """`model.one_token_step`: the compiled graph and when to use it (see the module docstring)."""

    def __init__(self) -> None:
        self.graph = torch.compile(one_token, dynamic=True, fullgraph=True, options={"cpp_wrapper": True})
        self.calls = 0  # compiled steps taken (the tests and the bench check it is used)
        # Settings for tracing, set around every call (any call may trace): no "duck" sizes (a weight's
        # width that happens to equal a buffer's row count must not become a guard: it would recompile
        # when the buffers grow), and floats as constants of the graph (each norm's eps and the RoPE
        # scaling, fixed while a model runs; a dynamic float would be made a tensor at every call).
        # Closure patchers: a few microseconds per call, where `config.patch` costs tens.
        self.settings = (shape_config._make_closure_patcher(use_duck_shape=False),
                         dynamo_config._make_closure_patcher(specialize_float=True))

    def __call__(self, model: CausalLM, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """fp32 logits [1, V] of the one token, written to `cache` (not advanced); None: not taken."""
        if tokens.shape[0] != 1 or tokens.device.type != "cpu" or getattr(model, "tp_world_size", 1) != 1:
            return None
        if not all_fused(model):  # the graph takes every layer's fused matrices as they are
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
        reverts = [patch() for patch in self.settings]
        try:
            logits, queries = self.graph(model, tokens, position, inv_freq, scaling, k_bufs, v_bufs, row)
        finally:
            for revert in reversed(reverts):
                revert()
        cache.one_token_queries(queries)
        self.calls += 1
        return logits


def build(model: CausalLM) -> CompiledStep:
    """A compiled step (compiled at its first call), not yet attached to `model`."""
    return CompiledStep()


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
