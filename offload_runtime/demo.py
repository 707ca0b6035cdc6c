"""The self-contained demo (`python -m offload_runtime.run` with no --model).

Builds a small random target and draft in a temporary directory, loads them through the
real loading path, runs both engine modes on a synthetic long prompt and prints a table.
Random weights make acceptance rates meaningless: the demo shows the machinery and the
losslessness (identical tokens), not the speed-up a trained model pair gives.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile

import torch

from . import loading, synthetic
from .caches.offloaded import OffloadedCache
from .generate import generate_autoregressive, generate_triforce
from .settings import EngineSettings
from .sampling import SamplingParams

DEMO_PROMPT_WORDS = 1200


def run_demo(args: argparse.Namespace) -> int:
    print("offload_runtime demo: SYNTHETIC random-weight models built in memory, not a real LLM.\n"
          "Run a real model with: python -m offload_runtime.run --model PATH_OR_HUB_ID [--draft SMALL_MODEL] "
          "--prompt '...'", file=sys.stderr)
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="offload_demo_") as tmp:
        tok = synthetic.train_tokenizer()
        synthetic.make_checkpoint(f"{tmp}/target", "llama", tokenizer=tok, hidden_size=256, intermediate_size=512,
                                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
        synthetic.make_checkpoint(f"{tmp}/draft", "llama", tokenizer=tok, seed=1, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        target = loading.load(f"{tmp}/target", device, args.dtype)
        draft = loading.load(f"{tmp}/draft", device, args.dtype)
    prompt = synthetic.synthetic_text(DEMO_PROMPT_WORDS, seed=args.seed) + "\n\nSummarise the text above."
    ids = target.tokenizer(prompt)["input_ids"]
    params = SamplingParams(args.temperature, args.top_p)
    settings = EngineSettings(budget=max(min(args.budget, 256), 2 * args.chunk_size), chunk_size=args.chunk_size, gamma=args.gamma,
                              draft_gamma=args.draft_gamma, sinks=args.sinks, window=args.window)
    n_new = min(args.max_new_tokens, 64)
    runs = []
    # the full cache of 3 of the 4 target layers in host memory, streamed layer by layer
    offloaded = OffloadedCache(target.model.cfg, device, target.model.dtype, len(ids) + n_new + settings.gamma + 1,
                               on_chip_layers=1)
    for name, fn in [
        ("autoregressive", lambda g: generate_autoregressive(target.model, ids, n_new, params, [], g)),
        ("triforce, 2 levels", lambda g: generate_triforce(target.model, None, ids, n_new, params, [], settings, g)),
        ("triforce, 3 levels", lambda g: generate_triforce(target.model, draft.model, ids, n_new, params, [], settings, g)),
        ("triforce, offloaded", lambda g: generate_triforce(target.model, draft.model, ids, n_new, params, [], settings, g,
                                                            cache=offloaded)),
    ]:
        runs.append((name, fn(torch.Generator(device=device).manual_seed(args.seed))))
    base = runs[0][1].token_ids
    rows = [{"mode": name, "decode_tokens_per_s": r.stats["decode_tokens_per_s"],
             "mean_accepted_per_pass": r.stats.get("mean_accepted_per_pass"),
             "identical_to_autoregressive": r.token_ids == base} for name, r in runs]
    if args.json:
        print(json.dumps({"synthetic": True, "prompt_tokens": len(ids), "new_tokens": n_new, "runs": rows,
                          "text": target.tokenizer.decode(base, skip_special_tokens=True)}))
        return 0
    print(f"prompt: {len(ids)} tokens, {n_new} new tokens, temperature {args.temperature}, budget {settings.budget}, "
          f"device {device}")
    print(f"{'mode':<22}{'tokens/s':>10}{'accepted/L3 pass':>18}{'identical tokens':>18}")
    for row in rows:
        acc = row["mean_accepted_per_pass"]
        same = "yes" if row["identical_to_autoregressive"] else "no"
        if params.temperature > 0 and row["mode"] != "autoregressive":
            same += " (sampling: same law, not same draw)"
        print(f"{row['mode']:<22}{row['decode_tokens_per_s']:>10.1f}{'-' if acc is None else f'{acc:.2f}':>18}{same:>18}")
    print("Random weights: acceptance (and so speed-up) is far below what a trained model pair gives.")
    return 0
