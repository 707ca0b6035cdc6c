"""Fused projections: a layer's q/k/v (and its gate/up) Linears as one matrix each.

Linears over the same input as one matrix: one matrix-vector product per decode step instead
of several (fewer, larger reads; ~4% of a CPU step at 2K). The Linears' weights become views of
the one matrix, so nothing is held twice and the checkpoint names still address them. If they
are later replaced or moved (sharding, `.to()`), the fused matrix is stale: `project` notices,
drops it and goes back to the separate Linears; `fuse_projections` fuses again.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .model import CausalLM, DecoderLayer


class FusedLinear:
    """The Linears' weights (and biases) stacked into one matrix they are views of."""

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
    """The Linears' outputs side by side: one product when `module.<attr>` fuses them, else one per Linear.
    Traced by torch.compile (compiled.py), the fused matrix is taken as it is: the compiled step
    checks every layer's (`all_fused`) before it runs, and the check reads pointers, which a graph cannot."""
    fused = getattr(module, attr) if torch.compiler.is_compiling() else live_fused(module, attr, linears)
    return fused(x) if fused is not None else torch.cat([lin(x) for lin in linears], dim=-1)


def fuse_layer(layer: DecoderLayer) -> None:
    """Fuse one layer's q/k/v and gate/up projections (see FusedLinear)."""
    attn, mlp = layer.self_attn, layer.mlp
    attn.qkv = mlp.gate_up = None  # a stale matrix is not kept alive while the new one is built
    qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
    attn.qkv = FusedLinear(qkv) if FusedLinear.can_fuse(qkv) else None
    mlp.gate_up = FusedLinear(gate_up) if FusedLinear.can_fuse(gate_up) else None


def fuse_projections(model: CausalLM) -> CausalLM:
    """Fuse every layer's projections, layer by layer (each replaced weight is freed before the next
    layer's copy is made, unless something else holds it); call it on the final weights (after
    loading, sharding and moving: `.to()` makes the fused matrices stale). Returns the model."""
    for layer in model.model.layers:
        fuse_layer(layer)
    return model


def all_fused(model: CausalLM) -> bool:
    """Whether every layer's q/k/v and gate/up are fused and current (stale matrices are dropped).
    Read through the modules' `_modules` dicts: the compiled step asks it at every step."""
    for layer in model.model.layers:
        mods = layer._modules
        attn, mlp = mods["self_attn"], mods["mlp"]
        a, m = attn._modules, mlp._modules
        qkv = live_fused(attn, "qkv", [a["q_proj"], a["k_proj"], a["v_proj"]])
        gate_up = live_fused(mlp, "gate_up", [m["gate_proj"], m["up_proj"]])
        if qkv is None or gate_up is None:
            return False
    return True
