"""The consumer-GPU regime on a CPU: a "miniature RTX 4090" over an EMULATED PCIe link.

An RTX 4090 reads its memory ~40x faster than its PCIe 4.0 x16 link moves bytes (1008 vs
~25 GB/s). Here the "GPU" is this CPU and its memory, and the link is the emulated copy
engine (`offload_runtime/cuda_streams/emulated.py`) set to this machine's measured memory-read bandwidth
divided by 40 (or --emulate-link GBPS). The whole full cache lives behind that link; an MHA
synthetic model with a context where the K/V outweighs the weights. Rows, one shared prefill:

  ours autoregressive           one L3 pass over the link per token
  ours triforce 2-/3-level      budget >= context: L2 holds everything, every token is accepted
                                (the method's upper bound on this hardware shape)
  triforce at budget 1/8        COST MODEL: phase costs measured here at that budget, acceptance
                                measured on the trained stories260K pair at 1/8 of its story

Per row: s/token, tokens per L3 pass, speed-up over autoregressive; per L3 pass: seconds
against bytes / link GB/s, achieved link GB/s, copy time hidden under compute, where the
time went (copy engine busy, compute waiting, compute); the cost model's prediction
against the measured s/token. Everything here is an EMULATION, labelled so.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import cost_model
from .models import DRAFTS, SHAPES, build_pair, parameter_count
from .common import RESULTS, Clock, log, machine_info, make_prompt, memory_read_gbps, write_json



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench --emulate-link", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--emulate-link", default="auto", nargs="?", const="auto", metavar="GBPS|auto",
                   help="the emulated link's GB/s; auto: this machine's memory-read GB/s / --link-ratio")
    p.add_argument("--link-ratio", type=float, default=40.0, help="memory bandwidth / link bandwidth (4090: ~40)")
    p.add_argument("--synthetic", default="mha-220m", choices=sorted(SHAPES), help="synthetic target shape")
    p.add_argument("--contexts", default="8192", help="comma-separated context lengths (tokens)")
    p.add_argument("--gamma", type=int, default=6)
    p.add_argument("--draft-gamma", type=int, default=4)
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--budget-share", type=int, default=8, help="realistic budget = context / this")
    p.add_argument("--ar-tokens", type=int, default=3, help="tokens of the autoregressive run")
    p.add_argument("--passes", type=int, default=2, help="L3 passes of each budget >= context run")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="")
    return p.parse_args(argv)


def trained_acceptance(gamma: int, draft_gamma: int, chunk_size: int, share: int) -> dict:
    """Tokens per L3 pass and steps per pass of stories260K (2 and 3 levels) at 1/share of its story."""
    from offload_runtime import loading, trained
    from offload_runtime.generate import generate_triforce
    from offload_runtime.settings import EngineSettings
    from offload_runtime.sampling import SamplingParams

    cpu = torch.device("cpu")
    target = loading.load(str(trained.TARGET), cpu, "float32")
    draft = loading.load(str(trained.DRAFT), cpu, "float32", with_tokenizer=False)
    ids = target.tokenizer(trained.story_prompt())["input_ids"]
    budget = max(2 * chunk_size, len(ids) // share // chunk_size * chunk_size)
    settings = EngineSettings(budget=budget, chunk_size=chunk_size, gamma=gamma, draft_gamma=draft_gamma,
                              sinks=4, window=64)
    n_new = target.model.cfg.max_position_embeddings - len(ids) - gamma - 1
    out = {"model": trained.TARGET.name, "draft": trained.DRAFT.name, "prompt_tokens": len(ids),
           "budget": budget, "new_tokens": n_new}
    with trained.one_thread():
        for name, d in (("2-level", None), ("3-level", draft.model)):
            s = generate_triforce(target.model, d, ids, n_new, SamplingParams(), [], settings).stats
            out[name] = {"accepted_per_pass": s["mean_accepted_per_pass"],
                         "l3_acceptance_of_l2": s["l3_acceptance_of_l2"],
                         "l2_per_pass": s["l2_forwards"] / s["l3_passes"],
                         "l1_per_pass": s["l1_forwards"] / s["l3_passes"]}
    return out


def run(session: Any, mode: str, draft: Any, prompt_len: int, new_tokens: int) -> dict:
    """One generation from the shared prefill: its stats, tokens, s/token and copy-engine counters."""
    session.truncate(prompt_len)
    session.use(mode, draft)
    clock = Clock(session.full.backend.collect)
    result = session.generate(new_tokens, clock)
    link = session.full.backend.collect().minus(clock.start)
    return {"stats": dict(result.stats), "tokens": result.token_ids, "s_per_token": clock.s_per_token(),
            "copies": dataclasses.asdict(link)}


def l3_breakdown(r: dict, link_gbps: float) -> dict:
    """Where an L3 pass's time went, against its floor bytes / link GB/s."""
    s, c = r["stats"], r["copies"]
    passes = s["l3_passes"]
    pass_s = s["time_l3_s"] / passes
    bytes_per_pass = c["h2d_bytes"] / passes
    floor = bytes_per_pass / (link_gbps * 1e9)
    copy_s = (c["h2d_s"] + c["d2h_s"]) / passes
    wait_s = c["wait_s"] / passes
    return {"l3_pass_s": pass_s, "bytes_per_pass": bytes_per_pass, "floor_s": floor, "over_floor": pass_s / floor,
            "achieved_link_gbps": c["h2d_bytes"] / c["h2d_s"] / 1e9 if c["h2d_s"] else None,
            "copy_engine_busy_s": copy_s, "compute_waiting_s": wait_s, "compute_s": pass_s - wait_s,
            "copy_hidden_fraction": max(0.0, copy_s - wait_s) / copy_s if copy_s else None}


def phase_costs(s: dict) -> cost_model.PhaseCosts:
    l1 = (s.get("time_l1_s") or 0.0) / s["l1_forwards"] if s.get("l1_forwards") else 0.0
    l2 = (s["time_l2_s"] - (s.get("time_l1_s") or 0.0)) / s["l2_forwards"] if s.get("l2_forwards") else 0.0
    return cost_model.PhaseCosts(l1, l2, s["time_l3_s"] / s["l3_passes"])


def predicted(s: dict, accepted: float | None = None, l2: float | None = None, l1: float | None = None) -> float:
    """The cost model's s/token from a run's phase costs (and, when given, another pair's acceptance);
    autoregressive: one L3 pass per token."""
    passes = s["l3_passes"]
    return cost_model.seconds_per_token(
        phase_costs(s), accepted if accepted is not None else (s.get("mean_accepted_per_pass") or 1.0),
        l2 if l2 is not None else (s.get("l2_forwards") or 0) / passes,
        l1 if l1 is not None else (s.get("l1_forwards") or 0) / passes)


def measured_row(name: str, context: int, r: dict, link_gbps: float, ar_s: float) -> dict:
    s = r["stats"]
    return {"system": name, "context": context, "kind": "measured", "s_per_token": r["s_per_token"],
            "speedup_over_ar": ar_s / r["s_per_token"], "tokens_per_l3_pass": s.get("mean_accepted_per_pass") or 1.0,
            "cost_model_s_per_token": predicted(s), "phase_costs": dataclasses.asdict(phase_costs(s)),
            "l3": l3_breakdown(r, link_gbps), "new_tokens": len(r["tokens"])}


def modelled_row(name: str, context: int, r: dict, link_gbps: float, ar_s: float, acc: dict, budget: int) -> dict:
    s = r["stats"]
    value = predicted(s, acc["accepted_per_pass"], acc["l2_per_pass"], acc["l1_per_pass"])
    return {"system": name, "context": context, "kind": "cost model", "budget": budget, "s_per_token": value,
            "speedup_over_ar": ar_s / value, "tokens_per_l3_pass": acc["accepted_per_pass"],
            "cost_model_s_per_token": value, "phase_costs": dataclasses.asdict(phase_costs(s)),
            "l3": l3_breakdown(r, link_gbps), "new_tokens": len(r["tokens"]),
            "acceptance_source": "stories260K at 1/8 of its story (trained pair)"}


def run_context(args: argparse.Namespace, target: Any, draft: Any, context: int, link_gbps: float,
                trained_acc: dict) -> list[dict]:
    """One prefill over the emulated link, then every system from it."""
    from offload_runtime.launch import offloaded_cache
    from offload_runtime.session import Session
    from offload_runtime.settings import EngineSettings
    from offload_runtime.sampling import SamplingParams

    step = args.gamma + 1
    full_new = 1 + args.passes * step  # the prefill's token, then `passes` passes of gamma + 1 tokens
    capacity = context + full_new + step
    full_budget = -(-capacity // args.chunk_size) * args.chunk_size
    settings = EngineSettings(budget=full_budget, chunk_size=args.chunk_size, gamma=args.gamma,
                              draft_gamma=args.draft_gamma)
    cache = offloaded_cache(target.cfg, "cpu", target.dtype, capacity, 0, emulate_link=link_gbps)
    session = Session(target, None, SamplingParams(0.0), [], settings, None, "autoregressive", capacity=capacity,
                      cache=cache)
    prompt = make_prompt(context, target.cfg.vocab_size, None)
    t0 = time.perf_counter()
    session.extend(prompt)
    log(f"context {context}: prefill {time.perf_counter() - t0:.1f} s")
    runs = {"ar": run(session, "autoregressive", None, context, args.ar_tokens)}
    ar_s = runs["ar"]["s_per_token"]
    log(f"context {context}: autoregressive {ar_s:.3f} s/token")
    runs["2"] = run(session, "triforce", None, context, full_new)
    runs["3"] = run(session, "triforce", draft, context, full_new)
    session.use("autoregressive")  # drop L2, then a realistic budget for the cost-model rows
    budget = max(2 * args.chunk_size, context // args.budget_share // args.chunk_size * args.chunk_size)
    session.reconfigure(dataclasses.replace(settings, budget=budget))  # (assigning .settings left L2 at the full budget)
    runs["real"] = run(session, "triforce", draft, context, 3)
    rows = [measured_row("ours autoregressive", context, runs["ar"], link_gbps, ar_s),
            measured_row("ours triforce 2-level, budget >= context", context, runs["2"], link_gbps, ar_s),
            measured_row("ours triforce 3-level, budget >= context", context, runs["3"], link_gbps, ar_s)]
    for level in ("2-level", "3-level"):
        rows.append(modelled_row(f"triforce {level}, budget 1/{args.budget_share} (COST MODEL)", context,
                                 runs["real"], link_gbps, ar_s, trained_acc[level], budget))
    reference = runs["ar"]["tokens"]
    for row, key in zip(rows, ("ar", "2", "3", "real", "real")):
        tokens = runs[key]["tokens"]
        n = min(len(tokens), len(reference))
        row["identical_tokens"] = tokens[:n] == reference[:n] and runs["2"]["tokens"][:len(tokens)] == tokens
        log(f"context {context}: {row['system']}: {row['s_per_token']:.3f} s/token")
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| EMULATED link: system | context | kind | s/token | speed-up vs AR | tokens / L3 pass | cost model s/token "
             "| L3 pass s (x bytes/link) | achieved link GB/s | copy hidden | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        l3 = r["l3"]
        lines.append(f"| {r['system']} | {r['context']} | {r['kind']} | {r['s_per_token']:.3f} | "
                     f"{r['speedup_over_ar']:.2f}x | {r['tokens_per_l3_pass']:.2f} | {r['cost_model_s_per_token']:.3f} | "
                     f"{l3['l3_pass_s']:.2f} ({l3['over_floor']:.2f}x) | {l3['achieved_link_gbps']:.3f} | "
                     f"{l3['copy_hidden_fraction']:.0%} | {'yes' if r['identical_tokens'] else 'NO'} |")
    return "\n".join(lines)


def where_the_time_went(rows: list[dict], link_gbps: float) -> list[str]:
    """The must-shows, checked and said in words."""
    lines = []
    for r in rows:
        l3, pc = r["l3"], r["phase_costs"]
        lines.append(f"{r['system']} @ {r['context']}: L3 pass {l3['l3_pass_s']:.2f} s = {l3['over_floor']:.2f}x its "
                     f"{l3['bytes_per_pass'] / 1e9:.2f} GB / {link_gbps:.3f} GB/s (copy engine busy "
                     f"{l3['copy_engine_busy_s']:.2f} s, compute waiting {l3['compute_waiting_s']:.2f} s, computing "
                     f"{l3['compute_s']:.2f} s); L2 step {pc['l2_step_s'] * 1e3:.0f} ms, L1 step "
                     f"{pc['l1_step_s'] * 1e3:.1f} ms")
        if r["kind"] == "measured":
            err = r["cost_model_s_per_token"] / r["s_per_token"] - 1
            lines.append(f"  cost model {r['cost_model_s_per_token']:.3f} s/token vs measured {r['s_per_token']:.3f} "
                         f"({err:+.0%}{'' if abs(err) <= 0.15 else ', OUTSIDE 15%'})")
    return lines


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    labels = [f"{r['system']}\n@{r['context'] // 1024}K" for r in rows]
    colors = ["tab:gray" if r["kind"] == "measured" and "autoregressive" in r["system"] else
              ("tab:blue" if r["kind"] == "measured" else "tab:orange") for r in rows]
    ax.barh(labels, [r["s_per_token"] for r in rows], color=colors)
    for i, r in enumerate(rows):
        ax.text(r["s_per_token"], i, f" {r['speedup_over_ar']:.1f}x", va="center", fontsize=7)
    ax.set_xlim(0, 1.15 * max(r["s_per_token"] for r in rows))
    ax.set_xlabel("decode seconds / token (gray, blue: measured; orange: cost model); label: speed-up", fontsize=8)
    ax.tick_params(axis="y", labelsize=6)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    membw = memory_read_gbps()
    link = membw / args.link_ratio if args.emulate_link == "auto" else float(args.emulate_link)
    if not link > 0:
        print(f"error: --emulate-link must be a positive GB/s or auto, got {args.emulate_link}", file=sys.stderr)
        return 2
    shape = SHAPES[args.synthetic]
    _, target = build_pair(shape, torch.device("cpu"), torch.float32)
    _, draft = build_pair(DRAFTS["tiny" if args.synthetic == "tiny" else "default"], torch.device("cpu"),
                          torch.float32, seed=1, vocab=shape.vocab)
    kv_token = 2 * shape.layers * shape.kv_heads * (shape.hidden // shape.heads) * 4
    log(f"EMULATED link {link:.3f} GB/s (memory read {membw:.2f} GB/s / {args.link_ratio:g}); {args.synthetic}: "
        f"{parameter_count(shape) / 1e6:.0f}M parameters ({parameter_count(shape) * 4 / 1e9:.2f} GB fp32), "
        f"K/V {kv_token / 1e3:.0f} KB/token: " + ", ".join(f"{c}: {c * kv_token / 1e9:.2f} GB" for c in contexts))
    acc = trained_acceptance(args.gamma, args.draft_gamma, args.chunk_size, args.budget_share)
    log(f"stories260K at budget {acc['budget']} of {acc['prompt_tokens']}: 2-level "
        f"{acc['2-level']['accepted_per_pass']:.2f}, 3-level {acc['3-level']['accepted_per_pass']:.2f} tokens/L3 pass")
    rows = [row for c in contexts for row in run_context(args, target, draft, c, link, acc)]
    result = {"benchmark": "link_bench (EMULATED consumer-GPU link on a CPU)", "machine": machine_info(torch.device("cpu")),
              "memory_read_gbps": membw, "link_ratio": args.link_ratio, "emulated_link_gbps": link,
              "model": args.synthetic, "parameters": parameter_count(shape), "kv_bytes_per_token": kv_token,
              "settings": vars(args), "trained_acceptance": acc, "rows": rows,
              "note": "EMULATED: the 'GPU' is this CPU, the link a paced copy-engine thread; random weights "
                      "(budget >= context rows accept every token by construction); cost-model rows use the "
                      "acceptance of the trained stories260K pair"}
    path = write_json(args.out, f"link_bench_{args.synthetic}", result, args.tag)
    plot(rows, path.with_suffix(".png"), f"EMULATED miniature 4090 on a CPU: {args.synthetic} synthetic (MHA, random weights)\n"
                                    f"link {link:.3f} GB/s = memory read {membw:.2f} GB/s / {args.link_ratio:g}")
    print(markdown(rows))
    print("\n".join(where_the_time_went(rows, link)))
    log(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0
