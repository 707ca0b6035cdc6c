"""What the Triton kernels' host code shares: the interpreter check, buffers, tile sizes, argument checks.

Importing this module settles compiled-or-interpreted for every kernel module (they import it
first): Triton decides when a function is decorated, i.e. at import, from TRITON_INTERPRET, and
triton.language's own helpers (tl.sum's combine function...) were decorated when triton was first
imported, so both must agree.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mode_probe():
    """Never launched: how this import decorated functions (compiled or interpreted)."""
    pass


INTERPRETED = type(_mode_probe).__name__ == "InterpretedFunction"
_HELPER = getattr(getattr(tl, "standard", None), "_sum_combine", None)
if _HELPER is not None and INTERPRETED != (type(_HELPER).__name__ == "InterpretedFunction"):
    raise ImportError("triton was first imported with a different TRITON_INTERPRET than the offload_runtime "
                      "kernels: set TRITON_INTERPRET=1 before anything imports triton")


def alloc(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and scratch buffer comes from here (tests replace it with NaN-filled buffers)."""
    return torch.empty(shape, dtype=dtype, device=device)


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.arange needs a power of two, tl.dot >= 16


def block_m(rows: int) -> int:
    return min(64, max(16, triton.next_power_of_2(rows)))


def check_offsets(**tensors: torch.Tensor) -> None:
    """Offsets are computed in 32-bit integers inside the kernels: refuse larger tensors."""
    for name, t in tensors.items():
        extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)
        if extent >= 2**31:
            raise ValueError(f"{name} {tuple(t.shape)} spans {extent} elements: the Triton kernels index with "
                             "32-bit offsets (< 2**31); split it into slabs")


def check_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"Triton kernels need all tensors on one device, got {sorted(map(str, devices))}")
    device = tensors[0].device
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("Triton kernels got CPU tensors but were not built in interpreter mode: "
                           "set TRITON_INTERPRET=1 before the first kernel call, or use the reference kernels")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Triton kernels run on CUDA (or CPU in interpreter mode), not on {device.type}")
