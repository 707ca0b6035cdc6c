"""Offloading throughput benchmark: where every second and byte goes, against baselines.

For each context length it times, on the same weights and the same prompt:
  1. our autoregressive decoding over the (offloaded, where built) full cache,
  2. transformers' own generate (offloaded cache on CUDA, its default cache on CPU),
  3. our engine, two levels (no draft) and three levels (with a small draft).
Our three runs share one prefill (the caches are the same); transformers prefills on its own.
Decode seconds/token are measured between the first and last emitted token, after
warm-up emissions. Results go to bench/results/*.json, a markdown table and a PNG plot.
Random weights make acceptance meaningless: it is reported as measured, and projections
use --assume-accepted-per-pass when given.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from offload_runtime.planner import host_available, host_usable
from offload_runtime.cli_flags import auto_or_int

from . import cost_model
from .common import RESULTS, machine_info, make_prompt, sync, write_json
from .models import DRAFTS, SHAPES, build_pair, load_pair, parameter_count

WARMUP_EMISSIONS = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--synthetic", default="300m", choices=sorted(SHAPES), help="synthetic Llama-shaped target")
    p.add_argument("--model", help="a real checkpoint (path or cached hub id) instead of --synthetic: "
                   "its acceptance is real")
    p.add_argument("--draft", help="with --model: the draft for the three-level runs (omitted: no 3-level run)")
    p.add_argument("--prompt-file", help="with --model: text repeated/cut to each context (default: random tokens)")
    p.add_argument("--contexts", default="2048,8192", help="comma-separated context lengths (tokens)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per run")
    p.add_argument("--repeats", type=int, default=1, help="runs per system and context (median reported)")
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--gamma", type=auto_or_int, default="auto", help="auto: the engine's adaptive controller")
    p.add_argument("--draft-gamma", type=auto_or_int, default="auto")
    p.add_argument("--fixed", default=None, metavar="G,D",
                   help="also time the engine with gamma G and draft gamma D fixed (rows '... fixed G/D')")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="CUDA: cap this process's GPU memory (emulates a smaller card, e.g. 24)")
    p.add_argument("--offload", default="auto", choices=["auto", "on", "off"],
                   help="our full cache in host memory, streamed per layer (auto: on for CUDA, off for CPU)")
    p.add_argument("--on-chip-layers", type=int, default=0,
                   help="with --offload: layers whose full cache stays on the device (0: stream every layer)")
    p.add_argument("--skip-transformers", action="store_true", help="do not time transformers' generate")
    p.add_argument("--assume-accepted-per-pass", type=float, default=None,
                   help="tokens accepted per L3 pass to use in projections (random weights accept ~1)")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON and PNG")
    p.add_argument("--tag", default="", help="suffix of the result file names")
    return p.parse_args(argv)


class EmissionClock:
    """Timestamps each emission (a block of tokens) of a generation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.events: list[tuple[float, int]] = []

    def __call__(self, tokens: list[int]) -> None:
        self.events.append((time.perf_counter(), len(tokens)))

    def decode_s_per_token(self) -> float | None:
        ev = self.events[WARMUP_EMISSIONS:] if len(self.events) > WARMUP_EMISSIONS + 1 else self.events
        if len(ev) < 2:
            return None
        tokens = sum(n for _, n in ev[1:])
        return (ev[-1][0] - ev[0][0]) / tokens


class HFClock(EmissionClock):
    """The same clock as a transformers streamer (its first put() is the prompt)."""

    def put(self, value: torch.Tensor) -> None:
        if not hasattr(self, "seen_prompt"):
            self.seen_prompt = True
            return
        self(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def run_ours(session: Any, mode: str, draft: Any, prompt_len: int, new_tokens: int) -> tuple[dict, list[int]]:
    session.truncate(prompt_len)
    session.use(mode, draft)
    clock = EmissionClock()
    cpu = time.process_time()
    result = session.generate(new_tokens, clock)
    stats = dict(result.stats)
    stats["decode_s_per_token"] = clock.decode_s_per_token()
    # CPU seconds (all threads) per token: steadier than wall-clock on a shared machine (CPU device only)
    stats["decode_cpu_s_per_token"] = (time.process_time() - cpu) / max(len(result.token_ids), 1)
    return stats, result.token_ids


def run_transformers(hf: Any, prompt: list[int], new_tokens: int, device: torch.device) -> tuple[dict, list[int]]:
    ids = torch.tensor([prompt], device=device)
    kwargs: dict[str, Any] = {"cache_implementation": "offloaded"} if device.type == "cuda" else {}
    clock = HFClock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, streamer=clock, pad_token_id=0, **kwargs)
    sync(device)
    first = clock.events[0][0] if clock.events else time.perf_counter()
    return {"mode": "transformers", "prefill_s": first - t0, "decode_s_per_token": clock.decode_s_per_token(),
            "cache": kwargs.get("cache_implementation", "dynamic")}, out[0, len(prompt):].tolist()


def transformers_run(hf: Any, prompt: list[int], new_tokens: int, device: torch.device) -> tuple[dict, list[int]]:
    """transformers' generate on the same prompt; running out of GPU memory is a result too."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        need, free = offloaded_host_bytes(hf, len(prompt) + new_tokens), host_available()
        if need > host_usable(free):  # its offloaded cache keeps every layer's K/V in host RAM
            print(f"  context {len(prompt)}: transformers: skipped, its offloaded cache needs {need / 2**30:.1f} GiB "
                  f"of host memory, {free / 2**30:.1f} GiB available", file=sys.stderr)
            return {"mode": "transformers", "prefill_s": None, "decode_s_per_token": None,
                    "error": "host memory: its offloaded cache does not fit"}, []
    try:
        stats, tokens = run_transformers(hf, prompt, new_tokens, device)
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        print(f"  context {len(prompt)}: transformers: out of memory ({str(exc).splitlines()[0]})", file=sys.stderr)
        return {"mode": "transformers", "prefill_s": None, "decode_s_per_token": None,
                "error": "out of GPU memory"}, []
    if device.type == "cuda":
        stats["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    print(f"  context {len(prompt)}: transformers: {stats['decode_s_per_token']:.4f} s/token", file=sys.stderr)
    return stats, tokens


def offloaded_host_bytes(hf: Any, tokens: int) -> int:
    """Host bytes of transformers' offloaded cache for `tokens`: every layer's K and V."""
    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * tokens * hf.dtype.itemsize


def phase_costs(stats: dict) -> dict:
    """Per-phase seconds from an engine run's counters (L2 time includes the L1 steps it drives)."""
    l3 = stats["time_l3_s"] / stats["l3_passes"] if stats.get("l3_passes") else None
    l2 = (stats["time_l2_s"] - stats["time_l1_s"]) / stats["l2_forwards"] if stats.get("l2_forwards") else None
    l1 = stats["time_l1_s"] / stats["l1_forwards"] if stats.get("l1_forwards") else 0.0  # no draft: no L1 steps
    return {"l1_step_s": l1, "l2_step_s": l2, "l3_pass_s": l3}


def bench_context(args: argparse.Namespace, hf: Any, target: Any, draft: Any, context: int,
                  device: torch.device, text_ids: list[int] | None = None) -> list[dict]:
    from offload_runtime.session import Session
    from offload_runtime.settings import EngineSettings
    from offload_runtime.sampling import SamplingParams

    prompt = make_prompt(context, target.cfg.vocab_size, text_ids)
    settings = EngineSettings(budget=args.budget, chunk_size=args.chunk_size, gamma=args.gamma,
                              draft_gamma=args.draft_gamma)
    fixed = None
    if args.fixed:
        g, d = (int(x) for x in args.fixed.split(","))
        fixed = EngineSettings(budget=args.budget, chunk_size=args.chunk_size, gamma=g, draft_gamma=d)
    runs: dict[str, list[tuple[dict, list[int]]]] = {}
    offload = args.offload == "on" or (args.offload == "auto" and device.type == "cuda")
    capacity = context + args.new_tokens + settings.max_gamma + 1
    for rep in range(args.repeats):
        cache = None
        if offload:
            from offload_runtime.launch import offloaded_cache

            cache = offloaded_cache(target.cfg, device, target.dtype, capacity, args.on_chip_layers)
        session = Session(target, None, SamplingParams(0.0), [], settings, None, "autoregressive",
                          cache=cache, capacity=capacity)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        session.extend(prompt)
        sync(device)
        prefill_s = time.perf_counter() - t0
        print(f"  context {context}: our prefill {prefill_s:.2f}s", file=sys.stderr)
        systems = [("ours autoregressive", "autoregressive", None), ("ours triforce 2-level", "triforce", None)]
        if draft is not None:
            systems.append(("ours triforce 3-level", "triforce", draft))
        if fixed is not None:
            systems += [(f"{name} fixed {fixed.gamma}/{fixed.draft_gamma}", mode, d) for name, mode, d in systems[1:]]
        for name, mode, d in systems:
            session.reconfigure(fixed if " fixed " in name else settings)
            stats, tokens = run_ours(session, mode, d, context, args.new_tokens)
            stats["prefill_s"] = prefill_s
            if device.type == "cuda":
                stats["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            runs.setdefault(name, []).append((stats, tokens))
            print(f"  context {context}: {name}: {stats['decode_s_per_token']:.4f} s/token", file=sys.stderr)
        del session, cache
        gc.collect()  # our host cache goes before transformers' offloaded cache takes as much again
        if not args.skip_transformers:
            runs.setdefault("transformers generate", []).append(transformers_run(hf, prompt, args.new_tokens, device))
    return summary_rows(runs, context, args.new_tokens)


def summary_rows(runs: dict[str, list[tuple[dict, list[int]]]], context: int, new_tokens: int) -> list[dict]:
    """One row per system: medians over the repeats, and whether its tokens equal ours autoregressive."""
    rows: list[dict] = []
    reference = runs["ours autoregressive"][0][1]
    for name, results in runs.items():
        stats = dict(results[0][0])
        for key in ("decode_s_per_token", "prefill_s", "decode_cpu_s_per_token"):
            values = [r[0][key] for r in results if r[0].get(key) is not None]
            stats[key] = statistics.median(values) if values else None
        rows.append({
            "system": name, "context": context, "new_tokens": new_tokens,
            "prefill_s": stats["prefill_s"], "decode_s_per_token": stats["decode_s_per_token"],
            "decode_cpu_s_per_token": stats.get("decode_cpu_s_per_token"),
            "mean_accepted_per_pass": stats.get("mean_accepted_per_pass"),
            "l2_acceptance_of_l1": stats.get("l2_acceptance_of_l1"),
            "l3_acceptance_of_l2": stats.get("l3_acceptance_of_l2"),
            "h2d_bytes_per_token": stats.get("h2d_bytes_per_token"),
            "achieved_gb_per_s": stats.get("h2d_gbps"),
            "link_gb_per_s": stats.get("link_gbps"),
            "link_fraction": stats.get("link_fraction"),
            "peak_gpu_gib": stats.get("peak_gpu_gib"),
            "pinned_host_gib": stats["host_cache_bytes"] / 2 ** 30 if stats.get("host_cache_bytes") else None,
            "error": stats.get("error"),
            "identical_to_ours_autoregressive": results[0][1] == reference,
            "phase_costs": phase_costs(stats) if name.startswith("ours triforce") else None,
            "adaptive_rounds": stats.get("adaptive", {}).get("rounds"),
            "raw_stats": stats,
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    def fmt(x: Any, spec: str = ".4f") -> str:
        return "n/a" if x is None else (f"{x:{spec}}" if isinstance(x, float) else str(x))

    lines = ["| system | context | prefill s | decode s/token | tok/L3 pass | L2 acc. of L1 | H2D B/token | GB/s | "
             "same tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['context']} | {fmt(r['prefill_s'], '.2f')} | "
                     f"{r['error'] or fmt(r['decode_s_per_token'])} | {fmt(r['mean_accepted_per_pass'], '.2f')} | "
                     f"{fmt(r['l2_acceptance_of_l1'], '.2f')} | {fmt(r['h2d_bytes_per_token'], '.3g')} | "
                     f"{fmt(r['achieved_gb_per_s'], '.2f')} | {'yes' if r['identical_to_ours_autoregressive'] else 'no'} |")
    return "\n".join(lines)


def fixed_suffix(args: argparse.Namespace) -> str:
    """The projections use the fixed-gamma rows when there are some (adaptive rows mix in autoregressive steps)."""
    return f" fixed {args.fixed.replace(',', '/')}" if args.fixed else ""


def projections(rows: list[dict], args: argparse.Namespace) -> dict:
    tri2 = [r for r in rows if r["system"] == f"ours triforce 2-level{fixed_suffix(args)}"]
    tri3 = [r for r in rows if r["system"] == f"ours triforce 3-level{fixed_suffix(args)}"] or tri2  # no draft: 2-level
    measured = tri3[-1]["raw_stats"] if tri3 else None
    out: dict[str, Any] = {"published_triforce": cost_model.PUBLISHED, "card": asdict(cost_model.RTX_4090)}
    if measured and measured.get("l3_passes"):
        per_pass = {"l2": measured["l2_forwards"] / measured["l3_passes"],
                    "l1": measured["l1_forwards"] / measured["l3_passes"]}
        accepted = args.assume_accepted_per_pass or measured["mean_accepted_per_pass"]
        out["accepted_per_pass_used"] = accepted
        out["accepted_per_pass_source"] = "assumed (--assume-accepted-per-pass)" if args.assume_accepted_per_pass \
            else ("measured on this checkpoint" if args.model else
                  "measured on random weights (meaningless for a trained model pair)")
        out["steps_per_pass"] = per_pass
        out["rows"] = cost_model.project(accepted, per_pass["l2"], per_pass["l1"], budget=4096)
        # this machine: measured phase costs -> s/token implied by the cost model, per context
        out["this_machine"] = []
        for r2, r3 in zip(tri2, tri3):
            pc = r3["phase_costs"]
            if None in pc.values():
                continue
            costs = cost_model.PhaseCosts(**pc)
            out["this_machine"].append({"context": r3["context"], "phase_costs": pc,
                                        "implied_s_per_token": cost_model.seconds_per_token(
                                            costs, accepted, per_pass["l2"], per_pass["l1"]),
                                        "measured_s_per_token": r3["decode_s_per_token"]})
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for system in dict.fromkeys(r["system"] for r in rows):
        pts = [(r["context"], r["decode_s_per_token"]) for r in rows if r["system"] == system and r["decode_s_per_token"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode seconds / token")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if device.type == "cuda" and args.memory_cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib / total))
    contexts = [int(c) for c in args.contexts.split(",")]
    text_ids = None
    if args.model:
        hf, target, tokenizer = load_pair(args.model, device, dtype)
        draft = load_pair(args.draft, device, dtype)[1] if args.draft else None
        if args.prompt_file:
            text_ids = tokenizer(Path(args.prompt_file).read_text())["input_ids"]
        name, n_params, note = args.model, sum(p.numel() for p in hf.parameters()), "a real checkpoint"
    else:
        shape = SHAPES[args.synthetic]
        # room for the new tokens and a verification block past the longest prompt (a 131072-token
        # prompt on the 7B shape's 131072 positions was refused, found by bench/gpu_check.sh)
        room = max(contexts) + args.new_tokens + 64
        shape = dataclasses.replace(shape, max_positions=max(shape.max_positions, room))
        hf, target = build_pair(shape, device, dtype)
        _, draft = build_pair(DRAFTS["tiny" if args.synthetic == "tiny" else "default"], device, dtype, seed=1,
                              vocab=shape.vocab)
        name, n_params = args.synthetic, parameter_count(shape)
        note = "random weights: acceptance rates are not those of a trained model pair"
    print(f"bench: {name} target ({n_params / 1e6:.0f}M parameters, {note}), {device}, {dtype}, "
          f"contexts {contexts}", file=sys.stderr)
    rows: list[dict] = []
    for context in contexts:
        rows.extend(bench_context(args, hf, target, draft, context, device, text_ids))
    result = {"benchmark": "offload_bench", "machine": machine_info(device), "model": name,
              "parameters": n_params, "dtype": str(dtype), "settings": vars(args), "rows": rows,
              "note": note, "projections": projections(rows, args)}
    ratio = [(r["context"], r["decode_s_per_token"]) for r in rows]
    ours_ar = {c: s for (c, s), r in zip(ratio, rows) if r["system"] == "ours autoregressive"}
    hf_ar = {c: s for (c, s), r in zip(ratio, rows) if r["system"] == "transformers generate"}
    result["ours_ar_over_transformers"] = {c: ours_ar[c] / hf_ar[c] for c in ours_ar if c in hf_ar and hf_ar[c]}
    path = write_json(args.out, f"offload_bench_{device.type}_{Path(name).name}", result, args.tag)
    plot(rows, path.with_suffix(".png"), f"{Path(name).name}{'' if args.model else ' synthetic'}, "
                                    f"{machine_info(device).get('gpu', 'CPU')}")
    print(markdown_table(rows))
    for r in rows:
        if r.get("decode_cpu_s_per_token"):
            print(f"{r['system']}, {r['context']}: {r['decode_cpu_s_per_token']:.4f} CPU s/token"
                  f"{', rounds ' + str(r['adaptive_rounds']) if r['adaptive_rounds'] else ''}")
    print_projections(result)
    print(f"\nwrote {path} and {path.with_suffix('.png').name}", file=sys.stderr)
    return 0


def print_projections(result: dict) -> None:
    ratios = result["ours_ar_over_transformers"]
    if ratios:
        print("\nours autoregressive / transformers generate, decode s/token (lower is better for us): "
              + ", ".join(f"{c}: {r:.2f}" for c, r in ratios.items()))
    proj = result["projections"]
    for row in proj.get("this_machine", []):
        pc = row["phase_costs"]
        print(f"this machine, context {row['context']}: L1 step {pc['l1_step_s'] * 1e3:.2f} ms, L2 step "
              f"{pc['l2_step_s'] * 1e3:.2f} ms, L3 pass {pc['l3_pass_s'] * 1e3:.2f} ms -> cost model "
              f"{row['implied_s_per_token']:.4f} s/token (measured {row['measured_s_per_token']:.4f})")
    if "rows" not in proj:
        return
    print(f"\nPROJECTIONS (roofline of {proj['card']['name']}, not measurements), accepted per pass "
          f"{proj['accepted_per_pass_used']:.2f} [{proj['accepted_per_pass_source']}]")
    print("| model | cards | context | KV GiB | autoregressive s/token | TriForce s/token |\n|---|---|---|---|---|---|")
    for r in proj["rows"]:
        print(f"| {r['model']} | {r['cards']} | {r['context']} | {r['kv_cache_gib']:.1f} | "
              f"{r['autoregressive_s_per_token']:.3f} | {r['triforce_s_per_token']:.3f} |")
    print("published TriForce (Llama2-7B-128K, 128K): " + "; ".join(
        f"{p['setup']}: {p['s_per_token']} s/token" for p in proj["published_triforce"]))
