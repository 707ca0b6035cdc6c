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

Interrupts and exit: every wait (the compute thread's on a copy, the engine's pacing) runs in
short slices, and the engine thread blocks SIGINT/SIGTERM, so Ctrl-C reaches the main thread
at once however slow the link. `close(cancel=True)` drops the copies not yet run; at
interpreter exit every live engine is stopped and joined (atexit), before Python finalizes:
an engine thread still inside a torch copy then is killed in C++ ("terminate called without
an active exception").
"""
from __future__ import annotations

import atexit
import queue
import signal
import sys
import threading
import time
import weakref
from typing import Any, Callable

import torch

from .backend import DONE, Backend, TransferStats

PIECE_BYTES = 1 << 20  # default pace granularity: 1 MiB per time slot
WAIT_SLICE_S = 0.1  # every wait wakes this often: Ctrl-C is handled in the main thread within it
SLOW_WAIT_S = 1.0  # a compute wait longer than this says so on stderr, once per backend


class CopyEngineError(RuntimeError):
    """A copy failed on the emulated copy engine (raised in the thread that waits on it)."""


class CopyCancelled(CopyEngineError):
    """The copy engine was closed with cancel=True before this copy ran."""


class CopyEvent:
    """The end of one copy on the emulated copy engine (or the copy engine's failure)."""

    def __init__(self, nbytes: int = 0) -> None:
        self._done = threading.Event()
        self.error: BaseException | None = None
        self.nbytes = nbytes

    def set(self, error: BaseException | None = None) -> None:
        self.error = error
        self._done.set()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self, slow: Callable[[float], None] | None = None) -> None:
        """Block until the copy is done, in slices (a signal is handled between them); `slow(seconds)`
        is called once if the wait lasts SLOW_WAIT_S."""
        start = time.perf_counter()
        while not self._done.wait(WAIT_SLICE_S):
            if slow is not None and time.perf_counter() - start >= SLOW_WAIT_S:
                slow(time.perf_counter() - start)
                slow = None
        if isinstance(self.error, CopyCancelled):
            raise self.error
        if self.error is not None:
            raise CopyEngineError(f"the emulated copy engine failed: {self.error!r}") from self.error


def _run_copy(dst: torch.Tensor, src: torch.Tensor, seconds_per_byte: float, piece_bytes: int,
              stop: threading.Event | None = None) -> None:
    """Copy src into dst piece by piece along the first dimension, each piece in its own time slot
    (the slot's rest is waited on `stop`: a cancel ends the copy at the next piece)."""
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
        if remaining > 0 and stop is not None and stop.wait(remaining):
            raise CopyCancelled("the emulated copy engine was closed before this copy finished")
        elif remaining > 0 and stop is None:
            time.sleep(remaining)


def _engine_loop(jobs: "queue.Queue[Any]", stats: TransferStats, seconds_per_byte: float, piece_bytes: int,
                 stop: threading.Event) -> None:
    """The copy engine: jobs in issue order until the None sentinel. Holds no reference to the backend,
    so dropping the backend (its finalizer sends the sentinel) ends the thread. Signals are blocked
    here: the kernel hands SIGINT to the main thread, which is waiting in slices and handles it."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    failed: BaseException | None = None
    try:
        while True:
            job = jobs.get()
            if job is None:
                return
            event = job[-1]
            if failed is None:  # after a failure every later copy fails too: the engine's order is broken
                failed = _one_copy(job, stats, seconds_per_byte, piece_bytes, stop)
            # The job's tensors are released here, before the event: once the waiter wakes (and maybe
            # exits), this thread frees no tensor. torch frees a tensor with the GIL released, and a
            # daemon thread taking the GIL back during finalization aborts the process (std::terminate).
            del job
            event.set(failed)
    finally:
        _ENGINES.pop(threading.current_thread(), None)


def _one_copy(job: tuple, stats: TransferStats, seconds_per_byte: float, piece_bytes: int,
              stop: threading.Event) -> BaseException | None:
    """Run one queued copy; its failure (None: done)."""
    dst, src, kind, after, _ = job
    if stop.is_set():
        return CopyCancelled("the emulated copy engine was closed before this copy ran")
    try:
        if after is not None:
            after.synchronize()
        t = time.perf_counter()
        _run_copy(dst, src, seconds_per_byte, piece_bytes, stop)
        dt = time.perf_counter() - t
    except BaseException as exc:  # noqa: BLE001 - surfaced to the waiting thread
        return exc.with_traceback(None)  # (its frames would keep the copy's tensors alive in this thread)
    if kind == "h2d":
        stats.h2d_s += dt
    else:
        stats.d2h_s += dt
    return None


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
        self._queued: list[CopyEvent] = []  # issued copies not seen done yet, in issue order
        self._stop = threading.Event()
        self._told_slow = False
        self._thread = threading.Thread(target=_engine_loop, name="emulated-copy-engine", daemon=True,
                                        args=(self._jobs, self.stats, 1 / (self.link_gbps * 1e9), piece_bytes,
                                              self._stop))
        _ENGINES[self._thread] = (self._stop, self._jobs)
        self._thread.start()
        self._finalizer = weakref.finalize(self, self._jobs.put, None)

    def close(self, cancel: bool = False) -> None:
        """Stop the copy engine and join it: after the copies already issued (also what dropping the
        backend does), or with `cancel` at once (copies not yet run fail with CopyCancelled, the one
        in flight stops at its next piece)."""
        if cancel:
            self._stop.set()
        self._finalizer()  # the sentinel, once
        while self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(WAIT_SLICE_S)

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, kind: str, after: Any = None) -> Any:
        if self._last is not None and self._last.query() and self._last.error is not None:
            self._last.synchronize()  # raises: the engine failed, do not queue more work behind it
        if not self._finalizer.alive or not self._thread.is_alive():
            raise CopyEngineError("the emulated copy engine is closed")
        nbytes = src.numel() * src.element_size()
        event = CopyEvent(nbytes)
        self._account(kind, nbytes)
        self._jobs.put((dst, src, kind, None if after is DONE else after, event))
        self._last = event
        while self._queued and self._queued[0].query():
            del self._queued[0]
        self._queued.append(event)
        return event

    def record(self) -> Any:
        return DONE  # host compute is synchronous: everything issued so far has run

    def wait(self, event: Any) -> None:
        if event is None or event.query() and getattr(event, "error", None) is None:
            return
        t = time.perf_counter()
        try:
            if isinstance(event, CopyEvent):
                event.synchronize(lambda seconds: self._slow(seconds, event))
            else:
                event.synchronize()
        finally:
            self.stats.wait_s += time.perf_counter() - t

    def _slow(self, seconds: float, event: CopyEvent) -> None:
        """Say once that the compute sits on a slow copy (a tiny --emulate-link prints nothing else for long)."""
        if self._told_slow:
            return
        self._told_slow = True
        ahead = self._queued[: self._queued.index(event) + 1] if event in self._queued else [event]
        queued = sum(e.nbytes for e in ahead if not e.query())
        print(f"[emulated link at {self.link_gbps:g} GB/s: the compute has waited {seconds:.0f} s for a copy; "
              f"{queued / 1e6:.3g} MB are queued up to it, {queued / (self.link_gbps * 1e9):.3g} s at this speed; "
              "Ctrl-C stops]", file=sys.stderr, flush=True)

    def collect(self) -> TransferStats:
        if self._last is not None:
            self._last.synchronize()  # every issued copy's time is in the stats
        return self.stats.copy()


# Every engine thread still running (also those of dropped backends, which may still be ending): thread ->
# (its stop event, its job queue). The thread removes itself when it ends.
_ENGINES: dict[threading.Thread, tuple[threading.Event, "queue.Queue[Any]"]] = {}
EXIT_JOIN_S = 10.0  # at exit, wait at most this long for the engines (one stuck on a foreign event is left)


@atexit.register
def close_all_engines() -> None:
    """Stop every copy engine now and join it (atexit: before Python finalizes). An engine thread that
    frees a tensor while the interpreter finalizes is killed inside torch's C++ ('terminate called
    without an active exception', status 134): shut them down in order instead."""
    for stop, jobs in list(_ENGINES.values()):
        stop.set()
        jobs.put(None)
    deadline = time.monotonic() + EXIT_JOIN_S
    for thread in list(_ENGINES):
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(WAIT_SLICE_S)
