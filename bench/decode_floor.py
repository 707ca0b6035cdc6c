"""CPU autoregressive decoding against the memory-bandwidth floor and against transformers.

A decode step must read every weight and the cache rows it attends to. For each case
(context length, GQA or MHA) this measures, in one process on the same random weights:
- the machine's read bandwidth (median GB/s of reading a tensor larger than the last-level
  cache: a sum and a matrix-vector product over 1 GiB, the better of the two);
- the matrix-vector products alone (every Linear of the model in forward order, weights
  cycling through the caches as in a step: the practical floor of the weights), separate and
  with q/k/v and gate/up fused into one weight each (does fusing pay?);
- the attention alone over every layer's cache rows (achieved GB/s of the cache);
- the end-to-end step, ours (decode attention, kernels/decode.py), ours compiled (`--compile`:
  offload_runtime/compiled.py, one torch.compile graph per step; its compile time reported),
  ours on the old path (SDPA for every block) and transformers (LlamaForCausalLM, its own
  DynamicCache, greedy), interleaved step by step so machine noise hits them alike; medians;
- prefill tokens/s: ours, ours on the old path, transformers;
- greedy tokens: ours == transformers' step loop, and == transformers' `generate`.
Floor = (weight bytes + cache bytes) / read GB/s. Results: bench/results/decode_floor_<tag>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from offload_runtime import compiled, kernels
from offload_runtime.caches.full import FullCache
from offload_runtime.kernels import decode
from offload_runtime.fused import live_fused
from offload_runtime.prefill import PREFILL_CHUNK

from .models import SHAPES, Shape, build_pair
from .common import RESULTS, machine_info, write_json

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # set by main from --clock


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.decode_floor", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--synthetic", default="300m", choices=sorted(SHAPES))
    p.add_argument("--cases", default="2048:gqa,8192:mha", help="context:gqa|mha, comma-separated (mha: kv heads = heads)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                   help="cpu: this process's CPU time (use with --threads 1 on a loaded machine: time spent "
                        "waiting for a core is not counted)")
    p.add_argument("--steps", type=int, default=24, help="decode steps timed per system (interleaved)")
    p.add_argument("--repeats", type=int, default=7, help="repeats of each micro-measurement (median)")
    p.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the read-bandwidth probe")
    p.add_argument("--keep-denormals", action="store_true",
                   help="do not flush denormals (both systems; random weights make many, and they are slow)")
    p.add_argument("--no-generate-check", action="store_true", help="skip transformers' generate (one more prefill)")
    p.add_argument("--no-old-path", action="store_true", help="skip the old (SDPA-only) path")
    p.add_argument("--no-compiled", action="store_true", help="skip the compiled step (--compile; needs a C++ compiler)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="cpu_300m")
    return p.parse_args(argv)


def median_s(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def read_bandwidth(gib: float, repeats: int) -> dict:
    """Read GB/s of the memory (a tensor larger than the last-level cache): sum and matrix-vector."""
    cols = 1024
    big = torch.rand(int(gib * 2 ** 30) // (4 * cols), cols)
    ones = torch.ones(cols)
    n = big.numel() * 4
    sum_gbs = n / median_s(big.sum, repeats) / 1e9
    mv_gbs = n / median_s(lambda: torch.mv(big, ones), repeats) / 1e9
    return {"sum_gbs": sum_gbs, "mv_gbs": mv_gbs, "read_gbs": max(sum_gbs, mv_gbs), "probe_bytes": n}


def linears_in_order(model: Any) -> list[torch.Tensor]:
    """Every matrix a decode step multiplies, in forward order."""
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        out += [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
                m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight]
    return out + [model.lm_head.weight]


def fused_in_order(model: Any) -> list[torch.Tensor]:
    """The same products with q/k/v and gate/up fused into one weight each: the model's own fused
    matrices (fused.fuse_projections; the separate weights above are views of them)."""
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        qkv = live_fused(a, "qkv", [a.q_proj, a.k_proj, a.v_proj])
        gate_up = live_fused(m, "gate_up", [m.gate_proj, m.up_proj])
        if qkv is None or gate_up is None:
            raise RuntimeError("the benchmark's model is not fused (bench.models.build_pair fuses it)")
        out += [qkv.weight, a.o_proj.weight, gate_up.weight, m.down_proj.weight]
    return out + [model.lm_head.weight]


def matvec_pass(weights: list[torch.Tensor]) -> None:
    for w in weights:
        F.linear(torch.ones(1, w.shape[1]), w)


def matvec_floor(model: Any, repeats: int) -> dict:
    """The weights' matrix-vector products alone: separate vs fused, interleaved; medians."""
    sep, fused = linears_in_order(model), fused_in_order(model)
    nbytes = sum(w.numel() * w.element_size() for w in sep)
    t_sep, t_fused = [], []
    for _ in range(repeats):
        t_sep.append(median_s(lambda: matvec_pass(sep), 1))
        t_fused.append(median_s(lambda: matvec_pass(fused), 1))
    s, f = statistics.median(t_sep), statistics.median(t_fused)
    return {"weight_bytes": nbytes, "matvec_s": s, "matvec_gbs": nbytes / s / 1e9,
            "fused_matvec_s": f, "fused_matvec_gbs": nbytes / f / 1e9, "calls": len(sep), "fused_calls": len(fused)}


def attention_pass(model: Any, cache: FullCache, repeats: int) -> dict:
    """One query per layer against every layer's cache rows, alone: the cache's achieved GB/s."""
    cfg, n = model.cfg, cache.length
    q = torch.randn(cfg.num_heads, 1, cfg.head_dim)
    pos = torch.arange(n)
    nbytes = 2 * cfg.num_layers * cfg.num_kv_heads * n * cfg.head_dim * 4

    def run() -> None:
        for layer in range(cfg.num_layers):
            k, v = cache.rows(layer, 0, n)
            kernels.attention(q, k, v, pos[-1:], pos)

    s = median_s(run, repeats)
    return {"cache_bytes": nbytes, "attention_s": s, "attention_gbs": nbytes / s / 1e9}


class OldPath:
    """The previous CPU dispatch (SDPA for every block, decode.py off), for the no-regression columns."""

    def __enter__(self) -> None:
        self.saved, decode.DECODE_MAX_QUERIES = decode.DECODE_MAX_QUERIES, 0

    def __exit__(self, *exc: Any) -> None:
        decode.DECODE_MAX_QUERIES = self.saved


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = clock()
    out = fn()
    return clock() - t0, out


def hf_prefill(hf: Any, prompt: list[int]) -> tuple[float, Any, int]:
    """transformers' prefill as generate does it (its DynamicCache, last logits only)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        s, out = timed(lambda: hf(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1))
    return s, cache, int(out.logits[0, -1].argmax())


def hf_step(hf: Any, cache: Any, token: int) -> int:
    with torch.inference_mode():
        out = hf(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
    return int(out.logits[0, -1].argmax())


def our_step(model: Any, cache: FullCache, token: int) -> int:
    return int(model(torch.tensor([token]), cache)[-1].argmax())


def prefill(model: Any, prompt: list[int], cache: FullCache) -> torch.Tensor:
    """The engine's token-major prefill (context.py): chunks of PREFILL_CHUNK, last logits only."""
    tokens = torch.tensor(prompt)
    for start in range(0, len(prompt), PREFILL_CHUNK):
        logits = model(tokens[start:start + PREFILL_CHUNK], cache, last_only=True)
    return logits


def prefills(hf: Any, ours: Any, prompt: list[int], steps: int, old_path: bool) -> dict:
    """Prefill tokens/s of ours (new and old dispatch) and transformers; returns the caches for decoding."""
    cap = len(prompt) + steps + 8
    cache = FullCache(ours.cfg, "cpu", torch.float32, capacity=cap)
    s_ours, logits = timed(lambda: prefill(ours, prompt, cache))
    res = {"ours_prefill_s": s_ours, "ours_first": int(logits[-1].argmax()), "cache": cache}
    if old_path:
        with OldPath():
            res["old_prefill_s"], _ = timed(lambda: prefill(ours, prompt, FullCache(ours.cfg, "cpu", torch.float32, cap)))
    res["hf_prefill_s"], res["hf_cache"], res["hf_first"] = hf_prefill(hf, prompt)
    return res


def compiled_step(ours: Any, cache: FullCache, token: int, step: compiled.CompiledStep) -> int:
    """Ours' step through the compiled graph (asserted taken: a silent fall-back would time the eager step)."""
    ours.one_token_step, calls = step, step.calls
    try:
        out = our_step(ours, cache, token)
    finally:
        ours.one_token_step = None
    if step.calls != calls + 1:
        raise RuntimeError("the compiled step was not taken")
    return out


def compile_once(ours: Any) -> tuple[compiled.CompiledStep, float]:
    """A compiled step and its compile time (compiled.warm_up; then detached: steps attach it)."""
    ours.one_token_step = step = compiled.build(ours)
    try:
        s = compiled.warm_up(ours, quiet=True)
    finally:
        ours.one_token_step = None
    return step, s


def decode_steps(hf: Any, ours: Any, pre: dict, steps: int, old_path: bool, step: compiled.CompiledStep | None) -> dict:
    """`steps` greedy steps of each system, interleaved; the old path and the compiled step re-run
    ours' step on the same token and cache (then the row is dropped), so they see identical inputs."""
    cache, hf_cache = pre["cache"], pre["hf_cache"]
    ours_tok, hf_tok, compiled_tok = [pre["ours_first"]], [pre["hf_first"]], [pre["ours_first"]]
    t = {"ours": [], "old": [], "hf": [], "compiled": []}
    for _ in range(steps):
        if old_path:
            with OldPath():
                s, _ = timed(lambda: our_step(ours, cache, ours_tok[-1]))
            t["old"].append(s)
            cache.truncate(cache.length - 1)
        if step is not None:
            s, tok = timed(lambda: compiled_step(ours, cache, ours_tok[-1], step))
            t["compiled"].append(s)
            compiled_tok.append(tok)
            cache.truncate(cache.length - 1)
        s, tok = timed(lambda: our_step(ours, cache, ours_tok[-1]))
        t["ours"].append(s)
        ours_tok.append(tok)
        s, tok = timed(lambda: hf_step(hf, hf_cache, hf_tok[-1]))
        t["hf"].append(s)
        hf_tok.append(tok)
    warm = min(2, steps - 1)
    med = {k: statistics.median(v[warm:]) if v else None for k, v in t.items()}
    return {"ours_step_s": med["ours"], "old_step_s": med["old"], "hf_step_s": med["hf"],
            "compiled_step_s": med["compiled"], "ours_tokens": ours_tok, "hf_tokens": hf_tok,
            "compiled_tokens": compiled_tok if step is not None else None}


def hf_generate(hf: Any, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


def case_shape(base: Shape, kind: str) -> Shape:
    if kind not in ("gqa", "mha"):
        raise SystemExit(f"error: case kind {kind!r}: expected gqa or mha")
    return base if kind == "gqa" else dataclasses.replace(base, kv_heads=base.heads)


def floors(row: dict, read_gbs: float) -> dict:
    """The bandwidth floor of a step and the measured step's ratios to it and to transformers."""
    cache_bytes = row["cache_bytes_per_step"]
    floor = (row["weight_bytes"] + cache_bytes) / (read_gbs * 1e9)
    practical = row["matvec_s"] + cache_bytes / (read_gbs * 1e9)
    return {"floor_s": floor, "practical_floor_s": practical,
            "ours_over_floor": row["ours_step_s"] / floor, "ours_over_practical_floor": row["ours_step_s"] / practical,
            "ours_over_transformers": row["ours_step_s"] / row["hf_step_s"],
            "old_over_floor": row["old_step_s"] / floor if row["old_step_s"] else None,
            "compiled_over_floor": row["compiled_step_s"] / floor if row["compiled_step_s"] else None,
            "compiled_over_transformers": row["compiled_step_s"] / row["hf_step_s"] if row["compiled_step_s"] else None,
            "step_weights_gbs": row["weight_bytes"] / row["matvec_s"] / 1e9,
            "other_s": row["ours_step_s"] - row["matvec_s"] - row["attention_s"]}


def run_case(args: argparse.Namespace, context: int, kind: str, read_gbs: float) -> dict:
    shape = case_shape(SHAPES[args.synthetic], kind)
    hf, ours = build_pair(shape, torch.device("cpu"), torch.float32)
    prompt = torch.randint(0, shape.vocab, (context,), generator=torch.Generator().manual_seed(context)).tolist()
    print(f"[{context} {kind}] prefill ...", file=sys.stderr, flush=True)
    pre = prefills(hf, ours, prompt, args.steps, not args.no_old_path)
    step, compile_s = None, None
    if not args.no_compiled:
        print(f"[{context} {kind}] compiling the one-token step ...", file=sys.stderr, flush=True)
        step, compile_s = compile_once(ours)
    print(f"[{context} {kind}] decode ...", file=sys.stderr, flush=True)
    dec = decode_steps(hf, ours, pre, args.steps, not args.no_old_path, step)
    cache = pre.pop("cache")
    row = {"context": context, "kind": kind, "kv_heads": shape.kv_heads, **matvec_floor(ours, args.repeats),
           **attention_pass(ours, cache, args.repeats), **dec, "compile_s": compile_s}
    row["cache_bytes_per_step"] = row.pop("cache_bytes")  # rows at the end of the run (context + steps)
    row["prefill_tok_s"] = {"ours": context / pre["ours_prefill_s"], "transformers": context / pre["hf_prefill_s"],
                            "ours_old_path": context / pre["old_prefill_s"] if "old_prefill_s" in pre else None}
    row["tokens_equal_transformers_steps"] = dec["ours_tokens"] == dec["hf_tokens"]
    if step is not None:  # the compiled step's greedy choice at each of ours' positions
        row["compiled_tokens_equal_transformers_steps"] = dec["compiled_tokens"] == dec["hf_tokens"]
    if not args.no_generate_check:
        print(f"[{context} {kind}] transformers generate ...", file=sys.stderr, flush=True)
        row["tokens_equal_transformers_generate"] = hf_generate(hf, prompt, len(dec["ours_tokens"])) == dec["ours_tokens"]
    row.update(floors(row, read_gbs))
    return row


TARGETS = {"gqa": (1.8, 0.7), "mha": (2.0, None)}  # issue 17: step / floor and step / transformers, at most


def verdicts(rows: list[dict]) -> list[str]:
    """One line per case: the measured ratios against the targets of issue 17."""
    out = []
    for r in rows:
        floor_max, hf_max = TARGETS[r["kind"]]
        for name, key in (("ours", "ours"), ("ours compiled", "compiled")):
            if r.get(f"{key}_over_floor") is None:
                continue
            line = f"{r['context']} {r['kind'].upper()}: {name}/floor {r[f'{key}_over_floor']:.2f} (target <= {floor_max})"
            if hf_max is not None:
                line += f", {name}/transformers {r[f'{key}_over_transformers']:.2f} (target <= {hf_max})"
            out.append(line)
    return out


def tokens_equal(row: dict) -> bool:
    """Ours (and the compiled step, when run) chose transformers' greedy tokens."""
    return (row["tokens_equal_transformers_steps"] and row.get("tokens_equal_transformers_generate", True)
            and row.get("compiled_tokens_equal_transformers_steps", True))


def markdown(rows: list[dict], bw: dict) -> str:
    ms = lambda s: f"{s * 1e3:.1f}" if s is not None else "-"  # noqa: E731
    lines = [f"read bandwidth {bw['read_gbs']:.1f} GB/s (sum {bw['sum_gbs']:.1f}, mv {bw['mv_gbs']:.1f})", "",
             "| case | floor ms | matvec-alone floor ms | ours ms | ours compiled ms | old path ms | transformers ms "
             "| ours/floor | ours/transformers | compiled/floor | compiled/transformers | weights GB/s (matvec alone, fused) "
             "| cache GB/s (attention alone) | prefill tok/s ours / old / transformers | tokens = transformers |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["prefill_tok_s"]
        old = f"{p['ours_old_path']:.0f}" if p["ours_old_path"] else "-"
        same = tokens_equal(r)
        ratio = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
        lines.append(f"| {r['context']} {r['kind'].upper()} | {ms(r['floor_s'])} | {ms(r['practical_floor_s'])} "
                     f"| {ms(r['ours_step_s'])} | {ms(r['compiled_step_s'])} | {ms(r['old_step_s'])} | {ms(r['hf_step_s'])} "
                     f"| {r['ours_over_floor']:.2f} | {r['ours_over_transformers']:.2f} | {ratio(r['compiled_over_floor'])} "
                     f"| {ratio(r['compiled_over_transformers'])} | {r['matvec_gbs']:.1f}, {r['fused_matvec_gbs']:.1f} "
                     f"| {r['attention_gbs']:.1f} | {p['ours']:.0f} / {old} / {p['transformers']:.0f} | {same} |")
    return "\n".join(lines + [""] + verdicts(rows))


def run(args: argparse.Namespace) -> dict:
    cases = [(int(c.split(":")[0]), c.split(":")[1]) for c in args.cases.split(",")]
    bw = read_bandwidth(args.bandwidth_gib, args.repeats)
    rows = [run_case(args, context, kind, bw["read_gbs"]) for context, kind in cases]
    machine = machine_info(torch.device("cpu"))
    machine["flush_denormal"] = not args.keep_denormals
    return {"machine": machine, "settings": vars(args), "bandwidth": bw, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    global clock
    args = parse_args(argv)
    clock, threads = CLOCKS[args.clock], torch.get_num_threads()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(not args.keep_denormals)
    torch.manual_seed(0)
    try:
        result = run(args)
    finally:  # (in-process callers, e.g. the tests, get torch's defaults back)
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    write_json(args.out, "decode_floor", result, args.tag)
    print(markdown(result["rows"], result["bandwidth"]))
    return 0 if all(tokens_equal(r) for r in result["rows"]) else 1

if __name__ == "__main__":
    sys.exit(main())
