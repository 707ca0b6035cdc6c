"""Prefill tokens/s on CPU, ours against transformers, side by side in one run.

    python -m bench.prefill_bench                         # `small` synthetic Llama (GQA) at 2K, 8K and 32K
    python -m bench.prefill_bench --shape 300m --contexts 2048,8192

Ours is the engine's own prefill (`Session.extend`: token chunks of PREFILL_CHUNK into the full
cache, last logits only); transformers' is what `generate` does before its first token (one
forward with a DynamicCache and logits_to_keep=1). The two alternate within each repeat, so load
on the machine hits both alike; medians are reported, and the first token must be the same.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

from offload_runtime.sampling import SamplingParams
from offload_runtime.session import Session

from .models import SHAPES, build_pair
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192, 32768])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    hf, model = build_pair(SHAPES[args.shape], torch.device("cpu"), torch.float32)
    rows = []
    for context in args.contexts:
        row = bench_context(hf, model, context, args.repeats)
        rows.append(row)
        print(f"{args.shape} @ {context}: ours {row['tok_s']['ours']:.0f} tok/s, transformers "
              f"{row['tok_s']['transformers']:.0f} tok/s: {row['ours_over_transformers']:.2f}x, first token "
              f"{'same' if row['same_first_token'] else 'DIFFERENT'}", file=sys.stderr, flush=True)
    result = {"benchmark": "prefill_bench", "machine": machine_info(torch.device("cpu")), "shape": args.shape,
              "repeats": args.repeats, "rows": rows}
    path = write_json(args.out, f"prefill_bench_{args.shape}", result, args.tag)
    print(markdown_table(["context", "ours tok/s", "transformers tok/s", "ours / transformers", "same first token"],
                         [[r["context"], f"{r['tok_s']['ours']:.0f}", f"{r['tok_s']['transformers']:.0f}",
                           f"{r['ours_over_transformers']:.2f}", "yes" if r["same_first_token"] else "NO"] for r in rows]))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
