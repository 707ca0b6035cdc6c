"""An emulated PCIe link on the CPU: a real asynchronous copy engine with a speed limit.

`EmulatedLinkBackend` keeps the `Backend` interface, but unlike the synchronous
`CpuBackend` the copies really run concurrently with compute: one worker thread is the
copy engine, it runs copies strictly in issue order, and each copy takes at least
bytes / link_gbps seconds (a piece is copied, then the engine sleeps the rest of that
piece's time slot; large copies go in pieces so the bytes land at an even pace, as a
DMA's do). So every ordering promise the CUDA backend makes is exercised for real: a
missing `wait` lets compute read a half-copied slab, a slab reused before its write-back
ran puts the next layer's rows on the host. This is what the race tests and the
consumer-GPU benchmark (`--emulate-link GBPS`) run on; results are labelled EMULATED.

Host compute is synchronous, so `record()` returns an event that is already complete,
and `wait(event)` blocks the calling (compute) thread until the copy is done; the blocked
time is `wait_s`. `h2d_s` / `d2h_s` are the copy engine's busy time per copy.
"""
from __future__ import annotations

import queue
import threading
import time
import weakref
from typing import Any

import torch

from .backend import DONE, Backend, TransferStats

PIECE_BYTES = 1 << 20  # default pace granularity: 1 MiB per time slot


class CopyEngineError(RuntimeError):
    """A copy failed on the emulated copy engine (raised in the thread that waits on it)."""


class CopyEvent:
    """The end of one copy on the emulated copy engine (or the copy engine's failure)."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.error: BaseException | None = None

    def set(self, error: BaseException | None = None) -> None:
        self.error = error
        self._done.set()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise CopyEngineError(f"the emulated copy engine failed: {self.error!r}") from self.error


def _run_copy(dst: torch.Tensor, src: torch.Tensor, seconds_per_byte: float, piece_bytes: int) -> None:
    """Copy src into dst piece by piece along the first dimension, each piece in its own time slot."""
    start = time.perf_counter()
    if src.dim() == 0 or src.shape[0] == 0:
        dst.copy_(src)
        return
    n = src.shape[0]
    row_bytes = max(1, src.numel() * src.element_size() // n)
    step = max(1, piece_bytes // row_bytes)
    done_bytes = 0
    for a in range(0, n, step):
        b = min(n, a + step)
        dst[a:b].copy_(src[a:b])
        done_bytes += (b - a) * row_bytes
        remaining = start + done_bytes * seconds_per_byte - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)


def _engine_loop(jobs: "queue.Queue[Any]", stats: TransferStats, seconds_per_byte: float, piece_bytes: int) -> None:
    """The copy engine: jobs in issue order until the None sentinel. Holds no reference to the backend,
    so dropping the backend (its finalizer sends the sentinel) ends the thread."""
    failed: BaseException | None = None
    while True:
        job = jobs.get()
        if job is None:
            return
        dst, src, kind, after, event = job
        if failed is None:
            try:
                if after is not None:
                    after.synchronize()
                t = time.perf_counter()
                _run_copy(dst, src, seconds_per_byte, piece_bytes)
                dt = time.perf_counter() - t
                if kind == "h2d":
                    stats.h2d_s += dt
                else:
                    stats.d2h_s += dt
            except BaseException as exc:  # noqa: BLE001 - surfaced to the waiting thread
                failed = exc
        event.set(failed)  # after a failure every later copy fails too: the engine's order is broken


class EmulatedLinkBackend(Backend):
    """Host 'device' memory on the CPU, a copy-engine thread pacing every copy at `link_gbps`."""

    name = "emulated"

    def __init__(self, device: torch.device | str, link_gbps: float, trace: bool = False,
                 piece_bytes: int = PIECE_BYTES) -> None:
        super().__init__(device, trace)
        if self.device.type != "cpu":
            raise ValueError(f"the emulated link runs on the CPU, got {self.device}")
        if not link_gbps > 0:
            raise ValueError(f"link_gbps must be positive, got {link_gbps}")
        self.link_gbps = float(link_gbps)
        self.piece_bytes = piece_bytes
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._last: CopyEvent | None = None
        self._thread = threading.Thread(target=_engine_loop, name="emulated-copy-engine", daemon=True,
                                        args=(self._jobs, self.stats, 1 / (self.link_gbps * 1e9), piece_bytes))
        self._thread.start()
        self._finalizer = weakref.finalize(self, self._jobs.put, None)

    def close(self) -> None:
        """Stop the copy engine after the copies already issued (also happens when the backend is dropped)."""
        self._finalizer()
        self._thread.join()

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, kind: str, after: Any = None) -> Any:
        if self._last is not None and self._last.query() and self._last.error is not None:
            self._last.synchronize()  # raises: the engine failed, do not queue more work behind it
        if not self._thread.is_alive():
            raise CopyEngineError("the emulated copy engine is closed")
        event = CopyEvent()
        self._account(kind, src.numel() * src.element_size())
        self._jobs.put((dst, src, kind, None if after is DONE else after, event))
        self._last = event
        return event

    def record(self) -> Any:
        return DONE  # host compute is synchronous: everything issued so far has run

    def wait(self, event: Any) -> None:
        if event is None or event.query() and getattr(event, "error", None) is None:
            return
        t = time.perf_counter()
        try:
            event.synchronize()
        finally:
            self.stats.wait_s += time.perf_counter() - t

    def collect(self) -> TransferStats:
        if self._last is not None:
            self._last.synchronize()  # every issued copy's time is in the stats
        return self.stats.copy()
