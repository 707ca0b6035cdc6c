"""Stopping the server: SIGTERM or SIGINT stop accepting, cancel the running and queued generations (their
clients get a 503 `server_shutting_down`, at once), and the process exits with status 0. In-process
(SIGINT's handler called on a server in a thread) and once for real: SIGTERM to `python -m
offload_runtime.serve` during a long streamed answer of the trained stories260K pair."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from offload_runtime import serve

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "offload_runtime" / "assets"
MODELS = ["--model", str(ASSETS / "stories260K"), "--draft", str(ASSETS / "stories260K-draft41K"), "--device", "cpu",
          "--budget", "64"]
LONG = {"prompt": "Once upon a time", "max_tokens": 480, "stream": True}  # minutes' worth, were it not stopped


def events(lines) -> list[dict | str]:
    """The server-sent events of a stream, decoded ("[DONE]" as is)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_for(condition, what: str, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_sigint_cancels_the_generations_answers_503_and_stops_accepting():
    args = serve.parse_args([*MODELS, "--max-new-tokens", "8"])
    app, worker = serve.build(args)
    web = serve.make_server(app, worker, "127.0.0.1", 0, 30.0, log_level="warning")
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    wait_for(lambda: web.started, "the server to start")
    base = f"http://127.0.0.1:{web.servers[0].sockets[0].getsockname()[1]}"
    queued: dict = {}

    def ask() -> None:  # a non-streamed request, queued behind the stream
        queued["reply"] = httpx.post(base + "/v1/completions", json=dict(LONG, stream=False), timeout=60)

    try:
        with httpx.stream("POST", base + "/v1/completions", json=LONG, timeout=60) as stream:
            lines = stream.iter_lines()
            first = [next(lines) for _ in range(3)]
            asker = threading.Thread(target=ask, daemon=True)
            asker.start()
            wait_for(lambda: worker.counts["received"] == 2, "the second request to queue")
            web.handle_exit(signal.SIGINT, None)  # what the signal calls (the server runs in a thread here)
            rest = list(lines)
        asker.join(30)
        thread.join(30)
        wait_for(lambda: worker.counts["cancelled"] == 2, "both generations to end as cancelled")
    finally:
        worker.close()
    assert not thread.is_alive(), "the server did not stop"
    last = events(first + rest)[-1]
    assert last["error"]["code"] == "server_shutting_down" and "[DONE]" not in rest
    assert queued["reply"].status_code == 503 and queued["reply"].json()["error"]["code"] == "server_shutting_down"
    assert worker.counts["completed"] == 0 and worker.counts["failed"] == 0  # (cancelled, as Ctrl-C cancels)
    with pytest.raises(httpx.ConnectError):  # no longer accepting
        httpx.get(base + "/health", timeout=5)


def test_sigterm_during_a_long_stream_exits_0_promptly():
    """The subprocess, as a user runs it (loopback, any free port). Bounds are generous: the time is reported
    by the test's output on failure, not asserted close (a loaded machine tears Python down slowly)."""
    proc = subprocess.Popen([sys.executable, "-m", "offload_runtime.serve", *MODELS, "--port", "0"], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    try:
        wait_for(lambda: any("Uvicorn running on" in line for line in log) or proc.poll() is not None,
                 "the server to start", seconds=120)
        port = re.search(r"http://127\.0\.0\.1:(\d+)", next(l for l in log if "Uvicorn running on" in l)).group(1)
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=LONG, timeout=60) as stream:
            lines = stream.iter_lines()
            first = [next(lines) for _ in range(3)]
            sent = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        status = proc.wait(30)
        took = time.perf_counter() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status == 0, "".join(log)
    assert events(first + rest)[-1]["error"]["code"] == "server_shutting_down"
    assert took < 10, f"exit took {took:.1f} s"
    assert not [line for line in log if "Traceback" in line], "".join(log)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()
