"""Micro-benchmark of the kernels: Triton vs the PyTorch reference vs torch SDPA, in GB/s.

    python -m bench.kernels_bench [--quick] [--dtype float16] [--out PATH]

Every kernel here is memory-bound in decode (a few queries against many K/V rows), so each
result is reported as achieved bandwidth (bytes the kernel must read and write / time)
next to the device's measured copy bandwidth. On CUDA it times the Triton kernels, the
references and SDPA; on a CPU it times the references and SDPA only and says so (the
Triton kernels need CUDA; the interpreter is for correctness, not speed). Results go to
bench/results/kernels_<device>_<time>.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from offload_runtime.kernels import reference as ref

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[[], object], device: torch.device, min_time: float = 0.2) -> float:
    """Median seconds per call (CUDA: events around batches of calls; CPU: perf_counter)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        per = max(start.elapsed_time(stop) / 1e3, 1e-6)
        reps = max(3, min(1000, int(0.05 / per)))
        samples = []
        for _ in range(5):
            start.record()
            for _ in range(reps):
                fn()
            stop.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(stop) / 1e3 / reps)
        return sorted(samples)[len(samples) // 2]
    samples, total = [], 0.0
    while total < min_time or len(samples) < 3:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        total += samples[-1]
        if len(samples) >= 50:
            break
    return sorted(samples)[len(samples) // 2]


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second of a large tensor copy on the device (the roofline)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)  # 1 GiB or 128 MiB of fp32
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / seconds


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """torch SDPA with the same positions mask (GQA through enable_gqa, no repeat_kv)."""
    mask = k_pos[None, :] <= q_pos[:, None]
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)[0]


def row(results: list, kernel: str, impl: str, shape: dict, seconds: float, nbytes: int, bandwidth: float,
        flops: float | None = None) -> None:
    gbs = nbytes / seconds / 1e9
    entry = {"kernel": kernel, "impl": impl, **shape, "us": seconds * 1e6, "bytes": nbytes,
             "GB_per_s": gbs, "fraction_of_copy_bandwidth": gbs * 1e9 / bandwidth}
    extra = ""
    if flops is not None:  # compute-bound shapes (prefill): useful FLOP/s too
        entry["TFLOP_per_s"] = flops / seconds / 1e12
        extra = f" {entry['TFLOP_per_s']:7.2f} TFLOP/s"
    results.append(entry)
    print(f"{kernel:18s} {impl:10s} {json.dumps(shape):60s} {seconds * 1e6:10.1f} us {gbs:8.1f} GB/s "
          f"({100 * gbs * 1e9 / bandwidth:5.1f}% of copy){extra}", flush=True)


HQ, HKV, D = 32, 8, 128  # a Llama-3-8B-like attention layer


@dataclass
class Bench:
    """What every benchmark section needs: where it runs, the Triton module (None on CPU), results."""
    device: torch.device
    dtype: torch.dtype
    tk: Any
    bandwidth: float
    results: list[dict]
    elt: int
    quick: bool


def bench_decode_attention(c: Bench) -> None:
    """Attention with decode-sized T against a retrieval-sized or full cache."""
    device, dtype, tk, bandwidth, results, elt = c.device, c.dtype, c.tk, c.bandwidth, c.results, c.elt
    hq, hkv, d = HQ, HKV, D
    lengths = [4096, 32768] if not c.quick else [4096]
    if device.type == "cuda" and not c.quick:
        lengths.append(131072)
    if device.type == "cpu":
        lengths = [1024, 4096] if not c.quick else [1024]

    # attention: decode-sized T against the retrieval cache (4096) or a full cache
    for length in lengths:
        for t in (1, 7, 16):
            q = torch.randn(hq, t, d, device=device, dtype=dtype)
            k = torch.randn(hkv, length, d, device=device, dtype=dtype)
            v = torch.randn(hkv, length, d, device=device, dtype=dtype)
            k_pos = torch.arange(length, device=device)
            q_pos = k_pos[-t:]
            nbytes = (2 * k.numel() + 2 * q.numel()) * elt
            shape = {"Hq": hq, "Hkv": hkv, "T": t, "L": length, "D": d, "dtype": str(dtype)}
            impls = {"reference": lambda: ref.attention_reference(q, k, v, q_pos, k_pos),
                     "sdpa": lambda: sdpa(q, k, v, q_pos, k_pos)}
            if tk is not None:
                impls = {"triton": lambda: tk.attention_triton(q, k, v, q_pos, k_pos), **impls}
            for impl, fn in impls.items():
                row(results, "attention", impl, shape, timed(fn, device), nbytes, bandwidth)




def bench_prefill_attention(c: Bench) -> None:
    """Causal prefill attention (compute-bound)."""
    device, dtype, tk, bandwidth, results, elt = c.device, c.dtype, c.tk, c.bandwidth, c.results, c.elt
    hq, hkv, d = HQ, HKV, D
    # causal prefill (queries = the keys' own rows): compute-bound; useful FLOPs count the causal half
    for t in ([2048, 8192] if device.type == "cuda" and not c.quick else [2048] if device.type == "cuda" else [256]):
        q = torch.randn(hq, t, d, device=device, dtype=dtype)
        k = torch.randn(hkv, t, d, device=device, dtype=dtype)
        v = torch.randn(hkv, t, d, device=device, dtype=dtype)
        pos = torch.arange(t, device=device)
        shape = {"Hq": hq, "Hkv": hkv, "T": t, "L": t, "D": d, "dtype": str(dtype)}
        nbytes = (2 * k.numel() + 2 * q.numel()) * elt
        flops = 2 * 2 * hq * d * t * (t + 1) / 2
        impls = {"reference": lambda: ref.attention_reference(q, k, v, pos, pos),
                 "sdpa": lambda: sdpa(q, k, v, pos, pos)}
        if tk is not None:
            impls = {"triton": lambda: tk.attention_triton(q, k, v, pos, pos), **impls}
        for impl, fn in impls.items():
            row(results, "attention_prefill", impl, shape, timed(fn, device), nbytes, bandwidth, flops)




def bench_partials(c: Bench) -> None:
    """One slab of a streamed full cache (partial + lse), and the merge of 16 partials."""
    device, dtype, tk, bandwidth, results, elt = c.device, c.dtype, c.tk, c.bandwidth, c.results, c.elt
    hq, hkv, d = HQ, HKV, D
    # one slab of a streamed full cache (partial + lse), and the merge of 16 partials
    slab = 8192 if device.type == "cuda" else 2048
    for t in (1, 7):
        q = torch.randn(hq, t, d, device=device, dtype=dtype)
        k = torch.randn(hkv, slab, d, device=device, dtype=dtype)
        v = torch.randn(hkv, slab, d, device=device, dtype=dtype)
        k_pos = torch.arange(slab, device=device)
        q_pos = torch.full((t,), slab, device=device) + torch.arange(t, device=device)
        shape = {"Hq": hq, "Hkv": hkv, "T": t, "slab": slab, "D": d, "dtype": str(dtype)}
        nbytes = 2 * k.numel() * elt + q.numel() * elt + hq * t * (d + 1) * 4
        impls = {"reference": lambda: ref.attention_partial_reference(q, k, v, q_pos, k_pos)}
        if tk is not None:
            impls = {"triton": lambda: tk.attention_partial_triton(q, k, v, q_pos, k_pos), **impls}
        for impl, fn in impls.items():
            row(results, "attention_partial", impl, shape, timed(fn, device), nbytes, bandwidth)
        outs = torch.randn(16, hq, t, d, device=device)
        lses = torch.randn(16, hq, t, device=device)
        shape = {"S": 16, "Hq": hq, "T": t, "D": d}
        nbytes = (outs.numel() + lses.numel()) * 4 + hq * t * (d * elt + 4)
        impls = {"reference": lambda: ref.merge_partials_reference(outs, lses, dtype)}
        if tk is not None:
            impls = {"triton": lambda: tk.merge_partials_triton(outs, lses, dtype), **impls}
        for impl, fn in impls.items():
            row(results, "merge_partials", impl, shape, timed(fn, device), nbytes, bandwidth)




def bench_chunk_selection(c: Bench) -> None:
    """Chunk scoring and top-k over a long prompt."""
    device, dtype, tk, bandwidth, results, elt = c.device, c.dtype, c.tk, c.bandwidth, c.results, c.elt
    hq, hkv, d = HQ, HKV, D
    # chunk scoring + top-k: a 128K-token prompt in chunks of 8 (fp32 mean keys, as the cache builds them)
    n_chunks = 16384 if device.type == "cuda" else 2048
    chunk_keys = torch.randn(hkv, n_chunks, d, device=device)
    query = torch.randn(hq, d, device=device, dtype=dtype)
    shape = {"Hq": hq, "Hkv": hkv, "N": n_chunks, "D": d, "select": 512}
    nbytes = chunk_keys.numel() * 4 + query.numel() * elt + hkv * n_chunks * 4
    impls = {"reference": lambda: ref.chunk_scores_reference(chunk_keys, query)}
    if tk is not None:
        impls = {"triton": lambda: tk.chunk_scores_triton(chunk_keys, query), **impls}
    for impl, fn in impls.items():
        row(results, "chunk_scores", impl, shape, timed(fn, device), nbytes, bandwidth)
    impls = {"reference": lambda: ref.select_chunks_reference(chunk_keys, query, 512)}
    if tk is not None:
        impls = {"triton": lambda: tk.select_chunks_triton(chunk_keys, query, 512), **impls}
    for impl, fn in impls.items():
        row(results, "select_chunks", impl, shape, timed(fn, device), nbytes, bandwidth)




def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/kernels_<device>_<time>.json)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    tk = None
    note = None
    if device.type == "cuda":
        from offload_runtime.kernels import load_triton

        tk = load_triton()
    else:
        note = "no CUDA device: Triton kernels need CUDA (the interpreter is for tests), so only the references and SDPA are timed, in float32"
        print(note, flush=True)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {name}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); dtype {dtype}", flush=True)
    c = Bench(device, dtype, tk, bandwidth, [], torch.finfo(dtype).bits // 8, args.quick)
    for section in (bench_decode_attention, bench_prefill_attention, bench_partials, bench_chunk_selection):
        section(c)
    results = c.results
    report = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": name, "device_type": device.type, "torch": torch.__version__,
        "triton": _triton_version(), "copy_bandwidth_GB_per_s": bandwidth / 1e9,
        "note": note or "bytes are the minimum each kernel must move; GB/s = bytes / median time",
        "results": results,
    }
    out = args.out or RESULTS / f"kernels_{device.type}_{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
