"""A PROTOTYPE hand-vectorised CPU decode attention (bench/prototypes/cpu_decode_attention.cpp)
against what the runtime uses (torch's SDPA through offload_runtime/kernels/decode.py) and the read bandwidth.

Not part of the runtime: it is compiled here on first use (torch.utils.cpp_extension: needs a C++
compiler, `pip install ninja`, and an AVX-512 CPU). It answers one question for the CPU decode
issue: how much of the attention's gap to the read bandwidth a compiled kernel closes. It first
checks the kernel against `attention_reference` on several shapes (exits 1 on a mismatch), then
times one query per layer (decode) and 17 rows (a gamma-16 block's prefix) over 16 layers' worth
of cache rows (larger than the caches, like a real step), medians, and writes a JSON.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from offload_runtime.kernels.reference import attention_reference

from .common import RESULTS, machine_info, write_json

SOURCE = Path(__file__).parent / "prototypes" / "cpu_decode_attention.cpp"
CASES = ((16, 4, 64, 2048), (16, 16, 64, 8192), (32, 8, 128, 8192))  # query heads, KV heads, head_dim, keys


def build() -> tuple[Any, float]:
    from torch.utils.cpp_extension import load

    start = time.perf_counter()
    ext = load("offload_runtime_cpu_decode_attention_proto", [str(SOURCE)], verbose=False,
               extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    return ext, time.perf_counter() - start


def folded(ext: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, splits: int) -> torch.Tensor:
    """q [Hq, T, D] -> the kernel's [Hkv, G*T, D] rows (as offload_runtime/kernels/decode.py folds them) and back."""
    hq, t, d = q.shape
    hkv = k.shape[0]
    return ext.decode_attention(q.reshape(hkv, hq // hkv * t, d), k, v, splits).reshape(hq, t, d)


def check(ext: Any) -> float:
    """Largest difference from the reference over shapes where every key is visible."""
    worst, gen = 0.0, torch.Generator().manual_seed(0)
    for hq, hkv, d, n in ((4, 4, 64, 1), (8, 2, 64, 100), (16, 4, 128, 2048), (4, 1, 32, 333), (8, 8, 256, 65)):
        for t in (1, 5, 16):
            k = torch.randn(hkv, n + 7, d, generator=gen)[:, :n]  # a view into a larger buffer, as caches are
            v = torch.randn(hkv, n + 7, d, generator=gen)[:, :n]
            q = torch.randn(hq, t, d, generator=gen) * 2
            pos = torch.arange(n)
            want = attention_reference(q, k, v, torch.full((t,), n), pos)  # queries after every key
            worst = max(worst, (folded(ext, q, k, v, 4) - want).abs().max().item())
    return worst


def median_s(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_case(ext: Any, hq: int, hkv: int, d: int, n: int, rows: int, layers: int, repeats: int) -> dict:
    ks = [torch.randn(hkv, n + 256, d)[:, :n] for _ in range(layers)]
    vs = [torch.randn(hkv, n + 256, d)[:, :n] for _ in range(layers)]
    q = torch.randn(hq, rows, d)
    qf = q.reshape(1, hkv, hq // hkv * rows, d)
    nbytes = 2 * layers * hkv * n * d * 4
    flat = torch.ones(nbytes // 4)
    sdpa = median_s(lambda: [F.scaled_dot_product_attention(qf, k[None], v[None]) for k, v in zip(ks, vs)], repeats)
    proto = median_s(lambda: [folded(ext, q, k, v, 4) for k, v in zip(ks, vs)], repeats)
    read = median_s(lambda: flat.sum(), repeats)
    return {"query_heads": hq, "kv_heads": hkv, "head_dim": d, "keys": n, "query_rows": rows, "layers": layers,
            "bytes": nbytes, "sdpa_ms": sdpa * 1e3, "prototype_ms": proto * 1e3, "read_ms": read * 1e3,
            "sdpa_gbs": nbytes / sdpa / 1e9, "prototype_gbs": nbytes / proto / 1e9, "read_gbs": nbytes / read / 1e9,
            "speedup": sdpa / proto}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_attention_prototype", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ext, build_s = build()
    worst = check(ext)
    print(f"built in {build_s:.1f} s; largest difference from the reference {worst:.2e}")
    if worst > 1e-4:
        print("error: the prototype disagrees with the reference", file=sys.stderr)
        return 1
    rows = [time_case(ext, *case, rows, args.layers, args.repeats) for case in CASES for rows in (1, 17)]
    print("| heads q/kv, dim, keys | rows | SDPA ms (GB/s) | prototype ms (GB/s) | read ms (GB/s) | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['query_heads']}/{r['kv_heads']}, {r['head_dim']}, {r['keys']} | {r['query_rows']} "
              f"| {r['sdpa_ms']:.2f} ({r['sdpa_gbs']:.1f}) | {r['prototype_ms']:.2f} ({r['prototype_gbs']:.1f}) "
              f"| {r['read_ms']:.2f} ({r['read_gbs']:.1f}) | {r['speedup']:.2f}x |")
    write_json(args.out, "cpu_attention_prototype",
               {"machine": machine_info(torch.device("cpu")), "settings": vars(args), "build_s": build_s,
                "max_abs_diff_vs_reference": worst, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
