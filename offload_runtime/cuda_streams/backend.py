"""Transfer backends: the few primitives the layer pipeline is written in.

`CudaBackend`: pinned host memory, one dedicated copy stream, CUDA events for ordering
(the compute stream waits on an event, the host never synchronizes in the hot loop)
and for timing (copy-engine time, time the compute stream sat waiting on a copy).
`CpuBackend`: the same calls, run synchronously (CPU torch has no pinned memory and no
streams), so the tests run exactly the schedule the GPU runs and check its order and
its bytes. Both keep the same accounting and, on request, a trace of what was issued.
"""
from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass
class TransferStats:
    """Bytes and seconds of host<->device traffic. Times are copy-engine / stream times."""

    h2d_bytes: int = 0
    d2h_bytes: int = 0
    h2d_copies: int = 0
    d2h_copies: int = 0
    h2d_s: float = 0.0  # time host-to-device copies took
    d2h_s: float = 0.0
    wait_s: float = 0.0  # time the compute stream waited on copies

    def copy(self) -> "TransferStats":
        return TransferStats(**{f.name: getattr(self, f.name) for f in fields(self)})

    def minus(self, other: "TransferStats") -> "TransferStats":
        return TransferStats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    @property
    def h2d_gbps(self) -> float | None:
        """Achieved host-to-device bandwidth in GB/s (1e9 bytes), over the copies' own time."""
        return self.h2d_bytes / self.h2d_s / 1e9 if self.h2d_s > 0 else None


PAGE = 4096


class _Done:
    """An event that has already happened (CPU backend: every copy is complete on return)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


DONE = _Done()


class Backend:
    """Interface + shared accounting. `copy` runs on the copy stream after `after`
    (an event of the compute stream or None) and returns an event marking its end."""

    name = "base"

    def __init__(self, device: torch.device | str, trace: bool = False) -> None:
        self.device = torch.device(device)
        self.stats = TransferStats()
        self.trace: list[tuple] | None = [] if trace else None

    def close(self, cancel: bool = False) -> None:
        """Stop this backend's copy engine, if it has one (the emulated link's thread)."""

    def log(self, *entry: Any) -> None:
        if self.trace is not None:
            self.trace.append(entry)

    def _account(self, kind: str, nbytes: int) -> None:
        if kind == "h2d":
            self.stats.h2d_bytes += nbytes
            self.stats.h2d_copies += 1
        else:
            self.stats.d2h_bytes += nbytes
            self.stats.d2h_copies += 1

    # primitives
    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def device_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, kind: str, after: Any = None) -> Any:
        raise NotImplementedError

    def record(self) -> Any:
        """An event at the current point of the compute stream."""
        raise NotImplementedError

    def wait(self, event: Any) -> None:
        """Make the compute stream wait for `event` (no host synchronization)."""
        raise NotImplementedError

    def done(self, event: Any) -> bool:
        """Has `event` completed? Never blocks (the pipelined round drafts while a copy is not done)."""
        return event is None or bool(event.query())

    def synchronize(self, event: Any) -> None:
        """Host waits for `event` (only outside the hot loop: reading host rows, reports)."""
        event.synchronize()

    def collect(self) -> TransferStats:
        """Stats with every issued copy's timing resolved (may synchronize; call for reports)."""
        return self.stats.copy()


class CpuBackend(Backend):
    """Same schedule, synchronous: 'host' and 'device' are both CPU memory."""

    name = "cpu"

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, kind: str, after: Any = None) -> Any:
        t = time.perf_counter()
        dst.copy_(src)
        dt = time.perf_counter() - t
        self._account(kind, src.numel() * src.element_size())
        if kind == "h2d":
            self.stats.h2d_s += dt
            self.stats.wait_s += dt  # synchronous: compute waited for the whole copy
        else:
            self.stats.d2h_s += dt
        return DONE

    def record(self) -> Any:
        return DONE

    def wait(self, event: Any) -> None:
        pass


class CudaBackend(Backend):
    """Pinned host buffers, a dedicated copy stream, events for order and timing."""

    name = "cuda"

    def __init__(self, device: torch.device | str, trace: bool = False, timing: bool = True) -> None:
        super().__init__(device, trace)
        if self.device.type != "cuda":
            raise ValueError(f"CudaBackend needs a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.copy_stream = torch.cuda.Stream(self.device)
        self.timing = timing
        self._pending: list[tuple[str, Any, Any]] = []  # (what, start event, end event), in issue order
        self._registered: dict[int, int] = {}  # pointer -> bytes of each live cudaHostRegister block

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Page-locked host memory of exactly this size: page-aligned plain memory registered with
        cudaHostRegister (torch's pinned allocator rounds each block up to a power of two: a 62 GiB
        cache would lock 64 GiB, a 33 GiB one 64 GiB)."""
        cudart = torch.cuda.cudart()
        register = getattr(cudart, "cudaHostRegister", None)
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if register is None or nbytes == 0:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        size = -(-nbytes // PAGE) * PAGE
        raw = torch.empty(size + PAGE, dtype=torch.uint8)
        offset = -raw.data_ptr() % PAGE
        ptr = raw.data_ptr() + offset
        err = register(ptr, size, 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of {size / 2**30:.1f} GiB failed (cudaError {int(err)})")
        t = raw[offset : offset + nbytes].view(dtype).view(shape)
        stream, registered = self.copy_stream, self._registered
        registered[ptr] = size

        def unpin(ptr: int = ptr, stream: Any = stream) -> None:
            stream.synchronize()  # no copy may still target these pages
            cudart.cudaHostUnregister(ptr)
            registered.pop(ptr, None)

        weakref.finalize(t, unpin)  # t (the caller keeps it, and no view outlives it) owns the registration
        return t

    def page_locked(self, t: torch.Tensor) -> bool:
        """Whether a host tensor lies in page-locked memory: torch's pinned allocator, or a block
        host_empty registered (torch >= 2.11's is_pinned() asks its own allocator only)."""
        start, stop = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        return t.is_pinned() or any(p <= start and stop <= p + n for p, n in self._registered.items())

    def device_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        t.record_stream(self.copy_stream)  # freeing a slab waits for the copy stream's work on it
        return t

    def _event(self) -> Any:
        return torch.cuda.Event(enable_timing=self.timing)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, kind: str, after: Any = None) -> Any:
        stream = self.copy_stream
        if after is not None:
            stream.wait_event(after)
        start, end = self._event(), self._event()
        with torch.cuda.stream(stream):
            start.record(stream)
            dst.copy_(src, non_blocking=True)  # pinned <-> device, contiguous rows: a DMA on the copy engine
            end.record(stream)
        self._account(kind, src.numel() * src.element_size())
        if self.timing:
            self._pending.append((kind, start, end))
        return end

    def record(self) -> Any:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def wait(self, event: Any) -> None:
        compute = torch.cuda.current_stream(self.device)
        if not self.timing:
            compute.wait_event(event)
            return
        start, end = self._event(), self._event()
        start.record(compute)
        compute.wait_event(event)
        end.record(compute)  # start..end = how long the compute stream sat on this copy
        self._pending.append(("wait", start, end))

    def drain(self, block: bool = False) -> None:
        """Fold finished timings into the stats (non-blocking unless `block`), bounding the list."""
        done = 0
        for what, start, end in self._pending:
            if block:
                end.synchronize()
            elif not end.query():
                break
            seconds = start.elapsed_time(end) / 1e3
            if what == "h2d":
                self.stats.h2d_s += seconds
            elif what == "d2h":
                self.stats.d2h_s += seconds
            else:
                self.stats.wait_s += seconds
            done += 1
        del self._pending[:done]

    def collect(self) -> TransferStats:
        self.drain(block=True)
        return self.stats.copy()
