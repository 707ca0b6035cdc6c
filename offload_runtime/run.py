"""The command line: `python -m offload_runtime.run` (see README for the flags).

A user error prints one line `error: ...` on stderr and exits 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage + two lines)
        raise UserError(message)


def build_parser(prog: str = "python -m offload_runtime.run", description: str | None = None,
                 io_flags: bool = True) -> argparse.ArgumentParser:
    """The flags of `run`; io_flags=False leaves out the input and output groups (the server reuses the rest)."""
    p = _Parser(
        prog=prog,
        description=description or "Lossless long-context generation with a host-resident KV cache and TriForce "
        "hierarchical speculative decoding. Without --model: a demo on a small synthetic model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", help="target checkpoint: a local directory or a Hugging Face hub id (omit for the synthetic demo)")
    g.add_argument("--draft", help="small draft model sharing the target's vocabulary (omit: two-level hierarchy)")
    if io_flags:
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
    g.add_argument("--gamma", type=int, default=6, help="L2 tokens verified per L3 pass (1 to 63)")
    g.add_argument("--draft-gamma", type=int, default=4, help="L1 draft tokens per L2 check")
    g.add_argument("--sinks", type=int, default=16, help="attention-sink tokens kept by the draft's StreamingLLM cache")
    g.add_argument("--window", type=int, default=256, help="total size of the draft's StreamingLLM cache")
    g.add_argument("--refresh-every", type=int, default=0,
                   help="rebuild the retrieval selection every N L3 passes (0: never)")
    g.add_argument("--refresh-below", type=float, default=0.0,
                   help="rebuild it when L3 accepted less than this share of L2's tokens over the last 4 passes (0: never)")
    g = p.add_argument_group("memory and device")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: the checkpoint's dtype on CUDA, float32 on CPU")
    g.add_argument("--on-chip-layers", default="auto",
                   help="N|auto: the first N layers' full cache stays on the GPU, the rest is streamed from host "
                   "memory; auto: as many as the memory plan fits")
    g.add_argument("--offload", choices=["auto", "on", "off"], default="auto",
                   help="host-resident full cache: auto = when the plan needs it (never on CPU), on = always, off = never")
    g.add_argument("--max-context", type=int, default=None,
                   help="tokens the full cache is planned and allocated for (default: prompt + --max-new-tokens + gamma + 1)")
    if io_flags:
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
        raise UserError("--prompt or --prompt-file is required with --model (or use --chat)")
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
    settings = engine_settings(args)  # raises on inconsistent engine flags
    if args.mode == "triforce" and (args.draft or args.model is None):  # the demo always has a draft
        settings.check_draft()
    if args.on_chip_layers != "auto":
        try:
            n = int(args.on_chip_layers)
        except ValueError:
            n = -1
        if n < 0:
            raise UserError(f"--on-chip-layers must be a non-negative integer or auto, got {args.on_chip_layers}")
    if args.max_context is not None and args.max_context <= 0:
        raise UserError(f"--max-context must be positive, got {args.max_context}")


def pick_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return torch.device(name)


def plan_run(args: argparse.Namespace, device: Any, path: Path, hf: Any, n_prompt: int, tp: int = 1) -> tuple[Any, Any]:
    """Plan memory before any weight or cache is allocated: (plan, cache factory or None for FullCache).
    Refuses (UserError) what does not fit, so nothing is left half-allocated."""
    from . import loading
    from .config import ModelConfig
    from .planner import plan_memory, probe_resources

    cfg = ModelConfig.from_hf(hf)
    dtype = loading.pick_dtype(args.dtype, device, path, hf)
    draft_cfg = None
    if args.draft and args.mode == "triforce":
        draft_cfg = ModelConfig.from_hf(loading.load_hf_config(loading.resolve_checkpoint(args.draft)))
    slots = args.gamma + 1 if args.mode == "triforce" else 0
    needed = n_prompt + args.max_new_tokens + slots
    context = args.max_context or needed
    if needed > context:
        raise UserError(f"context of {needed} tokens (prompt {n_prompt} + {args.max_new_tokens} new"
                        f"{f' + {slots} verification slots' if slots else ''}) is longer than --max-context {context}")
    on_chip = None if args.on_chip_layers == "auto" else int(args.on_chip_layers)
    plan = plan_memory(cfg, dtype, context, probe_resources(device), new_tokens=args.max_new_tokens + slots,
                       budget=args.budget, draft_cfg=draft_cfg, draft_window=args.window, tp=tp,
                       on_chip_layers=on_chip, offload=args.offload)
    if not (plan.offload or args.offload == "on" or on_chip is not None):
        return plan, None

    def factory(model: Any) -> Any:
        from .caches.offloaded import OffloadedCache

        return lambda capacity: OffloadedCache(model.cfg, device, model.dtype, max(capacity, plan.context),
                                               plan.on_chip_layers)

    return plan, factory


CHAT_HEADROOM = 16384  # tokens planned for a chat's turns beyond the document (raise with --max-context)


@dataclass
class Job:
    """What is known before any weight is loaded: the device, the request's tokens and the memory plan."""
    device: Any
    prompt_ids: list[int] | None
    plan: Any
    cache_factory: Any  # model -> (capacity -> cache), or None for the growing on-device FullCache


def prepare(args: argparse.Namespace, prompt: str | None, document: str | None, device: Any, tp: int = 1) -> Job:
    """Config, tokenizer and memory plan first: refuse before any weight or cache is allocated."""
    from . import loading
    from .config import ModelConfig
    from .generate import check_request

    path = loading.resolve_checkpoint(args.model)
    hf = loading.load_hf_config(path)
    cfg = ModelConfig.from_hf(hf)
    tokenizer = loading.load_tokenizer(path)
    prompt_ids = None
    if prompt is not None:
        prompt_ids = tokenizer(prompt)["input_ids"]
        check_request(SimpleNamespace(cfg=cfg), len(prompt_ids), args.max_new_tokens)
        planned = len(prompt_ids)
    else:  # a chat: the document plus room for the conversation, within the model's context
        n_doc = len(tokenizer(document)["input_ids"]) if document else 0
        limit = min(cfg.max_position_embeddings, args.max_context or cfg.max_position_embeddings)
        room = limit - args.max_new_tokens - args.gamma - 1
        planned = max(n_doc, min(room, n_doc + CHAT_HEADROOM))
    plan, factory = plan_run(args, device, path, hf, planned, tp)
    return Job(device, prompt_ids, plan, factory)


def load_models(args: argparse.Namespace, device: Any, transform: Any = None) -> tuple[Any, Any]:
    """The target (with tokenizer; `transform`: e.g. tensor-parallel sharding) and the optional draft,
    checked for a shared vocabulary."""
    from . import loading
    from .engine import check_same_vocabulary

    target = loading.load(args.model, device, args.dtype, transform=transform)
    draft = None
    if args.draft and args.mode == "triforce":
        draft = loading.load(args.draft, device, args.dtype)
        check_same_vocabulary(target, draft)
    return target, draft


def engine_settings(args: argparse.Namespace) -> Any:
    from .engine import EngineSettings

    return EngineSettings(budget=args.budget, chunk_size=args.chunk_size, gamma=args.gamma,
                          draft_gamma=args.draft_gamma, sinks=args.sinks, window=args.window,
                          refresh_every=args.refresh_every, refresh_below=args.refresh_below)


def offload_kwargs(job: Job, target: Any) -> dict:
    """The cache arguments of the engine for this plan (empty: the default on-device cache)."""
    if job.cache_factory is None:
        return {}
    from .cuda_streams import link_bandwidth

    return dict(full_cache=job.cache_factory(target.model), link_gbps=link_bandwidth(job.device))


def generate_once(args: argparse.Namespace, job: Job, target: Any, draft: Any, stream: bool = True) -> dict:
    import torch

    from .console import TextStreamer
    from .engine import generate_triforce
    from .generate import generate_autoregressive
    from .sampling import SamplingParams

    params = SamplingParams(args.temperature, args.top_p)
    prompt_ids = job.prompt_ids
    generator = torch.Generator(device=job.device).manual_seed(args.seed)
    stream = TextStreamer(target.tokenizer) if stream and not args.json else None
    offload = offload_kwargs(job, target)
    if args.mode == "autoregressive":
        result = generate_autoregressive(target.model, prompt_ids, args.max_new_tokens, params,
                                         target.eos_ids, generator, on_tokens=stream, **offload)
    else:
        result = generate_triforce(target.model, draft.model if draft else None, prompt_ids,
                                   args.max_new_tokens, params, target.eos_ids, engine_settings(args), generator,
                                   on_tokens=stream, **offload)
    if stream:
        stream.finish()
    result.stats["memory_plan"] = job.plan.as_dict()
    text = target.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    return {"text": text, "token_ids": result.token_ids, "prompt_tokens": len(prompt_ids), "stats": result.stats}


def first_chat_message(args: argparse.Namespace) -> str | None:
    """--prompt or --prompt-file with --chat: the first user message."""
    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    return read_text(args.prompt_file, "prompt file") if args.prompt_file else args.prompt


def chat(args: argparse.Namespace, job: Job, document: str | None, first: str | None, target: Any,
         draft: Any) -> int:
    import torch

    from .chat import ChatSession, run_chat
    from .console import PrefillProgress
    from .engine import Session
    from .sampling import SamplingParams

    # Ctrl-C must reach us as KeyboardInterrupt even when started with SIGINT ignored (e.g. a background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    generator = torch.Generator(device=job.device).manual_seed(args.seed)
    session = Session(target.model, draft.model if draft else None, SamplingParams(args.temperature, args.top_p),
                      target.eos_ids, engine_settings(args), generator, args.mode, **offload_kwargs(job, target))
    progress = PrefillProgress()
    try:
        conversation = ChatSession(session, target.tokenizer, document, args.max_new_tokens, progress)
    except KeyboardInterrupt:
        print("interrupted while reading the document", file=sys.stderr)
        return 130
    finally:
        progress.close()
    return run_chat(conversation, args.json, first)


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
        # file errors and the memory plan before the slow model load
        prompt = None if args.chat else prompt_text(args)
        document = read_text(args.context_file, "context file") if args.chat and args.context_file else None
        first = first_chat_message(args) if args.chat else None
        job = prepare(args, prompt, document, pick_device(args.device))
        target, draft = load_models(args, job.device)
        if args.chat:
            return chat(args, job, document, first, target, draft)
        print_result(generate_once(args, job, target, draft), args)
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
        from .console import answer_summary

        stats = out["stats"]
        print(answer_summary(stats, [str(stats.get("mode")), f"prompt {stats.get('prompt_tokens')} tok"]),
              file=sys.stderr)


def main_parallel(argv: Sequence[str] | None = None, destroy: bool = True) -> int:
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
    tp.shutdown(destroy=destroy)
    return code


def _run_rank(argv: Sequence[str] | None, rank0: bool) -> int:
    from . import tp

    try:
        args = build_parser().parse_args(argv)
        validate(args)
        if args.model is None:
            raise UserError("tensor parallelism needs --model (the synthetic demo runs in one process)")
        if args.chat:
            raise UserError("--chat runs in one process; under torchrun use single-shot --prompt generation")
        import transformers

        transformers.logging.set_verbosity_error()
        device = tp.init_from_env(parallel_device(args.device))
        try:
            job = prepare(args, prompt_text(args), None, device, tp.current_world_size())
            target, draft = load_models(args, device, transform=tp.shard)
            if job.cache_factory is not None:  # allocate each rank's host cache now: a failure is agreed on
                cache = job.cache_factory(target.model)(job.plan.context)
                job.cache_factory = lambda model, cache=cache: (lambda capacity: cache)
            error = None
        except UserError as exc:
            error = str(exc)
        error = tp.first_error(error)  # every rank learns of an error on any rank
        if error is not None:
            raise UserError(error)
        out = generate_once(args, job, target, draft, stream=rank0)
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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun rank: after the closing barrier, leave at once. Tearing down gloo's threads at
        # interpreter exit aborts now and then ("terminate called without an active exception").
        code = main_parallel(destroy=False)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(main())


if __name__ == "__main__":
    entry()
