"""Adaptive speculation against a sweep of fixed gammas, on the trained model pair.

`python -m bench.adaptive_sweep`: stories260K (target) and stories260K-draft41K (draft) from
offload_runtime/assets, the ~400-token story prompt of offload_runtime/trained.py (unless
--prompt-file), a retrieval budget of 1/8 of the prompt. Times, side by side with the same
prompt and the same number of new tokens: autoregressive decoding, the engine with
`--gamma auto` (two and three levels), and the engine with gamma fixed at 1..12 (two levels,
and three levels for each --draft-gammas). Seconds per token are the whole decode (first to
last token, the controller's warm-up and probes included) / new tokens, median over --repeats
runs interleaved across systems. --offload on streams the full cache through the offload
pipeline; --emulate-link GBPS paces it like a GPU's link (offload_runtime/cuda_streams/emulated.py). Besides
wall-clock, CPU seconds per token (process time): steadier on a shared machine. Results: bench/results/adaptive_sweep_<tag>.json and a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from offload_runtime import loading, trained
from offload_runtime.session import Session
from offload_runtime.settings import EngineSettings
from offload_runtime.sampling import SamplingParams

from .common import RESULTS, machine_info, write_json



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.adaptive_sweep", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(trained.TARGET))
    p.add_argument("--draft", default=str(trained.DRAFT), help="'' for none")
    p.add_argument("--prompt-file", help="prompt text (default: the trained model's story prompt)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="cut the prompt to this many tokens")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--budget", type=int, default=None, help="retrieval budget (default: 1/8 of the prompt)")
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--gammas", default="1-12", help="fixed gammas swept, e.g. 1-12 or 2,4,8")
    p.add_argument("--draft-gammas", default="2,4", help="fixed draft gammas of the three-level sweep")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--offload", choices=["on", "off"], default="off")
    p.add_argument("--emulate-link", type=float, default=None, metavar="GBPS",
                   help="stream the offloaded cache over an emulated link of this many GB/s (implies --offload on)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="cpu")
    return p.parse_args(argv)


def int_list(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in text.split(",") if x]


def cache_factory(args: argparse.Namespace, target: Any) -> Any:
    """None (the on-device FullCache), or an OffloadedCache factory (over the emulated link if asked)."""
    if args.offload == "off" and args.emulate_link is None:
        return None
    from offload_runtime.launch import offloaded_cache

    cfg, dev, dtype, gbps = target.cfg, target.device, target.dtype, args.emulate_link
    return lambda cap: offloaded_cache(cfg, dev, dtype, cap, 0, emulate_link=gbps)


def story_prompt(args: argparse.Namespace, target: Any, tokenizer: Any) -> list[int]:
    text = Path(args.prompt_file).read_text() if args.prompt_file else trained.story_prompt()
    return tokenizer(text)["input_ids"][: args.prompt_tokens]


def systems(args: argparse.Namespace, has_draft: bool) -> list[tuple[str, str, bool, int | None, int | None]]:
    """(name, mode, with draft, gamma, draft gamma); None: chosen by the controller."""
    out = [("autoregressive", "autoregressive", False, None, None), ("auto 2-level", "triforce", False, None, None)]
    if has_draft:
        out.append(("auto 3-level", "triforce", True, None, None))
    for g in int_list(args.gammas):
        out.append((f"fixed gamma {g} 2-level", "triforce", False, g, None))
        if has_draft:
            out += [(f"fixed gamma {g} 3-level dg {d}", "triforce", True, g, d) for d in int_list(args.draft_gammas)]
    return out


def run_once(args: argparse.Namespace, target: Any, draft: Any, prompt: list[int], system: tuple, factory: Any,
             seed: int) -> dict:
    name, mode, with_draft, gamma, draft_gamma = system
    settings = EngineSettings(budget=args.budget, chunk_size=args.chunk_size, gamma=gamma, draft_gamma=draft_gamma,
                              sinks=4, window=64)
    capacity = len(prompt) + args.new_tokens + settings.max_gamma + 1
    session = Session(target, draft if with_draft else None, SamplingParams(args.temperature), [], settings,
                      torch.Generator().manual_seed(seed), mode, cache=factory(capacity) if factory else None,
                      capacity=capacity)
    session.extend(prompt)
    cpu = time.process_time()
    result = session.generate(args.new_tokens)
    stats = result.stats
    return {"s_per_token": stats["decode_s"] / stats["new_tokens"], "tokens": result.token_ids,
            "cpu_s_per_token": (time.process_time() - cpu) / stats["new_tokens"],
            "mean_accepted_per_pass": stats["mean_accepted_per_pass"],
            "l3_acceptance_of_l2": stats["l3_acceptance_of_l2"], "l2_acceptance_of_l1": stats["l2_acceptance_of_l1"],
            "adaptive": stats.get("adaptive") if gamma is None and mode == "triforce" else None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)  # a 260K-parameter model: threads only add synchronisation
    dev = torch.device("cpu")
    target = loading.load(args.model, dev, "float32")
    draft = loading.load(args.draft, dev, "float32").model if args.draft else None
    prompt = story_prompt(args, target.model, target.tokenizer)
    args.budget = args.budget or max(2 * args.chunk_size, len(prompt) // 8)
    factory = cache_factory(args, target.model)
    todo = systems(args, draft is not None)
    print(f"adaptive sweep: prompt {len(prompt)} tokens, budget {args.budget}, {args.new_tokens} new tokens, "
          f"{len(todo)} systems x {args.repeats} repeats, link: "
          f"{f'emulated {args.emulate_link:g} GB/s' if args.emulate_link else args.offload}", file=sys.stderr)
    runs: dict[str, list[dict]] = {s[0]: [] for s in todo}
    for rep in range(args.repeats):  # interleaved: a burst of machine load hits every system alike
        for system in todo:
            runs[system[0]].append(run_once(args, target.model, draft, prompt, system, factory, seed=rep))
    rows = summarise(runs)
    result = {"benchmark": "adaptive_sweep", "machine": machine_info(dev), "settings": vars(args),
              "prompt_tokens": len(prompt), "rows": rows}
    write_json(args.out, "adaptive_sweep", result, args.tag)
    print(table(rows))
    return 0


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    """Median s/token per system; ratios to the best fixed setting and to autoregressive decoding."""
    med = {name: statistics.median(r["s_per_token"] for r in rs) for name, rs in runs.items()}
    cpu = {name: statistics.median(r["cpu_s_per_token"] for r in rs) for name, rs in runs.items()}
    fixed = {n: s for n, s in med.items() if n.startswith("fixed")}
    best = min(fixed, key=fixed.get) if fixed else None
    best_cpu = min((n for n in cpu if n.startswith("fixed")), key=cpu.get, default=None)
    reference = runs["autoregressive"][0]["tokens"]
    rows = []
    for name, rs in runs.items():
        rows.append({"system": name, "s_per_token": med[name], "all_s_per_token": [r["s_per_token"] for r in rs],
                     "over_best_fixed": med[name] / fixed[best] if best else None, "best_fixed": best,
                     "over_autoregressive": med[name] / med["autoregressive"],
                     "cpu_s_per_token": cpu[name], "best_fixed_cpu": best_cpu,
                     "cpu_over_best_fixed": cpu[name] / cpu[best_cpu] if best_cpu else None,
                     "cpu_over_autoregressive": cpu[name] / cpu["autoregressive"],
                     "mean_accepted_per_pass": rs[0]["mean_accepted_per_pass"],
                     "l3_acceptance_of_l2": rs[0]["l3_acceptance_of_l2"],
                     "l2_acceptance_of_l1": rs[0]["l2_acceptance_of_l1"],
                     "same_tokens_as_autoregressive": all(r["tokens"] == reference for r in rs),
                     "adaptive": rs[-1]["adaptive"]})
    return rows


def table(rows: list[dict]) -> str:
    def f(x: Any, spec: str = ".2f") -> str:
        return "n/a" if x is None else format(x, spec)

    lines = ["| system | s/token (ms) | / best fixed | / autoregressive | CPU ms/token | / best fixed | / AR | "
             "tok/L3 pass | L3 acc. L2 | same tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['s_per_token'] * 1e3:.3f} | {f(r['over_best_fixed'])} | "
                     f"{r['over_autoregressive']:.2f} | {r['cpu_s_per_token'] * 1e3:.3f} | "
                     f"{f(r['cpu_over_best_fixed'])} | {r['cpu_over_autoregressive']:.2f} | "
                     f"{f(r['mean_accepted_per_pass'])} | "
                     f"{f(r['l3_acceptance_of_l2'])} | {'yes' if r['same_tokens_as_autoregressive'] else 'NO'} |")
    best = rows[0]["best_fixed"]
    lines.append(f"\nbest fixed: {best} (wall-clock), {rows[0]['best_fixed_cpu']} (CPU time)")
    for r in rows:
        if r["adaptive"]:
            a = r["adaptive"]
            lines.append(f"{r['system']}: rounds {a['rounds']}, gammas {a['gamma_histogram']}, "
                         f"draft gammas {a['draft_gamma_histogram']}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
