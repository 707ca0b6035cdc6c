"""Prefill tokens/s on CPU, ours against transformers, side by side in one run.

    python -m bench.prefill_bench                         # `small` synthetic Llama (GQA) at 2K, 8K and 32K
    python -m bench.prefill_bench --shape 300m --contexts 2048,8192

Ours is the engine's own prefill (`Session.extend`: token chunks of PREFILL_CHUNK into the full
cache, last logits only); transformers' is what `generate` does before its first token (one
forward with a DynamicCache and logits_to_keep=1). The two alternate within each repeat, so load
on the machine hits both alike, after one untimed call of each; medians are reported, and the first
token must be the same.

The floor is compute: a system's floating-point operations over this machine's best fp32 matmul
rate, measured in the same run on the model's own largest product (the fused gate/up projection of
a 1024-token chunk). Transformers' work is one full forward of the prompt (every row through every
layer, causal attention, the head for the last row); ours is that less what it skips: in each
chunk, the last layer's attention and MLP for all but the last RECENT_QUERIES rows (model.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

from offload_runtime.model import last_layer_rows
from offload_runtime.prefill import PREFILL_CHUNK
from offload_runtime.sampling import SamplingParams
from offload_runtime.session import Session

from .models import SHAPES, Shape, build_pair
from .common import RESULTS, machine_info, make_prompt, markdown_table, write_json


def ours(model: Any, prompt: list[int]) -> tuple[float, int]:
    session = Session(model, None, SamplingParams(), [], generator=torch.Generator(), mode="autoregressive",
                      capacity=len(prompt) + 8)
    t0 = time.perf_counter()
    session.extend(prompt)
    seconds = time.perf_counter() - t0
    return seconds, int(session.caches.logits.argmax())


def theirs(hf: Any, prompt: list[int]) -> tuple[float, int]:
    from transformers import DynamicCache

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf(input_ids=ids, past_key_values=DynamicCache(config=hf.config), use_cache=True, logits_to_keep=1)
        seconds = time.perf_counter() - t0
    return seconds, int(out.logits[0, -1].argmax())


def forward_flops(shape: Shape, tokens: int) -> float:
    """Floating-point operations of one full causal forward of `tokens` (logits of the last row only)."""
    d = shape.hidden // shape.heads
    projections = shape.hidden * (shape.heads + 2 * shape.kv_heads) * d + shape.heads * d * shape.hidden \
        + 3 * shape.hidden * shape.intermediate
    attention = 2 * shape.heads * d * tokens * (tokens + 1) / 2  # QK^T and PV over the causal triangle
    return 2 * (shape.layers * (projections * tokens + attention) + shape.hidden * shape.vocab)


def ours_flops(shape: Shape, tokens: int, chunk: int = PREFILL_CHUNK) -> float:
    """forward_flops less what our prefill skips: in each chunk the last layer's attention (from its
    queries on), output projection and MLP run for the last RECENT_QUERIES rows only."""
    d = shape.hidden // shape.heads
    after_qkv = shape.heads * d * shape.hidden + 3 * shape.hidden * shape.intermediate
    skipped = 0.0
    for a in range(0, tokens, chunk):
        b = min(tokens, a + chunk)
        last = b - last_layer_rows(0, b - a, b - a)  # each chunk is a last-only forward; rows a..last-1 skipped
        # row p attends to p + 1 keys: rows a..last-1 to (last(last+1) - a(a+1)) / 2 in all
        skipped += after_qkv * (last - a) + 2 * shape.heads * d * ((last * (last + 1) - a * (a + 1)) / 2)
    return forward_flops(shape, tokens) - 2 * skipped


def matmul_gflops(shape: Shape, repeats: int = 25) -> float:
    """This machine's best fp32 rate on the model's largest product (a 1024-token chunk times gate/up):
    the fastest of the repeats, as a floor wants."""
    a, b = torch.randn(1024, shape.hidden), torch.randn(shape.hidden, 2 * shape.intermediate)
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / min(times[2:]) / 1e9


def bench_context(hf: Any, model: Any, context: int, repeats: int) -> dict:
    prompt = make_prompt(context, model.cfg.vocab_size, None)
    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    firsts = set()
    for _ in range(repeats):
        for name, fn, m in (("ours", ours, model), ("transformers", theirs, hf)):
            s, first = fn(m, prompt)
            times[name].append(s)
            firsts.add(first)
    tok_s = {k: context / statistics.median(v) for k, v in times.items()}
    return {"context": context, "tok_s": tok_s, "ours_over_transformers": tok_s["ours"] / tok_s["transformers"],
            "seconds": times, "same_first_token": len(firsts) == 1}


def with_floor(row: dict, shape: Shape, gflops: float) -> dict:
    """The row with each system's compute floor (seconds: its FLOPs at the matmul rate) and its median
    time over that floor."""
    flops = {"ours": ours_flops(shape, row["context"]), "transformers": forward_flops(shape, row["context"])}
    floor = {k: f / (gflops * 1e9) for k, f in flops.items()}
    over = {k: statistics.median(v) / floor[k] for k, v in row["seconds"].items()}
    return {**row, "flops": flops, "floor_s": floor, "over_floor": over}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192, 32768])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    hf, model = build_pair(shape, torch.device("cpu"), torch.float32)
    gflops = matmul_gflops(shape)
    print(f"fp32 matmul rate: {gflops:.0f} GFLOP/s", file=sys.stderr, flush=True)
    warm_up = make_prompt(min(args.contexts), model.cfg.vocab_size, None)
    ours(model, warm_up), theirs(hf, warm_up)  # first calls (allocator, lazy inits) untimed, for both alike
    rows = []
    for context in args.contexts:
        row = with_floor(bench_context(hf, model, context, args.repeats), shape, gflops)
        rows.append(row)
        print(f"{args.shape} @ {context}: ours {row['tok_s']['ours']:.0f} tok/s, transformers "
              f"{row['tok_s']['transformers']:.0f} tok/s: {row['ours_over_transformers']:.2f}x, first token "
              f"{'same' if row['same_first_token'] else 'DIFFERENT'}; over their compute floors: ours "
              f"{row['over_floor']['ours']:.2f}x, transformers {row['over_floor']['transformers']:.2f}x",
              file=sys.stderr, flush=True)
    result = {"benchmark": "prefill_bench", "machine": machine_info(torch.device("cpu")), "shape": args.shape,
              "repeats": args.repeats, "matmul_gflops": gflops, "rows": rows}
    path = write_json(args.out, f"prefill_bench_{args.shape}", result, args.tag)
    print(markdown_table(["context", "ours tok/s", "transformers tok/s", "ours / transformers", "ours' floor s",
                          "transformers' floor s", "ours / its floor", "transformers / its floor", "same first token"],
                         [[r["context"], f"{r['tok_s']['ours']:.0f}", f"{r['tok_s']['transformers']:.0f}",
                           f"{r['ours_over_transformers']:.2f}", f"{r['floor_s']['ours']:.2f}",
                           f"{r['floor_s']['transformers']:.2f}", f"{r['over_floor']['ours']:.2f}",
                           f"{r['over_floor']['transformers']:.2f}", "yes" if r["same_first_token"] else "NO"]
                          for r in rows]))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
