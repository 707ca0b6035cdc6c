"""The layer prefetch pipeline: host-resident layers streamed through a ring of device slabs.

Each host-resident layer keeps its K/V rows token-major, [capacity, 2, Hkv, D], so any
row range [a, b) is one contiguous block: one DMA brings rows [0, length) in, one DMA
writes the new rows [length, length + n) back. A pass over the layers goes:

    begin_pass(rows)      copy layers 0..S-1 into slabs 0..S-1          (copy stream)
    acquire(i)            copy layer i+S-1 into its slab once layer i-1 freed it,
                          then the compute stream waits for layer i's copy
    ... compute writes the new rows into the slab and attends over it ...
    release(i, a, b)      copy rows [a, b) back to host (after the compute that wrote
                          them), record "slab free" for the next layer using this slab

So layer i+1 (and up to S-1 layers ahead) is copied while layer i computes, with S
slabs allocated once at the planned capacity. The same code runs on both backends.
"""
from __future__ import annotations

from typing import Any

import torch

from .backend import Backend

SLABS = 2  # device slabs a pass streams the host-resident layers through (the planner counts the same)


class LayerPipeline:
    def __init__(self, backend: Backend, n_layers: int, row_shape: tuple[int, ...], capacity: int,
                 dtype: torch.dtype, n_slabs: int = SLABS) -> None:
        if n_layers <= 0 or capacity <= 0:
            raise ValueError(f"need layers > 0 and capacity > 0, got {n_layers}, {capacity}")
        if n_slabs < 2:
            raise ValueError(f"need at least 2 slabs to overlap copies with compute, got {n_slabs}")
        self.backend, self.n_layers, self.capacity = backend, n_layers, capacity
        # One host block for all layers (one pinned allocation), never zeroed: rows past `length` are garbage.
        self.host = backend.host_empty((n_layers, capacity) + tuple(row_shape), dtype)
        self.slabs = [backend.device_empty((capacity,) + tuple(row_shape), dtype)
                      for _ in range(min(n_slabs, n_layers))]
        self.free: list[Any] = [None] * len(self.slabs)  # compute-stream event: last reader of the slab done
        self.ready: list[Any] = [None] * n_layers  # copy-stream event: layer's rows are in its slab
        self.written: list[Any] = [None] * n_layers  # copy-stream event: layer's new rows are on the host
        self.rows = 0  # rows [0, rows) are valid on the host this pass
        self.issued = n_layers  # layers whose copy-in has been issued this pass
        self.passes = 0

    @property
    def host_bytes(self) -> int:
        return self.host.numel() * self.host.element_size()

    @property
    def slab_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.slabs)

    def slab_of(self, i: int) -> int:
        return i % len(self.slabs)

    def begin_pass(self, rows: int) -> None:
        """Start a pass that reads rows [0, rows) of every layer; prefetch the first slabs."""
        if rows > self.capacity:
            raise ValueError(f"{rows} rows exceed the capacity of {self.capacity}")
        if self.issued < self.n_layers:
            # The previous pass stopped part way (an exception): its issued copies are harmless.
            self.backend.log("abandon", self.issued)
        drain = getattr(self.backend, "drain", None)
        if drain:
            drain()
        self.rows, self.issued = rows, 0
        self.passes += 1
        self.prefetch(len(self.slabs))

    def prefetch(self, upto: int) -> None:
        """Issue the copy-in of layers [issued, upto) (each into its slab, after the slab is free)."""
        for i in range(self.issued, min(upto, self.n_layers)):
            s = self.slab_of(i)
            self.ready[i] = self.backend.copy(self.slabs[s][: self.rows], self.host[i, : self.rows], "h2d",
                                              after=self.free[s])
            self.backend.log("h2d", i, s, self.rows)
            self.issued = i + 1

    def acquire(self, i: int) -> torch.Tensor:
        """Layer i's slab with rows [0, rows) in place, ordered before the compute that follows."""
        self.prefetch(i + len(self.slabs))
        if i >= self.issued:
            raise RuntimeError(f"layer {i} acquired out of order (issued {self.issued})")
        self.backend.wait(self.ready[i])
        self.backend.log("compute", i, self.slab_of(i))
        return self.slabs[self.slab_of(i)]

    def ready_now(self, i: int) -> bool:
        """Is layer i's copy-in done? Issues the copies acquire(i) would, never blocks."""
        self.prefetch(i + len(self.slabs))
        return i < self.issued and self.backend.done(self.ready[i])

    def copying(self) -> bool:
        """Is a copy-in of this pass still in flight, the link busy? (they complete in order; never blocks)"""
        return self.issued > 0 and not self.backend.done(self.ready[self.issued - 1])

    def release(self, i: int, start: int, stop: int) -> None:
        """Write rows [start, stop) (the new ones) of layer i back to host; free the slab."""
        s = self.slab_of(i)
        if stop > start:
            written = self.backend.record()
            self.written[i] = self.backend.copy(self.host[i, start:stop], self.slabs[s][start:stop], "d2h",
                                                after=written)
            self.backend.log("d2h", i, s, start, stop)
        self.free[s] = self.backend.record()
        self.backend.log("free", i, s)

    def host_rows(self, i: int, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of layer i from host memory (waits for pending write-backs: not for the hot loop)."""
        if self.written[i] is not None:
            self.backend.synchronize(self.written[i])
        return self.host[i, start:stop]
