"""Tensor parallelism: a transformation applied to a loaded CausalLM (as gpt-fast's tp.py does).

Each rank keeps a slice of every attention and MLP block:
- q/k/v_proj by heads (output rows), GQA-aware: rank r keeps KV heads
  [r*Hkv/W, (r+1)*Hkv/W) and exactly the query heads that use them, so attention needs
  no communication; biases are split the same way.
- o_proj by input columns, gate/up_proj by output rows, down_proj by input columns.
  o_proj and down_proj then hold partial sums: a forward hook all-reduces them and adds
  their bias (if any) once, after the reduction.
- Embeddings, norms and lm_head stay whole on every rank (simplest; every rank gets the
  full logits with no gather).
The model's `cfg` becomes the rank's share (num_heads, num_kv_heads and
intermediate_size divided by W), so every cache built from it (full, retrieval,
streaming, and a host-resident one) holds only the rank's KV heads.

Every rank runs the same generation loop. Sampled tokens and acceptance decisions go
through `agree_int(s)`, which broadcasts rank 0's values: logits could differ in the
last bit between ranks (more ranks, another all-reduce algorithm, other kernels; with
gloo and 2 ranks we found them bitwise equal), and a token must never differ. Seeded generators stay in step because
every rank makes the same draws (their number depends on shapes only).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .config import ModelConfig
from .errors import UserError
from .fused import fuse_projections
from .model import CausalLM

_owns_group = False  # True when init_from_env created the process group (so shutdown destroys it)


def env_rank() -> int:
    """RANK as torchrun sets it (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def is_parallel() -> bool:
    """True when a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def current_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_from_env(device: torch.device) -> torch.device:
    """Join the torchrun process group (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    NCCL on CUDA (each rank takes GPU LOCAL_RANK), gloo on CPU. Returns the rank's device.
    Reuses a group that is already initialised (e.g. by a test harness)."""
    global _owns_group
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UserError(f"rank {env_rank()} wants GPU {local} but only {torch.cuda.device_count()} are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, **kwargs)
        _owns_group = True
    return device


def shutdown(wait: bool = True, destroy: bool = True) -> None:
    """Leave the process group if init_from_env created it. With `wait`, first a barrier: a rank
    that tears gloo down while another still uses it can abort the process. `destroy=False`
    (a process about to os._exit) skips the teardown, whose C++ threads can abort at exit."""
    global _owns_group
    if _owns_group and dist.is_initialized():
        if wait:
            dist.barrier()
        if destroy:
            dist.destroy_process_group()
    _owns_group = False


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_ints(values: Sequence[int]) -> list[int]:
    """Rank 0's values on every rank (no-op in one process). Every rank must call it at the same point."""
    if not is_parallel():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.long, device=_comm_device())
    dist.broadcast(t, src=0)
    return t.tolist()


def agree_int(value: int) -> int:
    return agree_ints([value])[0]


def first_error(message: str | None) -> str | None:
    """Gather every rank's error message (None: no error); return the lowest failing rank's, on every rank."""
    if not is_parallel():
        return message
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    for r, m in enumerate(messages):
        if m is not None:
            return m if r == 0 else f"rank {r}: {m}"
    return None


def check_divisible(cfg: ModelConfig, world: int) -> None:
    """A clear UserError when the model cannot be split evenly over `world` ranks."""
    cfg_heads, cfg_kv_heads, intermediate = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    if cfg_kv_heads % world:
        raise UserError(f"tensor parallelism over {world} ranks needs num_key_value_heads ({cfg_kv_heads}) "
                        f"to be a multiple of {world}")
    if cfg_heads % world:
        raise UserError(f"tensor parallelism over {world} ranks needs num_attention_heads ({cfg_heads}) "
                        f"to be a multiple of {world}")
    if intermediate % world:
        raise UserError(f"tensor parallelism over {world} ranks needs intermediate_size ({intermediate}) "
                        f"to be a multiple of {world}")


def _keep_rows(linear: nn.Linear, rank: int, world: int) -> None:
    """Column-parallel: keep this rank's block of output rows (and bias entries)."""
    n = linear.out_features // world
    linear.weight = nn.Parameter(linear.weight[rank * n:(rank + 1) * n].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias[rank * n:(rank + 1) * n].clone(), requires_grad=False)
    linear.out_features = n


def _keep_columns(linear: nn.Linear, rank: int, world: int) -> None:
    """Row-parallel: keep this rank's block of input columns; the bias moves into the all-reduce hook."""
    n = linear.in_features // world
    linear.weight = nn.Parameter(linear.weight[:, rank * n:(rank + 1) * n].clone(), requires_grad=False)
    linear.in_features = n
    bias = linear.bias
    linear.bias = None
    # A buffer (not a parameter, not saved) so that model.to(device) moves it with the weights.
    linear.register_buffer("tp_bias", None if bias is None else bias.detach(), persistent=False)
    linear.register_forward_hook(_all_reduce_hook)


def _all_reduce_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Sum the ranks' partial outputs, then add the whole bias once."""
    dist.all_reduce(output)
    return output if module.tp_bias is None else output + module.tp_bias


def shard(model: CausalLM, rank: int | None = None, world: int | None = None) -> CausalLM:
    """Shard `model` in place for `rank` of `world` (default: the running process group) and return it.

    Call it on the loaded target (before building caches). The draft stays whole on
    every rank. World size 1 leaves the model unchanged."""
    rank = current_rank() if rank is None else rank
    world = current_world_size() if world is None else world
    if getattr(model, "tp_world_size", 1) != 1:
        raise ValueError("the model is already sharded")
    cfg = model.cfg
    check_divisible(cfg, world)
    if world == 1:
        return model
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv = mlp.gate_up = None  # the whole model's fused rows: freed with the replaced weights
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _keep_rows(linear, rank, world)
        _keep_columns(attn.o_proj, rank, world)
        _keep_columns(mlp.down_proj, rank, world)
        attn.n_heads, attn.n_kv_heads = cfg.num_heads // world, cfg.num_kv_heads // world
    model.cfg = dataclasses.replace(cfg, num_heads=cfg.num_heads // world, num_kv_heads=cfg.num_kv_heads // world,
                                    intermediate_size=cfg.intermediate_size // world)
    model.tp_rank, model.tp_world_size = rank, world  # e.g. for a memory planner sizing per-rank caches
    return fuse_projections(model)  # this rank's q/k/v and gate/up rows, fused again
