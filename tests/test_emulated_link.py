"""The emulated link backend: paced, in order, `after` respected, failures surfaced, no leaked threads;
and the CLI's --emulate-link (refusals, the report)."""
from __future__ import annotations

import gc
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from offload_runtime.cuda_streams import CpuBackend, EmulatedLinkBackend, make_backend
from offload_runtime.cuda_streams.emulated import CopyEngineError
from offload_runtime.errors import UserError
from offload_runtime.validation import check_emulated_link


def test_copies_take_bytes_over_link_and_run_in_order():
    backend = EmulatedLinkBackend("cpu", link_gbps=0.1, piece_bytes=4096)
    src = torch.arange(50_000, dtype=torch.float32)  # 200 KB: at least 2 ms at 0.1 GB/s
    dst = torch.zeros_like(src)
    t = time.perf_counter()
    first = backend.copy(dst, src, "h2d")
    back = torch.zeros_like(src)
    second = backend.copy(back, dst, "d2h")  # issued before the first finished: must see its bytes
    backend.wait(second)
    assert time.perf_counter() - t >= 2 * 200_000 / 0.1e9
    assert torch.equal(back, src) and first.query()
    stats = backend.collect()
    assert stats.h2d_bytes == stats.d2h_bytes == 200_000 and stats.h2d_copies == stats.d2h_copies == 1
    assert stats.h2d_s >= 200_000 / 0.1e9 and stats.d2h_s >= 200_000 / 0.1e9
    backend.close()


def test_copy_starts_after_its_event():
    backend = EmulatedLinkBackend("cpu", link_gbps=1.0)
    gate = threading.Event()
    dst = torch.zeros(4)
    event = backend.copy(dst, torch.ones(4), "h2d", after=SimpleNamespace(synchronize=gate.wait))
    time.sleep(0.02)
    assert not event.query() and torch.equal(dst, torch.zeros(4))
    gate.set()
    backend.synchronize(event)
    assert torch.equal(dst, torch.ones(4))
    assert backend.record().query()  # host compute is synchronous: recorded = complete
    backend.close()


def test_a_failed_copy_raises_in_the_waiting_thread():
    backend = EmulatedLinkBackend("cpu", link_gbps=1.0)
    bad = backend.copy(torch.zeros(3), torch.ones(5), "h2d")  # shapes do not match: fails on the engine
    with pytest.raises(CopyEngineError, match="copy engine failed"):
        backend.wait(bad)
    with pytest.raises(CopyEngineError):  # the engine's order is broken: no more work is queued
        backend.copy(torch.zeros(3), torch.ones(3), "h2d")
    with pytest.raises(CopyEngineError):
        backend.collect()
    backend.close()


def test_dropped_backends_leave_no_threads():
    before = set(threading.enumerate())
    for _ in range(40):
        backend = make_backend("cpu", link_gbps=5.0)
        backend.copy(torch.zeros(1000), torch.ones(1000), "h2d")
        del backend
    gc.collect()
    engines = [t for t in threading.enumerate() if t.name == "emulated-copy-engine" and t not in before]
    for t in engines:  # each ends once its backend is gone (waited on, with a generous safety timeout)
        t.join(120)
    assert not any(t.is_alive() for t in engines)


def test_make_backend_choices():
    assert isinstance(make_backend("cpu"), CpuBackend)
    backend = make_backend("cpu", link_gbps=2.5)
    assert isinstance(backend, EmulatedLinkBackend) and backend.name == "emulated" and backend.link_gbps == 2.5
    backend.close()
    with pytest.raises(ValueError):
        EmulatedLinkBackend("cpu", link_gbps=0)


@pytest.mark.parametrize("gbps, device, offload, message", [
    (0.0, "cpu", "auto", "must be a positive GB/s"),
    (-3.0, "cpu", "auto", "must be a positive GB/s"),
    (1.0, "cuda", "auto", "use it with --device cpu"),
    (1.0, "cpu", "off", "cannot be used with --offload off"),
])
def test_emulate_link_refusals(gbps, device, offload, message):
    with pytest.raises(UserError, match=message):
        check_emulated_link(SimpleNamespace(emulate_link=gbps, offload=offload), torch.device(device))


def test_cli_refuses_with_one_error_line(capsys):
    from offload_runtime import trained
    from offload_runtime.run import main

    assert main(["--model", str(trained.TARGET), "--prompt", "Once", "--emulate-link", "0",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --emulate-link") and err.count("\n") == 1
