"""Attention and retrieval kernels: pure-PyTorch references (CPU path, test oracle) and Triton versions.

Dispatch, decided at every call (so tests can switch it with environment variables):
- OFFLOAD_RUNTIME_KERNELS=reference: always the PyTorch references.
- OFFLOAD_RUNTIME_KERNELS=auto (default): Triton for CUDA tensors, and for CPU tensors when
  TRITON_INTERPRET=1 (Triton's interpreter: the tests); otherwise (CPU), when Triton is not
  installed, or for inputs the Triton kernels do not take (dtype other than fp16/bf16/fp32,
  head_dim > 256): attention on torch SDPA (`sdpa.py`), through `decode.py` for up to
  DECODE_MAX_QUERIES queries (decode steps, verification blocks: no mask when every key is
  visible), the other kernels on their references.
- OFFLOAD_RUNTIME_KERNELS=triton: Triton always; inputs it does not take raise ValueError
  naming them, and CPU tensors without TRITON_INTERPRET=1 raise RuntimeError.
Every attention of the engine (the full, offloaded, retrieval and streaming caches, the
layer-major prefill) calls `attention` here. The slab kernels (attention_partial_triton,
merge_partials_triton, with their references and `reference.merge_streamed`) are the pieces
of an attention that starts on the first slab of a streamed layer; they are tested and
benchmarked but not dispatched: the layer pipeline brings each layer whole into one slab.
The Triton attention takes any number of queries: decode (gamma+1 queries, the G query heads
of a KV head packed into one tile, keys split across programs) and prefill (tiles of 64
queries; key tiles that no query of a tile can see, by position, are skipped).
TRITON_INTERPRET=1 must be set before the first Triton call: the kernels are compiled or
interpreted according to it when kernels/triton_kernels.py (which gathers triton_attention.py,
triton_merge.py and triton_chunks.py) is first imported (lazily, here).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType
from typing import Callable

import torch

from . import decode
from .decode import attention_decode
from .sdpa import attention_sdpa
from .reference import (
    Slab,
    attention_partial_reference,
    attention_reference,
    chunk_scores_reference,
    merge_partials_reference,
    select_chunks_reference,
    streamed_attention_reference,
    top_chunks,
)
from .support import attention_reason, chunk_scores_reason

MODES = ("auto", "triton", "reference")
_triton_module: ModuleType | None = None


def kernel_mode() -> str:
    """The OFFLOAD_RUNTIME_KERNELS setting (auto|triton|reference)."""
    mode = os.environ.get("OFFLOAD_RUNTIME_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"OFFLOAD_RUNTIME_KERNELS={mode!r}: expected one of {', '.join(MODES)}")
    return mode


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def load_triton() -> ModuleType:
    """The Triton kernel module, imported on first use (after TRITON_INTERPRET is settled)."""
    global _triton_module
    if _triton_module is None:
        if not triton_available():
            raise RuntimeError("the Triton kernels need the `triton` package, which is not installed")
        from . import triton_kernels as module

        _triton_module = module
    return _triton_module


def _use_triton(x: torch.Tensor, unsupported: Callable[[], str | None]) -> bool:
    """Whether this call goes to Triton (see the module docstring); raises where Triton is forced but cannot run.
    `unsupported()` says why the Triton kernel cannot take the inputs (None: it can); it is asked only
    where Triton could run (not on a plain CPU decode step)."""
    mode = kernel_mode()
    if mode == "reference":
        return False
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if mode == "auto":
        return (x.is_cuda or interpret) and unsupported() is None and triton_available()
    reason = unsupported()
    if reason is not None:
        raise ValueError(f"OFFLOAD_RUNTIME_KERNELS=triton, but the Triton kernel does not take these inputs: {reason}")
    if not x.is_cuda and not interpret:
        raise RuntimeError(f"OFFLOAD_RUNTIME_KERNELS=triton with {x.device.type} tensors needs TRITON_INTERPRET=1 "
                           "(Triton's interpreter) or CUDA tensors")
    return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
              sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention by positions, GQA without repeat_kv (see `attention_reference`)."""
    if _use_triton(q, lambda: attention_reason(q, k, v, q_pos, k_pos)):
        return load_triton().attention_triton(q, k, v, q_pos, k_pos, sliding_window)
    if kernel_mode() == "auto" and not q.is_cuda:
        if q.shape[1] <= decode.DECODE_MAX_QUERIES:  # few queries: SDPA without a mask where none is needed
            return attention_decode(q, k, v, q_pos, k_pos, sliding_window)
        return attention_sdpa(q, k, v, q_pos, k_pos, sliding_window)  # CPU prefill blocks: torch's fused kernel
    return attention_reference(q, k, v, q_pos, k_pos, sliding_window)


def chunk_scores(chunk_keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """[Hkv, N] fp32 scores of chunk mean keys against the query, GQA heads summed."""
    if _use_triton(chunk_keys, lambda: chunk_scores_reason(chunk_keys, query)):
        return load_triton().chunk_scores_triton(chunk_keys, query)
    return chunk_scores_reference(chunk_keys, query)


def select_chunks(chunk_keys: torch.Tensor, query: torch.Tensor, n_select: int) -> torch.Tensor:
    """[Hkv, n_select] ascending chunk indices per KV head, chunk 0 always (see `select_chunks_reference`)."""
    return top_chunks(chunk_scores(chunk_keys, query), n_select)


__all__ = [
    "attention", "chunk_scores", "select_chunks", "attention_decode", "attention_sdpa",
    "attention_reference", "attention_partial_reference", "merge_partials_reference", "streamed_attention_reference",
    "chunk_scores_reference", "select_chunks_reference", "kernel_mode", "load_triton", "Slab",
]
