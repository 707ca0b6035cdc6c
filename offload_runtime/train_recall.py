"""Train `recall-320K`, the long-range recall model shipped in assets/: `python -m offload_runtime.train_recall`.

A 2-layer Llama (transformers' own class, saved with save_pretrained) trained on the recall
task (recall_task.py) on one CPU thread in about 13 minutes, deterministically (fixed seeds, one
data order, one thread: the same torch version gives the same weights). Then its card: greedy
accuracy on held-out recalls of records planted more than 2K tokens back, at several context
lengths, with the full cache.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from . import recall_task as task
from .errors import OneLineParser, UserError, error_line

DEFAULT_OUT = Path(__file__).resolve().parent / "assets" / "recall-320K"
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=1e6)  # a slow rotation: a 16K-token match still lines up
INIT_STD = 0.1  # transformers' default 0.02 left the copy task on its plateau for thousands of steps


def build_model(seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(task.VOCAB), max_position_embeddings=task.MAX_CONTEXT, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, bos_token_id=task.BOS, eos_token_id=task.EOS,
                      initializer_range=INIT_STD, **SHAPE)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def batch(rng: random.Random, size: int, length: int, stage: int, reach: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: records with a nearby recall (contiguous positions); stage 2: the recall task with PoSE
    jumps reaching `reach` positions."""
    if stage == 1:
        tokens = torch.tensor([task.induction_sample(rng, length) for _ in range(size)])
        return tokens, torch.arange(length).expand(size, -1)
    samples = [task.training_sample(rng, length, max_context=reach) for _ in range(size)]
    return torch.tensor([s[0] for s in samples]), torch.tensor([s[1] for s in samples])


def train(model: Any, stages: list[tuple[int, int, int]], lr: float, seed: int, log_every: int = 100) -> list[dict]:
    """AdamW, no weight decay, constant rate after a warm-up, then a cosine decay over the last stage;
    the loss over every token (the copy accuracy logged is over both kinds of batch in stage 2). stages: (steps, batch size, sample length). Returns the loss log."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    steps = sum(s[0] for s in stages)
    last = steps - stages[-1][0]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (
        1.0 if s < last else 0.5 * (1 + math.cos(math.pi * (s - last) / stages[-1][0]))))
    log, t0, total, copied, copyable, step = [], time.perf_counter(), 0.0, 0, 0, 0
    model.train()
    for stage, (n, size, length) in enumerate(stages, 1):
        for i in range(n):
            step += 1
            if stage == 2 and i % 2:  # every other step a stage-1 batch keeps the circuit from being unlearnt
                tokens, positions = batch(rng, *stages[0][1:], 1, 0)
            else:  # the distances stage 2 spans grow to the whole context over its first half
                reach = length + int((task.MAX_CONTEXT - length) * min(1.0, 2 * i / n))
                tokens, positions = batch(rng, size, length, stage, reach)
            out = model(input_ids=tokens, position_ids=positions, labels=tokens)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sched.step()
            total += out.loss.item()
            with torch.no_grad():
                mask = torch.tensor([task.copy_mask(row) for row in tokens.tolist()])[:, 1:]
                hits = (out.logits[:, :-1].argmax(-1) == tokens[:, 1:])[mask]
                copied += hits.sum().item()
                copyable += hits.numel()
            if step % log_every == 0 or step == steps:
                acc, k = copied / max(1, copyable), log_every if step % log_every == 0 else step % log_every
                log.append({"step": step, "stage": stage, "loss": round(total / k, 4), "copy_accuracy": round(acc, 4),
                            "seconds": round(time.perf_counter() - t0, 1)})
                print(f"stage {stage} step {step}/{steps}  loss {total / k:.3f}  copy accuracy {acc:.3f}  "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
                total, copied, copyable = 0.0, 0, 0
    model.eval()
    return log


def stretch(model: Any, stages: list[tuple[int, int, int]], lr: float, seed: int, log_every: int = 50) -> list[dict]:
    """Stage 3: long samples (stages: (steps, batch, length)) with hundreds of filler words between
    records, at a lower rate: thousands of keys per query make the recall's attention sharp enough
    for a whole document (after stage 2 alone: 0.60 at 4K, 0.09 at 16K held out)."""
    rng = random.Random(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    log, t0, step = [], time.perf_counter(), 0
    model.train()
    for n, size, length in stages:
        for _ in range(n):
            step += 1
            samples = [task.training_sample(rng, length, jumps=2, gap=(50, 400)) for _ in range(size)]
            tokens, positions = torch.tensor([a for a, _ in samples]), torch.tensor([b for _, b in samples])
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, step / 20)
            loss = model(input_ids=tokens, position_ids=positions, labels=tokens).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % log_every == 0:
                log.append({"step": step, "stage": 3, "length": length, "loss": round(loss.item(), 4),
                            "seconds": round(time.perf_counter() - t0, 1)})
                print(f"stage 3 step {step}  length {length}  loss {loss.item():.3f}  "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
    model.eval()
    return log


@torch.no_grad()
def recall_accuracy(model: Any, context: int, n_prompts: int, seed: int, min_distance: int = 2048) -> float:
    """Greedy accuracy (teacher-forced argmax, which equals free greedy decoding while every token
    is right) on the symbols of held-out recalls of records planted >= min_distance tokens back."""
    rng, right, total = random.Random(seed), 0, 0
    for _ in range(n_prompts):
        doc = task.document(rng, context)
        prompt, expected = task.recall_prompt(doc, rng, min_distance)
        ids = torch.tensor([prompt + expected[:-1]])
        logits = model(input_ids=ids, logits_to_keep=len(expected)).logits[0]
        got = logits.argmax(-1).tolist()
        right += sum(g == e for g, e in zip(got, expected))
        total += len(expected)
    return right / total


def save(model: Any, out: Path, info: dict) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    task.tokenizer().save_pretrained(out)
    GenerationConfig(bos_token_id=task.BOS, eos_token_id=task.EOS).save_pretrained(out)
    (out / "train_info.json").write_text(json.dumps(info, indent=1) + "\n")


def stage_list(text: str) -> list[tuple[int, int, int]]:
    """`STEPSxBATCHxLENGTH,...` (--stage3), checked before any training starts."""
    try:
        stages = [tuple(int(x) for x in item.split("x")) for item in text.split(",") if item]
    except ValueError:
        stages = []
    if not stages or any(len(s) != 3 or min(s) <= 0 for s in stages):
        raise argparse.ArgumentTypeError(f"expected STEPSxBATCHxLENGTH[,...] of positive numbers, got {text!r}")
    return stages


def check_args(args: argparse.Namespace) -> None:
    """Every mistake refused before minutes of training, not after them."""
    if min(args.stage1_steps, args.stage2_steps) < 0 or args.eval_prompts < 1:
        raise UserError("--stage1-steps and --stage2-steps must be >= 0, --eval-prompts >= 1")
    if not (args.lr > 0 and args.stage3_lr > 0):
        raise UserError("--lr and --stage3-lr must be positive")
    if args.resume is not None and not (args.resume / "config.json").is_file():
        raise UserError(f"--resume {args.resume}: no checkpoint there (config.json missing)")
    for flag, folder in (("--out", args.out), ("--stage2-out", args.stage2_out)):
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{flag} {folder}: {e.strerror or e}") from None
        if not os.access(folder, os.W_OK):
            raise UserError(f"{flag} {folder}: not writable")


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m offload_runtime.train_recall", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint folder to write")
    p.add_argument("--stage1-steps", type=int, default=2000, help="steps of nearby recalls (64 x 66 tokens)")
    p.add_argument("--stage2-steps", type=int, default=3000,
                   help="steps of the recall task with PoSE (16 x 256 tokens), every other one a stage-1 batch")
    p.add_argument("--stage3", type=stage_list, default="300x4x2048,300x2x4096",
                   help="stage 3 as STEPSxBATCHxLENGTH,...")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--stage3-lr", type=float, default=1e-3)
    p.add_argument("--resume", type=Path, default=None,
                   help="a checkpoint this script wrote after stages 1 and 2 (--stage2-out): run stage 3 only")
    p.add_argument("--stage2-out", type=Path, default=None, help="also write the checkpoint after stages 1 and 2 here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-prompts", type=int, default=20, help="held-out recalls per context length")
    try:
        args = p.parse_args(argv)
        check_args(args)
    except UserError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # one data order and one summation order: the same weights every run
    stage3 = args.stage3
    t0, log = time.perf_counter(), []
    if args.resume is None:
        model = build_model(args.seed)
        stages = [(args.stage1_steps, 64, 66), (args.stage2_steps, 16, 256)]
        print(f"recall model: {sum(p.numel() for p in model.parameters())} parameters; stages 1-2 "
              f"(steps, batch, length): {stages}")
        log = train(model, stages, args.lr, args.seed)
        if args.stage2_out:
            model.save_pretrained(args.stage2_out)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.resume, dtype=torch.float32)
    log += stretch(model, stage3, args.stage3_lr, args.seed)
    seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    accuracy = {}
    for context in (2048 + 512, 4096, 8192, 16384):
        accuracy[context] = round(recall_accuracy(model, context, args.eval_prompts, seed=10_000 + context), 4)
        print(f"held-out recall accuracy at {context} tokens (records > 2K back): {accuracy[context]:.3f}", flush=True)
    info = {"parameters": n_params, "train_seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}, "shape": SHAPE,
            "held_out_accuracy_min_distance_2048": accuracy, "loss_log": log}
    save(model, args.out, info)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
