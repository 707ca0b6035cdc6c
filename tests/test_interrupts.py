"""Ctrl-C ends a run wherever it waits (issue 25): a wait on the emulated link wakes for a signal at once,
the copy engine leaves signals to the main thread, a run started with SIGINT ignored still stops on it,
and --emulate-link refuses what cannot be a link (non-finite, or a pass of over an hour) and warns,
with the time, about a very slow one."""
from __future__ import annotations

import _thread
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from offload_runtime import trained
from offload_runtime.cuda_streams import EmulatedLinkBackend
from offload_runtime.cuda_streams import emulated
from offload_runtime.errors import UserError
from offload_runtime.run import main
from offload_runtime.validation import check_link_time

ROOT = Path(__file__).resolve().parent.parent


def slow_copy(backend: EmulatedLinkBackend) -> emulated.CopyEvent:
    """A copy that takes about 100 s on a 1e-6 GB/s link (in one piece: the engine sleeps its slot)."""
    return backend.copy(torch.zeros(25_000), torch.ones(25_000), "h2d")


def interrupted_wait(backend: EmulatedLinkBackend, event: emulated.CopyEvent) -> float | None:
    """Wait on `event` in the main thread while another thread 'presses Ctrl-C' with interrupt_main (which,
    like a signal handled by another thread, sets Python's flag but wakes no blocked wait). Seconds from
    the interrupt to KeyboardInterrupt, or None if the wait ignored it (a watchdog ends it after 3 s)."""
    pressed: list[float] = []
    gave_up: list[bool] = []

    def press() -> None:
        pressed.append(time.perf_counter())
        _thread.interrupt_main()

    def give_up() -> None:
        gave_up.append(True)
        event.set()

    timer, watchdog = threading.Timer(0.3, press), threading.Timer(3.0, give_up)
    timer.start()
    watchdog.start()
    try:
        backend.wait(event)
        time.sleep(0)  # (a late interrupt lands here, still inside the try)
    except KeyboardInterrupt:
        return None if gave_up else time.perf_counter() - pressed[0]
    finally:
        timer.cancel()
        watchdog.cancel()
    return None


def test_a_wait_on_a_slow_copy_wakes_for_ctrl_c():
    backend = EmulatedLinkBackend("cpu", link_gbps=1e-6)
    try:
        seconds = interrupted_wait(backend, slow_copy(backend))
        assert seconds is not None  # before the watchdog (it wakes every WAIT_SLICE_S = 0.1 s)
        print(f"interrupt to KeyboardInterrupt: {seconds:.3f} s")
    finally:
        backend.close(cancel=True)


def test_sabotage_an_unsliced_wait_ignores_ctrl_c(monkeypatch):
    """The harness above catches a wait that blocks without waking (the code before issue 25)."""
    monkeypatch.setattr(emulated.CopyEvent, "synchronize", lambda self, slow=None: self._done.wait())
    backend = EmulatedLinkBackend("cpu", link_gbps=1e-6)
    try:
        assert interrupted_wait(backend, slow_copy(backend)) is None
    finally:
        backend.close(cancel=True)


def test_cancel_ends_a_copy_in_flight_and_drops_the_queue():
    backend = EmulatedLinkBackend("cpu", link_gbps=1e-6)
    first, second = slow_copy(backend), slow_copy(backend)
    t = time.perf_counter()
    backend.close(cancel=True)
    assert time.perf_counter() - t < 5.0 and not backend._thread.is_alive()
    for event in (first, second):
        with pytest.raises(emulated.CopyCancelled):
            event.synchronize()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the thread's signal mask from /proc")
def test_the_copy_engine_leaves_signals_to_the_main_thread():
    backend = EmulatedLinkBackend("cpu", link_gbps=1.0)
    try:
        backend.wait(backend.copy(torch.zeros(4), torch.ones(4), "h2d"))  # the engine has started
        status = Path(f"/proc/self/task/{backend._thread.native_id}/status").read_text()
        blocked = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
        assert blocked & (1 << (signal.SIGINT - 1)) and blocked & (1 << (signal.SIGTERM - 1))
    finally:
        backend.close()


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0", "-1"])
def test_emulate_link_must_be_positive_and_finite(capsys, value):
    assert main(["--model", str(trained.TARGET), "--prompt", "Once", f"--emulate-link={value}", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --emulate-link must be a positive GB/s, a finite number: got ") and err.count("\n") == 1


def test_a_link_too_slow_to_use_is_refused_with_the_time(capsys):
    """1e-9 GB/s: one pass over stories260K's cache takes days. Refused before any weight loads."""
    assert main(["--model", str(trained.TARGET), "--prompt-file", str(trained.STORY), "--emulate-link", "1e-9",
                 "--device", "cpu", "--max-new-tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "one pass over the offloaded cache" in err and "days" in err
    assert "the slowest link accepted for this run is" in err


def test_slow_link_warns_with_the_time_of_a_pass(capsys):
    check_link_time(1e-6, 564_000)  # 9.4 minutes a pass: accepted, said
    assert capsys.readouterr().err == ("warning: --emulate-link 1e-06: one pass over the offloaded cache (0.564 MB) "
                                       "takes 9.4 minutes (every generated token needs about one); Ctrl-C stops the run\n")
    check_link_time(1.0, 564_000)  # 0.6 ms: nothing to say
    assert capsys.readouterr().err == ""
    with pytest.raises(UserError, match="takes 66 minutes; the slowest link accepted for this run is 1.1e-07 GB/s"):
        check_link_time(1e-7, 396_000)  # 100 bytes/s


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def test_ctrl_c_during_a_slow_emulated_copy_exits_130():
    """The CLI at --emulate-link 1e-6 sits in a copy for minutes; SIGINT ends it with status 130. The child is
    started with SIGINT ignored, as a script's background job is (the case where it used to be ignored)."""
    cmd = [sys.executable, "-m", "offload_runtime.run", "--model", str(trained.TARGET), "--prompt-file",
           str(trained.STORY), "--emulate-link", "1e-6", "--device", "cpu", "--max-new-tokens", "8"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(child.stderr, lines), daemon=True).start()
    seen: list[str] = []
    try:
        while not (seen and seen[-1].startswith("[emulated link at 1e-06 GB/s: the compute has waited")):
            line = lines.get(timeout=180)  # the state: the main thread is waiting on a slow copy
            assert line is not None, "".join(seen)
            seen.append(line)
        t = time.perf_counter()
        child.send_signal(signal.SIGINT)
        code = child.wait(timeout=60)
        seconds = time.perf_counter() - t
    finally:
        child.kill()
        child.wait()
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    err = "".join(seen)
    print(f"SIGINT to exit: {seconds:.2f} s")
    assert code == 130 and seen[-1] == "interrupted\n" and "Traceback" not in err, err
    assert seconds < 10.0, f"{seconds:.1f} s"  # (about 1-2 s measured, most of it interpreter teardown)
    assert "warning: --emulate-link 1e-06: one pass over the offloaded cache" in err
