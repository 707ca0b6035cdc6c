"""Link probe: pinned host-to-device bandwidth, measured once per machine and cached.

Reports state achieved GB/s as a fraction of this number ("x% of this link"). The cache
lives in $OFFLOAD_RUNTIME_CACHE or ~/.cache/offload_runtime (XDG_CACHE_HOME respected),
keyed by host name and GPU (name and PCI bus id), so a different card re-measures.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

PROBE_BYTES = 256 << 20
PROBE_REPEATS = 8


def cache_dir() -> Path:
    if os.environ.get("OFFLOAD_RUNTIME_CACHE"):
        return Path(os.environ["OFFLOAD_RUNTIME_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "offload_runtime"


def device_key(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)
    bus = f"{getattr(props, 'pci_domain_id', 0):04x}:{getattr(props, 'pci_bus_id', 0):02x}:{getattr(props, 'pci_device_id', 0):02x}"
    return f"{socket.gethostname()}|{props.name}|{bus}"


def measure_h2d(device: torch.device, nbytes: int = PROBE_BYTES, repeats: int = PROBE_REPEATS) -> float:
    """GB/s (1e9 bytes) of pinned host -> device copies on a side stream, timed with CUDA events."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(repeats):
            dst.copy_(src, non_blocking=True)
        end.record(stream)
    end.synchronize()
    return nbytes * repeats / (start.elapsed_time(end) / 1e3) / 1e9


def link_bandwidth(device: torch.device | str, refresh: bool = False) -> float | None:
    """This machine's pinned H2D GB/s for `device` (None on CPU: there is no link)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    path = cache_dir() / "link_bandwidth.json"
    key = device_key(device)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known and not refresh:
        return float(known[key])
    gbps = measure_h2d(device)
    known[key] = gbps
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known, indent=1))
    except OSError:
        pass  # an unwritable cache only costs a re-measure next time
    return gbps
