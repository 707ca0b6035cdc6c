"""What every benchmark script shares: where results go, the machine's description, JSON output,
prompts, device sync, a log line, the memory-read bandwidth, and the emission clock of a run.
Scripts import this module, never each other."""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
RTX4090_MEMORY_OVER_LINK = 1008 / 25  # ~40: a 4090's memory bandwidth over its PCIe 4.0 x16 link


def write_json(out: str | Path, name: str, result: dict, tag: str = "") -> Path:
    """`result` as `<out>/<name>[_<tag>].json` (the folder made if needed); returns the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}{'_' + tag if tag else ''}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    return path


def machine_info(device: torch.device) -> dict:
    import transformers

    info = {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
            "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def make_prompt(context: int, vocab: int, text_ids: list[int] | None) -> list[int]:
    """`context` tokens: the text's tokens repeated and cut, or seeded random ids."""
    if text_ids:
        return (text_ids * (context // len(text_ids) + 1))[:context]
    return torch.randint(0, vocab, (context,), generator=torch.Generator().manual_seed(context)).tolist()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def memory_read_gbps(nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """This machine's memory-read GB/s: median time of a sum over `nbytes` of fp32."""
    x = torch.ones(nbytes // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times) / 1e9


class Clock:
    """Emission times; s/token over every emission after the first (the first token comes from the
    catch-up forward of the newest prompt token, not from a round). The copy-engine counters are
    snapshotted at the first emission, so the copies counted are those of the timed L3 passes."""

    def __init__(self, counters: Any) -> None:
        self.events: list[tuple[float, int]] = []
        self.counters = counters
        self.start: Any = None

    def __call__(self, tokens: list[int]) -> None:
        if not self.events:
            self.start = self.counters()
        self.events.append((time.perf_counter(), len(tokens)))

    def s_per_token(self) -> float | None:
        if len(self.events) < 2:
            return None
        return (self.events[-1][0] - self.events[0][0]) / sum(n for _, n in self.events[1:])


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table: the header, its rule, one line per row (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(x) for x in row) + " |" for row in rows])
