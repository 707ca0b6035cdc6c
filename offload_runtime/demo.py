"""The self-contained demo (`python -m offload_runtime.run` with no --model).

Runs the trained model pair shipped in offload_runtime/assets/ (stories260K, a 260K-parameter
Llama trained on TinyStories, and its weak distilled draft) on a ~400-token story: the story
is continued in every mode (autoregressive, TriForce with 2 and 3 levels, and with the full
cache in host memory, streamed layer by layer; over an EMULATED link with --emulate-link),
the tokens are compared, and the acceptance the hierarchy reaches at a retrieval budget of
about 1/8 of the prompt is reported: what makes TriForce pay off, measured on a trained model.
Timing at realistic sizes lives in the benchmark (`python -m bench`), on synthetic shapes.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import torch

from . import trained
from .generate import generate_autoregressive, generate_triforce
from .launch import load_model, offloaded_cache
from .run_config import Memory, RunConfig
from .settings import EngineSettings
from .validation import check_emulated_link, check_link_time

BUDGET_SHARE = 8  # the retrieval budget is about 1/8 of the prompt


def demo_settings(engine: EngineSettings, n_prompt: int) -> EngineSettings:
    """The CLI's engine flags, with the budget capped at ~1/8 of the prompt (whole chunks), a short
    draft window, and no re-retrieval or pipelining."""
    share = n_prompt // BUDGET_SHARE // engine.chunk_size * engine.chunk_size
    budget = max(2 * engine.chunk_size, min(engine.budget, share))
    return EngineSettings(budget=budget, chunk_size=engine.chunk_size, gamma=engine.gamma,
                          draft_gamma=engine.draft_gamma, sinks=engine.sinks, window=min(engine.window, 64 + engine.sinks))


def demo_device(memory: Memory) -> torch.device:
    """The demo runs anywhere: CUDA when asked for (or auto) and present, else the CPU; the CPU with
    --emulate-link unless --device cuda (whose refusal check_emulated_link then gives)."""
    cuda = memory.device in ("auto", "cuda") and torch.cuda.is_available()
    if memory.emulate_link is not None and memory.device != "cuda":
        cuda = False
    return torch.device("cuda" if cuda else "cpu")


def demo_on_chip_layers(memory: Memory) -> int:
    """The offloaded mode's on-chip layers: none over the emulated link with --emulate-link, else one."""
    default = 0 if memory.emulate_link is not None else 1
    return default if memory.on_chip_layers is None else memory.on_chip_layers


def check_demo_link(memory: Memory, model: torch.nn.Module, device: torch.device, capacity: int) -> None:
    """--emulate-link's refusals (and its warning for a slow pass) before any mode runs."""
    from .caches.offloaded import OffloadedCache

    check_emulated_link(memory, device)
    on_chip = min(demo_on_chip_layers(memory), model.cfg.num_layers)
    check_link_time(memory.emulate_link, OffloadedCache.planned_bytes(model.cfg, model.dtype, capacity, on_chip)[2])


def run_modes(config: RunConfig, target, draft, ids: list[int], n_new: int, settings: EngineSettings,
              device: torch.device) -> list[tuple[str, object]]:
    """Every mode from the same seed: (name, GenerationResult); the last one with the full cache in host
    memory (all layers but one, or all over the emulated link)."""
    params, memory = config.generation.sampling(), config.memory
    capacity = len(ids) + n_new + settings.max_gamma + 1

    def offloaded() -> Any:  # (the link was checked by check_demo_link before the runs)
        return offloaded_cache(target.model.cfg, device, target.model.dtype, capacity, demo_on_chip_layers(memory),
                               memory.emulate_link)

    modes = [
        ("autoregressive", lambda g: generate_autoregressive(target.model, ids, n_new, params, [], g)),
        ("triforce, 2 levels", lambda g: generate_triforce(target.model, None, ids, n_new, params, [], settings, g)),
        ("triforce, 3 levels", lambda g: generate_triforce(target.model, draft.model, ids, n_new, params, [],
                                                           settings, g)),
        ("triforce, offloaded", lambda g: generate_triforce(target.model, draft.model, ids, n_new, params, [],
                                                            settings, g, cache=offloaded())),
    ]
    return [(name, fn(torch.Generator(device=device).manual_seed(config.generation.seed))) for name, fn in modes]


def run_demo(config: RunConfig) -> int:
    """The demo: every mode on the shipped story, the tokens compared, a table (or --json)."""
    memory = config.memory
    device = demo_device(memory)
    target = load_model(str(trained.TARGET), device, memory.dtype, compile=memory.compile)
    draft = load_model(str(trained.DRAFT), device, memory.dtype, with_tokenizer=False)
    story = config.inputs.prompt if config.inputs.prompt is not None else trained.story_prompt()
    ids = target.tokenizer(story)["input_ids"]
    settings = demo_settings(config.engine, len(ids))
    room = target.model.cfg.max_position_embeddings - len(ids) - settings.max_gamma - 1
    if room <= 0:
        from .errors import UserError

        raise UserError(f"the demo story of {len(ids)} tokens leaves no room in the model's "
                        f"{target.model.cfg.max_position_embeddings}-token context")
    n_new = min(config.generation.max_new_tokens, room)
    check_demo_link(memory, target.model, device, len(ids) + n_new + settings.max_gamma + 1)
    with trained.one_thread():
        runs = run_modes(config, target, draft, ids, n_new, settings, device)
    base = runs[0][1].token_ids
    rows = [{"mode": name, "decode_tokens_per_s": r.stats["decode_tokens_per_s"],
             "mean_accepted_per_pass": r.stats.get("mean_accepted_per_pass"),
             "l3_acceptance_of_l2": r.stats.get("l3_acceptance_of_l2"),
             "l2_acceptance_of_l1": r.stats.get("l2_acceptance_of_l1"),
             "offload_backend": r.stats.get("offload_backend"), "link_gbps": r.stats.get("link_gbps"),
             "identical_to_autoregressive": r.token_ids == base} for name, r in runs]
    text = target.tokenizer.decode(base, skip_special_tokens=True)
    head = {"model": trained.TARGET.name, "draft": trained.DRAFT.name, "prompt_tokens": len(ids),
            "new_tokens": n_new, "budget": settings.budget,
            "gamma": settings.gamma or "auto", "max_gamma": settings.max_gamma}
    print(f"offload_runtime demo: the trained {head['model']} (260K parameters, TinyStories) continues a "
          f"{head['prompt_tokens']}-token story; draft {head['draft']}.\n"
          "Run your own model with: python -m offload_runtime.run --model PATH_OR_HUB_ID [--draft SMALL_MODEL] "
          "--prompt '...'", file=sys.stderr)
    if config.output.json:
        print(json.dumps(head | {"synthetic": False, "runs": rows, "text": text}))
        return 0
    print_demo(head, story, text, rows, config.generation.temperature)
    return 0


def print_demo(head: dict, story: str, text: str, rows: list[dict], temperature: float) -> None:
    tail = story[-300:].split(" ", 1)[-1]
    print(f"...{tail}\033[1m{text}\033[0m" if sys.stdout.isatty() else f"...{tail}[continued:]{text}")
    print(f"\n{head['new_tokens']} new tokens, temperature {temperature}, retrieval budget {head['budget']} "
          f"tokens (1/{head['prompt_tokens'] / head['budget']:.0f} of the context), gamma {head['gamma']}")
    print(f"{'mode':<22}{'tokens/s':>10}{'tokens/L3 pass':>16}{'L3 accepts L2':>15}{'identical tokens':>18}")
    for row in rows:
        acc, l3 = row["mean_accepted_per_pass"], row["l3_acceptance_of_l2"]
        same = "yes" if row["identical_to_autoregressive"] else "no"
        if temperature > 0 and row["mode"] != "autoregressive":
            same += " (sampling: same law, not same draw)"
        link = f" [EMULATED link {row['link_gbps']:g} GB/s]" if row["offload_backend"] == "emulated" else ""
        print(f"{row['mode']:<22}{row['decode_tokens_per_s']:>10.1f}{'-' if acc is None else f'{acc:.2f}':>16}"
              f"{'-' if l3 is None else f'{l3:.0%}':>15}{same:>18}{link}")
    print(f"At most gamma + 1 = {head['max_gamma'] + 1} tokens per L3 pass. Speed on this tiny model says little "
          "(see `python -m bench` for timing at size, and `--emulate-link` for a GPU's link).")
