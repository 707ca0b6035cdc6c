"""The transfer scheduler (pinned host pools, copy streams, layer prefetch) and its CPU backend."""
from .backend import Backend, CpuBackend, CudaBackend, TransferStats, make_backend
from .emulated import EmulatedLinkBackend
from .pipeline import SLABS, LayerPipeline
from .probe import link_bandwidth

__all__ = ["Backend", "CpuBackend", "CudaBackend", "EmulatedLinkBackend", "TransferStats", "make_backend",
           "LayerPipeline", "SLABS", "link_bandwidth"]
