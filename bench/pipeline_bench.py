"""Pipelined speculation (`--pipeline on`) against unpipelined rounds over an EMULATED link.

Per round, unpipelined: draft (gamma L2 steps) + L3 pass (the cache crosses the link). Pipelined:
the next round is drafted while the pass waits for slabs, so with every token accepted a round
costs ~max(link, draft + pass compute) instead of draft + max(link, pass compute) (here the
host thread both drafts and computes the pass; on a GPU the compute stream does both): the gain
is bounded by (link + draft) / max(link, draft), 2x at link == draft, ~1x when either dominates.
The link (`--emulate-link`):
  auto       the miniature RTX 4090 of `python -m bench --emulate-link`: this machine's
             memory-read GB/s / 40 (a 4090 reads its memory ~40x faster than PCIe 4.0 x16 moves
             bytes), an MHA model at a context where the K/V outweighs the weights (default)
  calibrate  the regime where pipelining pays most, on purpose: a round's draft and a pass's
             compute are measured first, then the link is set so one pass's bytes take
             `--link-over-draft` x their sum
  GBPS       a fixed link
Budget >= context (L2 holds everything: every token is accepted); the same session runs off and
on alternately (`--repeats`, medians), tokens compared. Then a PROJECTION through the cost model
(cost.py's pipelined_round_seconds, the adaptive controller's formula) with the acceptance
measured on the trained stories260K pair (rounds whose every token is accepted, the only ones
whose pre-draft is used). On the CPU everything is EMULATED (the 'GPU' is this CPU); with
`--device cuda` (bench/gpu_check.sh, section pipeline) a real GPU streams over its real link, bf16.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from typing import Any, Iterator

import torch

from offload_runtime import cost
from offload_runtime.settings import AUTO_MAX_GAMMA

from .models import SHAPES, build_pair
from .common import RESULTS, RTX4090_MEMORY_OVER_LINK, Clock, log, machine_info, make_prompt, memory_read_gbps, write_json


def gamma_arg(text: str) -> int | None:
    return None if text == "auto" else int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline_bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--synthetic", default="mha-220m", choices=sorted(SHAPES), help="synthetic target shape")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--gamma", type=gamma_arg, default=16,
                   help="proposals per round, or auto: the adaptive controller, which knows the rounds are pipelined")
    p.add_argument("--emulate-link", default="auto", metavar="auto|calibrate|GBPS",
                   help="auto: memory-read GB/s / --link-ratio (the miniature 4090); calibrate: see --link-over-draft")
    p.add_argument("--link-ratio", type=float, default=RTX4090_MEMORY_OVER_LINK, help="memory / link bandwidth (auto)")
    p.add_argument("--link-over-draft", type=float, default=1.0,
                   help="calibrate: one pass's link time / (a round's draft + a pass's compute)")
    p.add_argument("--new-tokens", type=int, default=120,
                   help="tokens per run (7 rounds of gamma + 1 at gamma 16; the first is not pipelined)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slabs", type=int, default=4, help="device slabs the pass streams the layers through")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cuda: a real GPU over its real host link (--emulate-link does not apply), bf16")
    p.add_argument("--tag", default="", help="suffix of the result file's name")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def make_session(target: Any, args: argparse.Namespace, link_gbps: float | None) -> Any:
    """The full cache offloaded behind the link (emulated at `link_gbps` on the CPU; the real one on CUDA)."""
    from offload_runtime.launch import offloaded_cache
    from offload_runtime.session import Session
    from offload_runtime.settings import EngineSettings
    from offload_runtime.sampling import SamplingParams

    capacity = args.context + 2 * (args.new_tokens + (args.gamma or AUTO_MAX_GAMMA) + 2)
    settings = EngineSettings(budget=-(-capacity // 8) * 8, chunk_size=8, gamma=args.gamma)
    device = target.device
    cache = offloaded_cache(target.cfg, device, target.dtype, capacity, 0, emulate_link=link_gbps, n_slabs=args.slabs)
    session = Session(target, None, SamplingParams(0.0), [], settings, None, "triforce", cache=cache)
    session.extend(make_prompt(args.context, target.cfg.vocab_size, None))
    return session


def run(session: Any, pipeline: str, args: argparse.Namespace) -> dict:
    session.truncate(args.context)
    session.reconfigure(dataclasses.replace(session.settings, pipeline=pipeline))
    session.use("triforce")
    clock = Clock(session.full.backend.collect)
    result = session.generate(args.new_tokens, clock)
    return {"s_per_token": clock.s_per_token(), "tokens": result.token_ids, "stats": dict(result.stats)}


def calibrated_session(target: Any, args: argparse.Namespace) -> tuple[Any, float, float]:
    """A session whose emulated link moves one pass's bytes in --link-over-draft x (a round's draft +
    a pass's compute), both measured just before on a fast link: on this CPU the pass's compute and
    the drafting share the host thread, so only the link's time can hide the drafting."""
    probe = make_session(target, args, 1000.0)
    s = run(probe, "off", args)["stats"]
    draft, compute = s["time_l2_s"] / s["l3_passes"], s["time_l3_s"] / s["l3_passes"]
    pass_bytes = probe.full.bytes_per_pass(args.context)
    link = pass_bytes / (args.link_over_draft * (draft + compute)) / 1e9
    log(f"draft {draft * 1e3:.0f} ms/round, pass compute {compute * 1e3:.0f} ms; EMULATED link {link:.3f} GB/s: "
        f"{pass_bytes / 1e6:.1f} MB/pass in {args.link_over_draft * (draft + compute) * 1e3:.0f} ms")
    return make_session(target, args, link), link, draft


def trained_all_accepted(gamma: int, share: int = 8) -> dict:
    """stories260K, 2 levels at 1/share of its story: share of rounds with every proposal accepted."""
    from offload_runtime import loading, trained
    from offload_runtime.generate import generate_triforce
    from offload_runtime.settings import EngineSettings
    from offload_runtime.sampling import SamplingParams

    target = loading.load(str(trained.TARGET), torch.device("cpu"), "float32")
    ids = target.tokenizer(trained.story_prompt())["input_ids"]
    budget = max(16, len(ids) // share // 8 * 8)
    n_new = target.model.cfg.max_position_embeddings - len(ids) - gamma - 1
    with trained.one_thread():
        s = generate_triforce(target.model, None, ids, n_new, SamplingParams(), [],
                              EngineSettings(budget=budget, chunk_size=8, gamma=gamma)).stats
    return {"budget": budget, "prompt_tokens": len(ids), "rounds": s["l3_passes"],
            "all_accepted_share": s["rounds_all_accepted"] / s["l3_passes"],
            "acceptance": s["l3_acceptance_of_l2"], "accepted_per_pass": s["mean_accepted_per_pass"]}


def projection(off: dict, on: dict, acc: dict) -> dict:
    """COST MODEL (offload_runtime/cost.py, the adaptive controller's): unpipelined round = draft + pass;
    pipelined = cost.pipelined_round_seconds: the drafting the on run hid per pass in the link waits
    pre-drafts x1 and the next round, which is used when the previous round's every token and x1 were
    accepted (used = all-accepted share * acceptance) and otherwise redrafted on the critical path."""
    s = off["stats"]
    draft, l3 = s["time_l2_s"] / s["l3_passes"], s["time_l3_s"] / s["l3_passes"]
    hidden = on["stats"]["time_overlapped_s"] / on["stats"]["l3_passes"]
    used = acc["all_accepted_share"] * acc["acceptance"]
    off_round = draft + l3
    on_round = cost.pipelined_round_seconds(l3, draft, s["time_l2_s"] / s["l2_forwards"], used, hidden)
    per_pass = acc["accepted_per_pass"]
    return {"draft_per_round_s": draft, "l3_pass_s": l3, "hidden_per_pass_s": hidden, "predraft_used_share": used,
            "off_s_per_token": off_round / per_pass, "on_s_per_token": on_round / per_pass,
            "gain": off_round / on_round}


def link_sessions(target: Any, args: argparse.Namespace) -> Iterator[tuple[Any, float, str]]:
    """One session per repeat with its emulated link GB/s and how that was set."""
    mode = args.emulate_link
    if args.device == "cuda":
        from offload_runtime.cuda_streams.probe import link_bandwidth

        link = link_bandwidth(target.device) or 0.0
        log(f"CUDA {torch.cuda.get_device_name()}: the real host link, {link:.1f} GB/s measured")
        session = make_session(target, args, None)
        for _ in range(args.repeats):
            yield session, link, f"real link of {torch.cuda.get_device_name()}"
        return
    if mode == "calibrate":  # (re)calibrated each repeat: this machine's speed drifts under load
        for _ in range(args.repeats):
            session, link, _ = calibrated_session(target, args)
            yield session, link, f"calibrated: a pass's bytes take {args.link_over_draft:g} x (draft + pass compute)"
        return
    if mode == "auto":
        read = memory_read_gbps()
        link, how = read / args.link_ratio, f"miniature 4090: memory read {read:.2f} GB/s / {args.link_ratio:.0f}"
    else:
        link, how = float(mode), "fixed"
    log(f"EMULATED link {link:.3f} GB/s ({how})")
    session = make_session(target, args, link)
    for _ in range(args.repeats):
        yield session, link, how


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.emulate_link not in ("auto", "calibrate"):
        try:
            assert float(args.emulate_link) > 0
        except (ValueError, AssertionError):
            print(f"error: --emulate-link must be auto, calibrate or a positive GB/s, got {args.emulate_link}",
                  file=sys.stderr)
            return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    _, target = build_pair(SHAPES[args.synthetic], device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    links, how = [], ""
    for session, link, how in link_sessions(target, args):
        links.append(link)
        for mode in ("off", "on"):
            runs[mode].append(run(session, mode, args))
            log(f"--pipeline {mode}: {runs[mode][-1]['s_per_token']:.4f} s/token")
    med = {m: statistics.median(r["s_per_token"] for r in rs) for m, rs in runs.items()}
    same = all(r["tokens"] == runs["off"][0]["tokens"] for rs in runs.values() for r in rs)
    acc = trained_all_accepted(args.gamma or AUTO_MAX_GAMMA)
    proj = projection(runs["off"][-1], runs["on"][-1], acc)
    where = "EMULATED link on a CPU" if device.type == "cpu" else "CUDA, the real host link (not emulated)"
    result = {"benchmark": f"pipeline_bench ({where})", "machine": machine_info(device),
              "settings": vars(args), "emulated_link_gbps": links, "link": how,
              "s_per_token": med, "s_per_token_runs": {m: [r["s_per_token"] for r in rs] for m, rs in runs.items()},
              "gain": med["off"] / med["on"], "identical_tokens": same,
              "bound": "(link + draft) / max(link, draft)", "round_phases": round_phases(runs),
              "pipelined_stats": {k: runs["on"][-1]["stats"][k] for k in (
                  "draft_steps_overlapped", "predrafted_tokens_used", "predrafted_tokens_dropped", "mean_accepted_per_pass")},
              "trained_acceptance": acc, "projection": proj,
              "adaptive": {m: rs[-1]["stats"].get("adaptive") for m, rs in runs.items()}}
    path = write_json(args.out, f"pipeline_bench_{args.synthetic}", result, args.tag)
    print(table(args, result))
    log(f"wrote {path}")
    return 0 if same else 1


def round_phases(runs: dict[str, list[dict]]) -> dict:
    """Per L3 pass, the median over repeats of its drafting and its pass seconds, by mode."""
    out = {}
    for mode, rs in runs.items():
        per = [(r["stats"]["time_l2_s"] / r["stats"]["l3_passes"], r["stats"]["time_l3_s"] / r["stats"]["l3_passes"])
               for r in rs]
        out[mode] = {"draft_s_per_pass": statistics.median(d for d, _ in per),
                     "l3_s_per_pass": statistics.median(p for _, p in per)}
    return out


def table(args: argparse.Namespace, result: dict) -> str:
    med, proj, same = result["s_per_token"], result["projection"], result["identical_tokens"]
    link = statistics.median(result["emulated_link_gbps"])
    return "\n".join([
        f"| {'EMULATED link' if args.device == 'cpu' else 'link'} {link:.3f} GB/s ({result['link']}), {args.synthetic} @ {args.context}, gamma {args.gamma or 'auto'} "
        f"| s/token | gain |",
        "|---|---|---|",
        f"| --pipeline off, budget >= context (measured, median of {args.repeats}) | {med['off']:.4f} | 1.00x |",
        f"| --pipeline on, budget >= context (measured, median of {args.repeats}) | {med['on']:.4f} "
        f"| {med['off'] / med['on']:.2f}x, tokens identical: {'yes' if same else 'NO'} |",
        f"| off, stories260K acceptance (PROJECTION) | {proj['off_s_per_token']:.4f} | 1.00x |",
        f"| on, stories260K acceptance (PROJECTION) | {proj['on_s_per_token']:.4f} | {proj['gain']:.2f}x "
        f"(pre-draft used in {proj['predraft_used_share']:.0%} of rounds) |"])


if __name__ == "__main__":
    sys.exit(main())
