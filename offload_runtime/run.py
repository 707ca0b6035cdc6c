"""The command line: `python -m offload_runtime.run` (see README for the flags).

A user error prints one line `error: ...` on stderr and exits 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage + two lines)
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m offload_runtime.run",
        description="Lossless long-context generation with a host-resident KV cache and TriForce "
        "hierarchical speculative decoding. Without --model: a demo on a small synthetic model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", help="target checkpoint: a local directory or a Hugging Face hub id (omit for the synthetic demo)")
    g.add_argument("--draft", help="small draft model sharing the target's vocabulary (omit: two-level hierarchy)")
    g = p.add_argument_group("input")
    g.add_argument("--prompt", help="the prompt text")
    g.add_argument("--prompt-file", help="read the prompt from this file")
    g.add_argument("--context-file", help="a long document placed before the prompt")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (exact argmax)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    g = p.add_argument_group("engine")
    g.add_argument("--mode", choices=["triforce", "autoregressive"], default="triforce",
                   help="triforce: speculative engine; autoregressive: baseline over the same cache")
    g.add_argument("--budget", type=int, default=4096, help="retrieval-cache budget in tokens (L2)")
    g.add_argument("--chunk-size", type=int, default=8, help="tokens per retrieval chunk")
    g.add_argument("--gamma", type=int, default=6, help="L2 tokens verified per L3 pass")
    g.add_argument("--draft-gamma", type=int, default=4, help="L1 draft tokens per L2 check")
    g.add_argument("--sinks", type=int, default=16, help="attention-sink tokens kept by the draft's StreamingLLM cache")
    g.add_argument("--window", type=int, default=256, help="total size of the draft's StreamingLLM cache")
    g = p.add_argument_group("memory and device")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: the checkpoint's dtype on CUDA, float32 on CPU")
    g.add_argument("--on-chip-layers", default=None, help="N|auto: layers whose full cache stays on the GPU")
    g = p.add_argument_group("output")
    g.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
    g.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, prompt_tokens, stats")
    return p


def read_text(path: str, what: str) -> str:
    f = Path(path)
    if not f.is_file():
        raise UserError(f"{what} {path} does not exist")
    data = f.read_bytes()
    if b"\x00" in data:
        raise UserError(f"{what} {path} is binary, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text")
    if not text.strip():
        raise UserError(f"{what} {path} is empty")
    return text


def prompt_text(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    prompt = read_text(args.prompt_file, "prompt file") if args.prompt_file else args.prompt
    if prompt is None:
        raise UserError("--prompt or --prompt-file is required with --model")
    if args.context_file:
        prompt = read_text(args.context_file, "context file") + "\n\n" + prompt
    return prompt


def validate(args: argparse.Namespace) -> None:
    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    from .sampling import SamplingParams

    SamplingParams(args.temperature, args.top_p)  # raises on bad values
    for flag in ("chunk_size", "gamma", "draft_gamma", "budget"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.budget < 2 * args.chunk_size:
        raise UserError(f"--budget {args.budget} must hold at least 2 chunks of --chunk-size {args.chunk_size}")
    if args.sinks < 0 or args.window <= args.sinks:
        raise UserError(f"--window {args.window} must be larger than --sinks {args.sinks} (>= 0)")
    if args.on_chip_layers is not None:
        raise UserError("--on-chip-layers needs the host-resident cache, which is not built yet")
    if args.chat:
        raise UserError("--chat is not built yet")


def pick_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return torch.device(name)


def generate_once(args: argparse.Namespace) -> dict:
    return run_job(prepare_job(args, pick_device(args.device)), stream=not args.json)


@dataclass
class Job:
    """Everything a generation needs, checked before any rank starts generating."""
    args: argparse.Namespace
    device: Any
    target: Any  # loading.LoadedModel
    draft: Any  # loading.LoadedModel | None
    prompt_ids: list[int]


def prepare_job(args: argparse.Namespace, device: Any, shard: bool = False) -> Job:
    """Load the models and tokenize; every user error a generation can raise is raised here.
    With `shard` the target is split over the running process group (tensor parallelism)."""
    from . import loading
    from .generate import check_request

    transform = None
    if shard:
        from . import tp

        transform = tp.shard
    target = loading.load(args.model, device, args.dtype, transform=transform)
    prompt_ids = target.tokenizer(prompt_text(args))["input_ids"]
    check_request(target.model, len(prompt_ids), args.max_new_tokens)
    draft = None
    if args.mode == "triforce":
        engine_settings(args)  # raises on bad engine settings
        draft = loading.load(args.draft, device, args.dtype) if args.draft else None
        if draft is not None:
            from .engine import check_same_vocabulary

            check_same_vocabulary(target, draft)
    return Job(args, device, target, draft, prompt_ids)


def engine_settings(args: argparse.Namespace) -> Any:
    from .engine import EngineSettings

    return EngineSettings(budget=args.budget, chunk_size=args.chunk_size, gamma=args.gamma,
                          draft_gamma=args.draft_gamma, sinks=args.sinks, window=args.window)


def run_job(job: Job, stream: bool) -> dict:
    import torch

    from .generate import generate_autoregressive
    from .sampling import SamplingParams

    args, target = job.args, job.target
    params = SamplingParams(args.temperature, args.top_p)
    generator = torch.Generator(device=job.device).manual_seed(args.seed)
    streamer = _Streamer(target.tokenizer) if stream else None
    if args.mode == "autoregressive":
        result = generate_autoregressive(target.model, job.prompt_ids, args.max_new_tokens, params,
                                         target.eos_ids, generator, on_tokens=streamer)
    else:
        from .engine import generate_triforce

        result = generate_triforce(target.model, job.draft.model if job.draft else None, job.prompt_ids,
                                   args.max_new_tokens, params, target.eos_ids, engine_settings(args), generator,
                                   on_tokens=streamer)
    if streamer:
        streamer.finish()
    text = target.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    return {"text": text, "token_ids": result.token_ids, "prompt_tokens": len(job.prompt_ids), "stats": result.stats}


class _Streamer:
    """Prints decoded text as tokens are accepted (decoding the whole answer so merges come out right)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def __call__(self, tokens: list[int]) -> None:
        self.ids.extend(tokens)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return
        sys.stdout.write(text[self.printed:])
        sys.stdout.flush()
        self.printed = len(text)

    def finish(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()


def summary_line(stats: dict) -> str:
    parts = [f"{stats.get('mode')}", f"prompt {stats.get('prompt_tokens')} tok",
             f"prefill {stats.get('prefill_s', 0):.2f}s", f"{stats.get('new_tokens')} new tok"]
    if stats.get("decode_tokens_per_s"):
        parts.append(f"{stats['decode_tokens_per_s']:.2f} tok/s")
    if stats.get("mean_accepted_per_pass") is not None:
        parts.append(f"{stats['mean_accepted_per_pass']:.2f} tok/L3 pass")
    return "[" + ", ".join(parts) + "]"


def main(argv: Sequence[str] | None = None) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun with several ranks
        return main_parallel(argv)
    try:
        args = build_parser().parse_args(argv)
        validate(args)
        import transformers

        transformers.logging.set_verbosity_error()
        if args.model is None:
            from .demo import run_demo

            return run_demo(args)
        out = generate_once(args)
        print_result(out, args)
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def print_result(out: dict, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(out))
    else:
        print(summary_line(out["stats"]), file=sys.stderr)


def main_parallel(argv: Sequence[str] | None = None) -> int:
    """One rank of `torchrun --nproc_per_node=N -m offload_runtime.run`: the target is sharded over the
    ranks, every rank runs the same generation, only rank 0 prints. A user error found on any rank
    during set-up ends every rank with exit 2 and one `error:` line, printed by rank 0."""
    from . import tp

    rank0 = tp.env_rank() == 0
    try:
        code = _run_rank(argv, rank0)
    except KeyboardInterrupt:
        tp.shutdown(wait=False)
        if rank0:
            print("interrupted", file=sys.stderr)
        return 130
    except BaseException:
        tp.shutdown(wait=False)  # the other ranks may be inside a collective: torchrun ends them
        raise
    tp.shutdown()
    return code


def _run_rank(argv: Sequence[str] | None, rank0: bool) -> int:
    from . import tp

    try:
        args = build_parser().parse_args(argv)
        validate(args)
        if args.model is None:
            raise UserError("tensor parallelism needs --model (the synthetic demo runs in one process)")
        import transformers

        transformers.logging.set_verbosity_error()
        device = tp.init_from_env(parallel_device(args.device))
        try:
            job, error = prepare_job(args, device, shard=True), None
        except UserError as exc:
            job, error = None, str(exc)
        error = tp.first_error(error)  # every rank learns of an error on any rank
        if error is not None:
            raise UserError(error)
        out = run_job(job, stream=rank0 and not args.json)
        if rank0:
            print_result(out, args)
        return 0
    except UserError as exc:
        if rank0:
            print(f"error: {exc}", file=sys.stderr)
        return 2


def parallel_device(name: str) -> Any:
    """The device kind for tensor parallelism; CUDA needs one GPU per local rank (checked the same on every rank)."""
    device = pick_device(name)
    if device.type == "cuda":
        import torch

        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        if torch.cuda.device_count() < local_ranks:
            raise UserError(f"{local_ranks} ranks on this machine need {local_ranks} GPUs, "
                            f"{torch.cuda.device_count()} visible (or pass --device cpu)")
    return device


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
