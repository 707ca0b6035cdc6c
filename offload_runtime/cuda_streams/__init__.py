"""The transfer scheduler (pinned host pools, copy streams, layer prefetch) and its CPU backend."""
from __future__ import annotations

import torch

from .backend import Backend, CpuBackend, CudaBackend, TransferStats
from .emulated import EmulatedLinkBackend
from .pipeline import SLABS, LayerPipeline
from .probe import link_bandwidth


def make_backend(device: torch.device | str, trace: bool = False, link_gbps: float | None = None) -> Backend:
    """CUDA backend on a CUDA device, the synchronous CPU backend otherwise; with `link_gbps`, the
    emulated link (CPU only: a copy-engine thread paced at that many GB/s). (Here, not in backend.py:
    the emulated backend builds on backend.py, so backend.py may not import it.)"""
    device = torch.device(device)
    if link_gbps is not None:
        return EmulatedLinkBackend(device, link_gbps, trace)
    return CudaBackend(device, trace) if device.type == "cuda" else CpuBackend(device, trace)


__all__ = ["Backend", "CpuBackend", "CudaBackend", "EmulatedLinkBackend", "TransferStats", "make_backend",
           "LayerPipeline", "SLABS", "link_bandwidth"]
