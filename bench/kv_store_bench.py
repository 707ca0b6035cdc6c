"""Time to first token for the second open of a long document: cold prefill, from the KV store
on disk (the OS page cache dropped first), and from the store's files in the page cache (RAM);
the store's read GB/s against the disk's own read bandwidth, measured in the same run.

    python -m bench.kv_store_bench                      # synthetic `small` at 8K and 32K, and the demo's story
    python -m bench.kv_store_bench --contexts 2048 --shape tiny      # a quick look

Each open is a fresh Session with the whole document plus a question as one prompt and one new
token (its time is the time to first token). The greedy token after a restore is checked against
the cold one's. Dropping a file from the page cache uses posix_fadvise(DONTNEED); where the kernel
ignores it the "disk" column is a page-cache read (the measured disk bandwidth says which).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from offload_runtime.kv_store import SUFFIX, KVStore
from offload_runtime.sampling import SamplingParams
from offload_runtime.session import Session
from offload_runtime.settings import EngineSettings

from .models import SHAPES, build_pair
from .common import RESULTS, machine_info, make_prompt, markdown_table, write_json

QUESTION = 24  # tokens after the document


def drop_page_cache(folder: Path) -> None:
    for p in folder.rglob(f"*{SUFFIX}"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_read_gbps(folder: Path, mib: int = 512) -> float:
    """This disk's sequential read bandwidth: a fresh file, dropped from the page cache, read once."""
    path = folder / "bandwidth.probe"
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    t0 = time.perf_counter()
    while os.read(fd, 8 << 20):
        pass
    seconds = time.perf_counter() - t0
    os.close(fd)
    path.unlink()
    return mib * 2**20 / seconds / 1e9


def first_token(model: Any, prompt: list[int], store: KVStore | None) -> tuple[float, int, dict]:
    """(seconds to the first token, the token, stats) of a fresh session over `prompt`."""
    session = Session(model, None, SamplingParams(), [], EngineSettings(), torch.Generator(), "autoregressive",
                      capacity=len(prompt) + 8, kv_store=store)
    t0 = time.perf_counter()
    session.extend(prompt)
    result = session.generate(1)
    return time.perf_counter() - t0, result.token_ids[0], result.stats


def bench_document(model: Any, prompt: list[int], folder: Path, repeats: int) -> dict:
    """Cold, disk and RAM opens of one document (after a first open that fills the store)."""
    cold_s, token, _ = first_token(model, prompt, None)
    first_token(model, prompt, KVStore(folder, model))  # the first open: prefilled and saved
    rows: dict[str, list[float]] = {"disk": [], "ram": []}
    restored = 0
    for _ in range(repeats):
        for kind in ("disk", "ram"):
            if kind == "disk":
                drop_page_cache(folder)
            s, t, stats = first_token(model, prompt, KVStore(folder, model))
            assert t == token, "a restored prefix gave another token than the cold prefill"
            rows[kind].append(s)
            restored = stats["restored_tokens"]
    stored = sum(p.stat().st_size for p in folder.rglob(f"*{SUFFIX}"))
    disk_s, ram_s = statistics.median(rows["disk"]), statistics.median(rows["ram"])
    return {"tokens": len(prompt), "restored_tokens": restored, "store_bytes": stored, "cold_s": cold_s,
            "disk_s": disk_s, "ram_s": ram_s, "disk_runs": rows["disk"], "ram_runs": rows["ram"],
            "disk_over_cold": disk_s / cold_s, "ram_over_cold": ram_s / cold_s,
            "store_read_gbps_disk": stored / disk_s / 1e9, "same_token": True}


def server_run(extra: list[str], prompts: list[str]) -> dict:
    """Each request (max_tokens 1) through the in-process server: seconds to its first token, tokens prefilled."""
    import asyncio

    import httpx

    from offload_runtime import serve, trained

    args = serve.parse_args(["--model", str(trained.TARGET), "--device", "cpu", "--mode", "autoregressive",
                             "--model-name", "m", *extra])
    app, worker = serve.build(args)

    async def send() -> list[tuple[float, int, str]]:
        out = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b", timeout=300) as c:
            for prompt in prompts:
                t0 = time.perf_counter()
                r = (await c.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 1})).json()
                out.append((time.perf_counter() - t0, r["offload_runtime"]["prefilled_tokens"], r["choices"][0]["text"]))
        return out

    try:
        got = asyncio.run(send())
    finally:
        worker.close()
    return {"ttft_s": [g[0] for g in got], "prefilled": [g[1] for g in got], "texts": [g[2] for g in got]}


def server_rows(base: Path, questions: int = 5) -> list[dict]:
    """3 documents x `questions` questions, interleaved: a cold server, several contexts in RAM, the disk store."""
    from offload_runtime import trained

    sentences = [x.strip() + "." for x in trained.story_prompt().split(".") if x.strip()]
    docs = [" ".join(sentences[k:] + sentences[:k])[:1300] for k in (0, 7, 15)]
    asks = ["What did Lily see?", "Who came to the park?", "What happened at the end?", "Who is Max?", "Was it fun?"]
    prompts = [f"{docs[d]}\n\nQuestion: {q}\nAnswer:" for q in asks[:questions] for d in range(3)]
    runs = {"cold (one context)": [], "several contexts in RAM": ["--context-ram-gb", "1"],
            "one context + disk store": ["--kv-store", str(base / "server_store")]}
    out = [{"server": name, **server_run(extra, prompts)} for name, extra in runs.items()]
    cold = out[0]["texts"]
    for row in out:
        row["same_tokens_as_cold"] = row.pop("texts") == cold
    return out


def synthetic_cases(args: argparse.Namespace) -> list[tuple[str, Any, list[int]]]:
    _, model = build_pair(SHAPES[args.shape], torch.device("cpu"), torch.float32)
    return [(f"{args.shape} @ {n}", model, make_prompt(n + QUESTION, model.cfg.vocab_size, None))
            for n in args.contexts]


def story_case() -> tuple[str, Any, list[int]]:
    from offload_runtime import loading, trained

    loaded = loading.load(str(trained.TARGET), torch.device("cpu"), "float32")
    return "stories260K, the demo's story", loaded.model, loaded.tokenizer(trained.story_prompt())["input_ids"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 32768])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="the store's folder (default: a temporary one on this disk)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    base = Path(args.dir or tempfile.mkdtemp(prefix="kv_store_bench_"))
    disk = disk_read_gbps(base)
    print(f"disk read bandwidth (page cache dropped): {disk:.2f} GB/s", file=sys.stderr)
    rows = []
    for name, model, prompt in [story_case(), *synthetic_cases(args)]:
        row = bench_document(model, prompt, base / name.replace(" ", "_").replace(",", ""), args.repeats)
        rows.append({"document": name, **row})
        print(f"{name}: cold {row['cold_s']:.3f} s, disk {row['disk_s']:.3f} s ({row['disk_over_cold']:.3f}x), "
              f"RAM {row['ram_s']:.3f} s ({row['ram_over_cold']:.3f}x); {row['store_bytes'] / 1e6:.1f} MB read at "
              f"{row['store_read_gbps_disk']:.2f} GB/s (disk {disk:.2f})", file=sys.stderr)
    servers = server_rows(base)
    for row in servers:
        later = row["ttft_s"][3:]
        print(f"server, {row['server']}: {sum(row['prefilled'])} tokens prefilled over {len(row['prefilled'])} "
              f"requests, first token after a document's first question: median {statistics.median(later):.3f} s",
              file=sys.stderr)
    result = {"benchmark": "kv_store_bench", "machine": machine_info(torch.device("cpu")),
              "disk_read_gbps": disk, "rows": rows, "server": servers}
    path = write_json(args.out, "kv_store_bench", result, args.tag)
    print(markdown_table(["document", "tokens", "restored", "cold s", "disk s", "RAM s", "disk/cold", "store GB/s (disk)"],
                         [[r["document"], r["tokens"], r["restored_tokens"], f"{r['cold_s']:.3f}", f"{r['disk_s']:.3f}",
                           f"{r['ram_s']:.3f}", f"{r['disk_over_cold']:.3f}", f"{r['store_read_gbps_disk']:.2f} / {disk:.2f}"]
                          for r in rows]))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
