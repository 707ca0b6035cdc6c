"""Does L2's retrieval pick the right chunks? Ours against an oracle and two baselines.

`python -m bench.retrieval_bench`: greedy TriForce (two levels, L2 drafts alone, gamma fixed)
on the same prompts with four L2 selections (caches/selection.py):
- ours: the engine's selection (each chunk's best key against the query, the chunk after a
  well-scored one kept with it) with its default re-retrieval policy;
- mean-key: TriForce's selection (each chunk's mean key), the engine's until this benchmark;
- oracle: chunks chosen by the true attention mass of the round's queries, recomputed every
  round: after each L3 pass, the queries of the positions L2 drafts next, taken from the greedy
  reference run (which the verified tokens follow), so it sees the future no policy can;
- streaming: StreamingLLM only (chunk 0's sinks and the most recent chunks);
- random: random chunks.
It reports L3's acceptance of L2's tokens and the tokens emitted per L3 pass, against the
budget share (budget / context). Models: recall-320K (assets/; prompts: a long document and
the cue of a record planted far back, recall_task.py) at several context lengths, and
stories260K (stories it wrote itself). Every run's tokens are checked equal to the
autoregressive ones: retrieval changes speed, never output. Results:
bench/results/retrieval_<tag>.json, a markdown table, and a plot (matplotlib, if installed).
"""
from __future__ import annotations

import argparse
import random
import sys
from dataclasses import replace
from typing import Any

import torch

from offload_runtime import loading, recall_task, trained
from offload_runtime.caches.base import RECENT_QUERIES
from offload_runtime.caches.full import FullCache
from offload_runtime.prefill import PREFILL_CHUNK
from offload_runtime.sampling import SamplingParams
from offload_runtime.session import Session
from offload_runtime.settings import EngineSettings

from .common import RESULTS, log, machine_info, markdown_table, write_json

SELECTIONS = {  # name: the settings that make it (on top of budget, chunk and gamma)
    "ours": {},
    "mean-key": {"selection": "mean-key"},
    "oracle": {"selection": "attention", "refresh_every": 1},
    "streaming": {"selection": "recent"},
    "random": {"selection": "random"},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.retrieval_bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--contexts", default="2048,4096,8192,16384", help="recall-320K context lengths (tokens)")
    p.add_argument("--shares", default="4,8,16,32,64", help="budget shares 1/N")
    p.add_argument("--prompts", type=int, default=4, help="prompts per context length")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--gamma", type=int, default=8, help="L2 tokens per L3 pass")
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--selections", default=",".join(SELECTIONS))
    p.add_argument("--ours", default="", help="settings of 'ours' as key=value,... (e.g. refresh_below=0.5)")
    p.add_argument("--models", default="recall,stories")
    p.add_argument("--recall-model", default=str(trained.RECALL), help="the recall model's checkpoint")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="cpu")
    return p.parse_args(argv)


def recall_prompts(context: int, n: int) -> list[list[int]]:
    """Prompts of `context` - 128 tokens (room for the answer within the model's positions): a document
    and the cue of a record planted at least a quarter of the context back."""
    rng = random.Random(context)
    return [recall_task.recall_prompt(recall_task.document(rng, context - 128 - 3), rng, context // 4)[0]
            for _ in range(n)]


def story_prompts(model: Any, n: int, length: int = 448) -> list[list[int]]:
    """Stories stories260K writes itself (sampled at temperature 1 from <s>, seeded), `length` tokens."""
    prompts = []
    for seed in range(n):
        session = Session(model, None, SamplingParams(1.0), [], EngineSettings(), torch.Generator().manual_seed(seed),
                          "autoregressive", capacity=length + 8)
        session.extend([1])
        prompts.append([1] + session.generate(length - 1).token_ids)
    return prompts


def future_queries(model: Any, prompt: list[int], continuation: list[int]) -> list[torch.Tensor]:
    """Per layer, the target's queries [Hq, n, D] at positions len(prompt) - 1 ... of prompt + continuation
    (the continuation is the greedy one, so these are the queries every L2 round will need)."""
    full = FullCache(model.cfg, model.device, model.dtype, capacity=len(prompt) + len(continuation))
    with torch.inference_mode():
        for start in range(0, len(prompt) - 1, PREFILL_CHUNK):
            model(torch.tensor(prompt[start:min(start + PREFILL_CHUNK, len(prompt) - 1)]), full, last_only=True)
        rows = prompt[-1:] + continuation
        assert len(rows) <= RECENT_QUERIES, "the oracle reads the queries the full cache keeps"
        model(torch.tensor(rows), full)
    return [q[:, -len(rows):] for q in full.recent_queries]


def give_oracle_the_future(session: Session, queries: list[torch.Tensor], first: int, gamma: int) -> None:
    """The oracle's selection, every time the engine selects (after the prefill, after each L3 pass): the
    chunks with the most attention mass of the queries of the next `gamma` positions, which only a
    benchmark knows (from the greedy reference run). It replaces the engine's own `select`."""
    caches = session.caches

    def select(length: int, query_row: int) -> None:
        a = length - first
        caches.retrieval.build(caches.full, length, [q[:, a:a + gamma] for q in queries])
        caches.stats.retrieval_builds += 1

    caches.select = select


def run(model: Any, prompt: list[int], settings: EngineSettings | None, new_tokens: int,
        oracle: list[torch.Tensor] | None = None) -> tuple[list[int], Any]:
    mode = "triforce" if settings is not None else "autoregressive"
    session = Session(model, None, SamplingParams(0.0), [], settings or EngineSettings(), None, mode,
                      capacity=len(prompt) + new_tokens + 64)
    if oracle is not None:
        give_oracle_the_future(session, oracle, len(prompt) - 1, settings.gamma)
    session.extend(prompt)
    before = session.stats.snapshot()
    tokens = session.generate(new_tokens).token_ids
    return tokens, session.stats.since(before)


def measure(model: Any, prompts: list[list[int]], shares: list[int], args: argparse.Namespace,
            names: list[str], ours: dict, label: str) -> list[dict]:
    rows = []
    reference = [run(model, p, None, args.new_tokens)[0] for p in prompts]
    queries = [future_queries(model, p, r) for p, r in zip(prompts, reference)] if "oracle" in names else None
    context = len(prompts[0])
    for share in shares:
        budget = context // share
        if budget < 2 * args.chunk_size:
            continue
        base = EngineSettings(budget=budget, chunk_size=args.chunk_size, gamma=args.gamma, draft_gamma=1)
        for name in names:
            settings = replace(base, **{**SELECTIONS[name], **(ours if name == "ours" else {})})
            passes = accepted = proposed = emitted = 0
            for i, (prompt, expected) in enumerate(zip(prompts, reference)):
                tokens, stats = run(model, prompt, settings, args.new_tokens, queries[i] if name == "oracle" else None)
                if tokens != expected:
                    raise AssertionError(f"{label} {name} 1/{share}: tokens differ from autoregressive decoding")
                passes += stats.l3_passes
                accepted += stats.l3_accepted
                proposed += stats.l3_proposed
                emitted += stats.emitted_in_rounds
            rows.append({"model": label, "context": context, "share": share, "budget": budget, "selection": name,
                         "acceptance": accepted / proposed, "tokens_per_pass": emitted / passes})
            log(f"{label} {context} 1/{share} {name}: {emitted / passes:.2f} tokens per L3 pass, "
                f"acceptance {accepted / proposed:.3f}")
    return rows


def parse_ours(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        out[key] = type(getattr(EngineSettings(), key))(value)
    return out


def table(rows: list[dict], names: list[str]) -> str:
    """Tokens per L3 pass (acceptance) per selection, and ours / oracle."""
    keyed = {(r["model"], r["context"], r["share"], r["selection"]): r for r in rows}
    lines = []
    for model, context, share in dict.fromkeys((r["model"], r["context"], r["share"]) for r in rows):
        cells = [keyed[(model, context, share, n)] for n in names]
        ratio = (keyed[(model, context, share, "ours")]["tokens_per_pass"] /
                 keyed[(model, context, share, "oracle")]["tokens_per_pass"]) if {"ours", "oracle"} <= set(names) else None
        lines.append([model, context, f"1/{share}"] + [f"{c['tokens_per_pass']:.2f} ({c['acceptance']:.2f})" for c in cells]
                     + [f"{ratio:.2f}" if ratio is not None else ""])
    return markdown_table(["model", "context", "budget share"] + names + ["ours / oracle"], lines)


def plot(rows: list[dict], names: list[str], path: Any) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = list(dict.fromkeys((r["model"], r["context"]) for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.2), sharey=True, squeeze=False)
    for ax, (model, context) in zip(axes[0], groups):
        for name in names:
            pts = [(r["share"], r["tokens_per_pass"]) for r in rows
                   if (r["model"], r["context"], r["selection"]) == (model, context, name)]
            ax.plot([f"1/{s}" for s, _ in pts], [t for _, t in pts], marker="o", label=name)
        ax.set_title(f"{model}, {context} tokens", fontsize=9)
        ax.set_xlabel("budget share")
    axes[0][0].set_ylabel("tokens per L3 pass")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # tiny models: threads only add synchronisation
    names = args.selections.split(",")
    shares = [int(s) for s in args.shares.split(",")]
    ours = parse_ours(args.ours)
    rows = []
    if "recall" in args.models:
        model = loading.load(args.recall_model, torch.device("cpu"), "float32").model
        for context in (int(c) for c in args.contexts.split(",")):
            rows += measure(model, recall_prompts(context, args.prompts), shares, args, names, ours, "recall-320K")
    if "stories" in args.models:
        model = loading.load(str(trained.TARGET), torch.device("cpu"), "float32").model
        rows += measure(model, story_prompts(model, args.prompts), shares, replace_chunk(args, 4), names, ours,
                        "stories260K")
    result = {"benchmark": "retrieval", "machine": machine_info(torch.device("cpu")), "settings": vars(args),
              "rows": rows}
    path = write_json(args.out, "retrieval", result, args.tag)
    text = table(rows, names)
    print(text)
    if plot(rows, names, path.with_suffix(".png")):
        print(f"plot: {path.with_suffix('.png')}", file=sys.stderr)
    return 0


def replace_chunk(args: argparse.Namespace, chunk: int) -> argparse.Namespace:
    """stories260K's 448-token stories: chunks of 4 so that small shares still hold two chunks."""
    return argparse.Namespace(**{**vars(args), "chunk_size": chunk})


if __name__ == "__main__":
    raise SystemExit(main())
