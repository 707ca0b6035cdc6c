"""uvicorn, adapted: a deadline for a request's headers, and a shutdown that does not wait for answers.

uvicorn bounds neither the time a client takes to send its headers (a connection that sends half a
request is held forever) nor, by default, the time a shutdown waits for running requests (a long
answer held SIGTERM for as long as it took), and after a graceful stop it re-raises the signal it
caught, so the process died of it instead of exiting 0.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("offload_runtime.serve")


class DeadlineProtocol(H11Protocol):
    """HTTP/1.1 whose connections must send a request's complete headers within `read_timeout` seconds
    of opening, or of the first byte of a later request; else the connection is closed, with one log line.
    (Idle keep-alive connections stay uvicorn's: closed after --timeout-keep-alive. The body has its own
    deadline in the application: server_app.read_json, 408.)"""

    def __init__(self, *args: Any, read_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.deadline is None and self._between_requests():
            self._arm()  # the first bytes of a new request
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._disarm()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self.deadline = self.loop.call_later(self.read_timeout, self._expire)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expire(self) -> None:
        self.deadline = None
        if self._between_requests() and not self.transport.is_closing():  # the headers never completed
            who = "%s:%d" % self.client if self.client else "a client"
            log.warning("%s sent no complete request headers within %g s: connection closed", who, self.read_timeout)
            self.transport.close()


class Server(uvicorn.Server):
    """SIGTERM or SIGINT: stop accepting (uvicorn closes the sockets), cancel every queued and running
    generation through the engine's cancellation path (their clients get a 503 error), let the answers
    end within GRACE_S, exit with status 0. A second SIGINT skips the wait."""
    GRACE_S = 1.0

    def __init__(self, config: uvicorn.Config, worker: Any) -> None:
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's, less its record of the signal (which it re-raises once stopped: the process died of it)
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True
        self.worker.cancel_all()
