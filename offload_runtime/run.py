"""The command line: `python -m offload_runtime.run` (see README for the flags).

A user error prints one line `error: ...` on stderr and exits 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import OneLineParser, UserError, error_line
from .validation import check_emulated_link, check_flags, check_link_time, check_text, read_text


def build_parser(prog: str = "python -m offload_runtime.run", description: str | None = None,
                 io_flags: bool = True) -> argparse.ArgumentParser:
    """The flags of `run`; io_flags=False leaves out the input and output groups (the server reuses the rest)."""
    p = OneLineParser(
        prog=prog,
        description=description or "Lossless long-context generation with a host-resident KV cache and TriForce "
        "hierarchical speculative decoding. Without --model: a demo on the trained stories260K pair shipped with the package.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", help="target checkpoint: a local directory or a Hugging Face hub id (omit for the stories260K demo)")
    g.add_argument("--draft", help="small draft model sharing the target's vocabulary, --mode triforce only (omit: two-level hierarchy)")
    if io_flags:
        g = p.add_argument_group("input")
        g.add_argument("--prompt", help="the prompt text")
        g.add_argument("--prompt-file", help="read the prompt from this file")
        g.add_argument("--context-file", help="a long document placed before the prompt")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (exact argmax)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling (0 to 2**64-1)")
    g = p.add_argument_group("engine")
    g.add_argument("--mode", choices=["triforce", "autoregressive"], default="triforce",
                   help="triforce: speculative engine; autoregressive: baseline over the same cache")
    g.add_argument("--budget", type=int, default=4096, help="retrieval-cache budget in tokens (L2)")
    g.add_argument("--chunk-size", type=int, default=8, help="tokens per retrieval chunk")
    g.add_argument("--gamma", type=auto_or_int, default=None, metavar="auto|N",
                   help="L2 tokens verified per L3 pass: auto (default) chooses each round, falling back to "
                   "autoregressive steps where speculation does not pay; N (1 to 63) fixes it")
    g.add_argument("--draft-gamma", type=auto_or_int, default=None, metavar="auto|N",
                   help="L1 draft tokens per L2 check: auto (default) chooses each round, L1 unused where it "
                   "does not pay; N fixes it")
    g.add_argument("--sinks", type=int, default=16, help="attention-sink tokens kept by the draft's StreamingLLM cache")
    g.add_argument("--window", type=int, default=256, help="total size of the draft's StreamingLLM cache")
    g.add_argument("--refresh-every", type=int, default=0,
                   help="rebuild the retrieval selection every N L3 passes (0: never)")
    g.add_argument("--refresh-below", type=float, default=0.0,
                   help="rebuild it when L3 accepted less than this share of L2's tokens over the last 4 passes (0: never)")
    g.add_argument("--pipeline", choices=["on", "off", "auto"], default="auto",
                   help="draft the next round while the L3 pass streams the cache (lossless); auto: on when "
                   "the full cache is offloaded")
    g = p.add_argument_group("kv store")
    g.add_argument("--kv-store", metavar="DIR", default=None,
                   help="keep the full cache of prompts on disk in DIR and restore a cached prefix instead of "
                   "prefilling it (a document reopened, another question, a restart); off by default")
    g.add_argument("--kv-store-max-gb", type=float, default=50.0, metavar="GB",
                   help="the store's size limit; the least recently used blocks are deleted beyond it")
    add_memory_flags(p)
    if io_flags:
        g = p.add_argument_group("output")
        g.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
        g.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, prompt_tokens, stats")
    return p


def add_memory_flags(p: argparse.ArgumentParser) -> None:
    """The memory and device group: where the weights and the full cache live."""
    g = p.add_argument_group("memory and device")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: the checkpoint's dtype on CUDA, float32 on CPU")
    g.add_argument("--on-chip-layers", default="auto",
                   help="N|auto: the first N layers' full cache stays on the GPU, the rest is streamed from host "
                   "memory; auto: as many as the memory plan fits")
    g.add_argument("--offload", choices=["auto", "on", "off"], default="auto",
                   help="host-resident full cache: auto = when the plan needs it (never on CPU), on = always, off = never")
    g.add_argument("--emulate-link", type=float, default=None, metavar="GBPS",
                   help="CPU only: offload the whole full cache (unless --on-chip-layers) through an EMULATED "
                   "PCIe link of this many GB/s (a copy-engine thread), to measure the consumer-GPU regime")
    g.add_argument("--max-context", type=int, default=None,
                   help="tokens the full cache is planned and allocated for (default: prompt + --max-new-tokens + gamma + 1)")
    g.add_argument("--compile", action="store_true",
                   help="CPU: run one-token decode steps (autoregressive, TriForce's L2) as one torch.compile graph; "
                   "needs a C++ compiler, compiles for ~1 minute at start-up")


def prompt_text(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    prompt = read_text(args.prompt_file, "prompt file") if args.prompt_file else args.prompt
    if prompt is None:
        raise UserError("--prompt or --prompt-file is required with --model (or use --chat)")
    check_text(prompt, "--prompt")
    if args.context_file:
        prompt = read_text(args.context_file, "context file") + "\n\n" + prompt
    return prompt


def auto_or_int(text: str) -> int | None:
    """`auto` (None: the engine's controller chooses) or an integer."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or an integer, got {text!r}") from None


def validate(args: argparse.Namespace) -> None:
    check_flags(args)
    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    from .sampling import SamplingParams

    SamplingParams(args.temperature, args.top_p)  # raises on bad values
    for flag in ("chunk_size", "gamma", "draft_gamma", "budget"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
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
    if not (math.isfinite(args.kv_store_max_gb) and args.kv_store_max_gb > 0):
        raise UserError(f"--kv-store-max-gb must be a positive number, got {args.kv_store_max_gb}")
    if args.kv_store is not None and Path(args.kv_store).exists() and not Path(args.kv_store).is_dir():
        raise UserError(f"--kv-store {args.kv_store} is not a folder")
    if args.kv_store is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--kv-store does not work with tensor parallelism yet (each rank holds part of the cache)")


def pick_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return torch.device(name)


def plan_run(args: argparse.Namespace, device: Any, path: Path, hf: Any, n_prompt: int, tp: int = 1) -> tuple[Any, bool]:
    """Plan memory before any weight or cache is allocated: (plan, whether the L3 cache is host-resident).
    Refuses (UserError) what does not fit, so nothing is left half-allocated."""
    from . import loading
    from .config import ModelConfig
    from .planner import plan_memory, probe_resources

    check_emulated_link(args, device)
    emulated = getattr(args, "emulate_link", None)
    cfg = ModelConfig.from_hf(hf)
    dtype = loading.pick_dtype(args.dtype, device, path, hf)
    draft_cfg = None
    if args.draft and args.mode == "triforce":
        draft_cfg = ModelConfig.from_hf(loading.load_hf_config(loading.resolve_checkpoint(args.draft)))
    slots = engine_settings(args).max_gamma + 1 if args.mode == "triforce" else 0
    needed = n_prompt + args.max_new_tokens + slots
    context = args.max_context or needed
    if needed > context:
        raise UserError(f"context of {needed} tokens (prompt {n_prompt} + {args.max_new_tokens} new"
                        f"{f' + {slots} verification slots' if slots else ''}) is longer than --max-context {context}")
    on_chip = None if args.on_chip_layers == "auto" else int(args.on_chip_layers)
    if emulated is not None and on_chip is None:
        on_chip = 0  # the emulated link carries the whole cache unless --on-chip-layers says otherwise
    plan = plan_memory(cfg, dtype, context, probe_resources(device), new_tokens=args.max_new_tokens + slots,
                       budget=args.budget, draft_cfg=draft_cfg, draft_window=args.window, tp=tp,
                       on_chip_layers=on_chip, offload=args.offload)
    check_link_time(emulated, plan.pinned_host)
    return plan, bool(plan.offload or args.offload == "on" or on_chip is not None or emulated is not None)


CHAT_HEADROOM = 16384  # tokens planned for a chat's turns beyond the document (raise with --max-context)


@dataclass
class Job:
    """What is known before any weight is loaded: the device, the request's tokens and the memory plan;
    then the L3 cache the plan asks for (build_cache; None: the growing on-device FullCache). The plan
    is the one source of truth for where layers live: the cache is built with its on-chip layers."""
    device: Any
    prompt_ids: list[int] | None
    plan: Any
    offload: bool  # the L3 cache is an OffloadedCache of plan.context tokens
    emulate_link: float | None = None  # GB/s of an EMULATED link (CPU): the whole cache crosses it by default
    cache: Any = None

    def build_cache(self, model: Any) -> Any:
        """The planned L3 cache for the loaded model (built once), or None for a growing FullCache."""
        if self.offload and self.cache is None:
            from .caches.offloaded import OffloadedCache
            from .cuda_streams import link_bandwidth, make_backend

            emulated = self.emulate_link
            self.cache = OffloadedCache(model.cfg, self.device, model.dtype, self.plan.context,
                                        self.plan.on_chip_layers, backend=make_backend(self.device, link_gbps=emulated),
                                        link_gbps=emulated or link_bandwidth(self.device))
        return self.cache

    def close(self) -> None:
        """Stop the cache's copy engine (an emulated link's thread) now, in order, before the interpreter
        exits: copies not yet run are dropped (the run is over)."""
        if self.cache is not None:
            self.cache.close()


def prepare(args: argparse.Namespace, prompt: str | None, document: str | None, device: Any, tp: int = 1) -> Job:
    """Config, tokenizer and memory plan first: refuse before any weight or cache is allocated."""
    from . import loading
    from .config import ModelConfig
    from .request import check_request
    from .validation import check_kernels, check_max_context

    check_kernels(device)
    path = loading.resolve_checkpoint(args.model)
    hf = loading.load_hf_config(path)
    cfg = ModelConfig.from_hf(hf)
    check_max_context(args.max_context, cfg.max_position_embeddings)
    loading.weight_files(path)  # a checkpoint without weights says so before its tokenizer is read
    tokenizer = loading.load_tokenizer(path)
    prompt_ids = None
    if prompt is not None:
        prompt_ids = tokenizer(prompt)["input_ids"]
        check_request(len(prompt_ids), args.max_new_tokens, cfg.max_position_embeddings)
        planned = len(prompt_ids)
    else:  # a chat: the document plus room for the conversation, within the model's context
        n_doc = len(tokenizer(document)["input_ids"]) if document else 0
        limit = min(cfg.max_position_embeddings, args.max_context or cfg.max_position_embeddings)
        room = limit - args.max_new_tokens - engine_settings(args).max_gamma - 1
        if room <= 0:
            source = "--max-context" if limit == args.max_context else "the model's context"
            raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a chat turn in {source} "
                            f"of {limit} tokens")
        planned = max(n_doc, min(room, n_doc + CHAT_HEADROOM))
    plan, offload = plan_run(args, device, path, hf, planned, tp)
    return Job(device, prompt_ids, plan, offload, getattr(args, "emulate_link", None))


def load_models(args: argparse.Namespace, device: Any, transform: Any = None) -> tuple[Any, Any]:
    """The target (with tokenizer; `transform`: e.g. tensor-parallel sharding) and the optional draft,
    checked for a shared vocabulary."""
    from . import loading
    from .vocabulary import check_same_vocabulary

    target = loading.load(args.model, device, args.dtype, transform=transform)
    if getattr(args, "compile", False):
        from . import compiled

        compiled.enable(target.model)
    draft = None
    if args.draft and args.mode == "triforce":
        draft = loading.load(args.draft, device, args.dtype)
        check_same_vocabulary(target, draft)
    return target, draft


def engine_settings(args: argparse.Namespace) -> Any:
    from .settings import EngineSettings

    return EngineSettings(budget=args.budget, chunk_size=args.chunk_size, gamma=args.gamma,
                          draft_gamma=args.draft_gamma, sinks=args.sinks, window=args.window,
                          refresh_every=args.refresh_every, refresh_below=args.refresh_below,
                          pipeline=getattr(args, "pipeline", "off"))


def make_session(args: argparse.Namespace, job: Job, target: Any, draft: Any, capacity: int = 0) -> Any:
    """The Session the CLI decodes with (single-shot and chat alike), over the planned L3 cache."""
    import torch

    from .sampling import SamplingParams
    from .session import Session

    generator = torch.Generator(device=job.device).manual_seed(args.seed)
    store = None
    if args.kv_store is not None:
        from .kv_store import KVStore

        store = KVStore(args.kv_store, target.model, max_bytes=int(args.kv_store_max_gb * 2**30))
    return Session(target.model, draft.model if draft else None, SamplingParams(args.temperature, args.top_p),
                   target.eos_ids, engine_settings(args), generator, args.mode, cache=job.build_cache(target.model),
                   capacity=capacity, kv_store=store)


def generate_once(args: argparse.Namespace, job: Job, target: Any, draft: Any, stream: bool = True) -> dict:
    from .console import TextStreamer

    prompt_ids = job.prompt_ids
    stream = TextStreamer(target.tokenizer) if stream and not args.json else None
    from .generate import answer, answer_capacity

    capacity = answer_capacity(len(prompt_ids), args.max_new_tokens, engine_settings(args), args.mode)
    result = answer(make_session(args, job, target, draft, capacity=capacity), prompt_ids, args.max_new_tokens, stream)
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
    from .chat import ChatSession, run_chat
    from .console import PrefillProgress

    session = make_session(args, job, target, draft)
    progress = PrefillProgress()
    try:
        conversation = ChatSession(session, target.tokenizer, document, args.max_new_tokens, progress,
                                   max_context=args.max_context)
    except KeyboardInterrupt:
        print("interrupted while reading the document", file=sys.stderr)
        return 130
    finally:
        progress.close()
    return run_chat(conversation, args.json, first)


def main(argv: Sequence[str] | None = None) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun with several ranks
        return main_parallel(argv)
    if sys.stdout is None:  # started with stdout closed (`>&-`): run, and write the output nowhere
        sys.stdout = open(os.devnull, "w")
    catch_ctrl_c()
    jobs: list[Job] = []
    try:
        return _run(argv, jobs)
    except UserError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; stop quietly, as Unix tools do
        return quiet_broken_pipe()
    finally:
        for job in jobs:  # the copy engine stops here, in order, not while the interpreter tears down
            job.close()


def _run(argv: Sequence[str] | None, jobs: list) -> int:
    """Parse, check, plan, load and generate (or chat); the Job made is appended to `jobs` for main to close."""
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
    jobs.append(job)
    target, draft = load_models(args, job.device)
    if args.chat:
        return chat(args, job, document, first, target, draft)
    print_result(generate_once(args, job, target, draft), args)
    return 0


def catch_ctrl_c() -> None:
    """Ctrl-C must reach us as KeyboardInterrupt (exit 130) even when started with SIGINT ignored (a
    background job of a script, some process managers): the run is stopped by it wherever it waits."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def quiet_broken_pipe() -> int:
    """After stdout's reader closed the pipe: point stdout at /dev/null so the flush at exit cannot
    raise again, and return 141 (128 + SIGPIPE, what a shell shows for a tool killed by the signal)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no file descriptor (a test's captured stream)
        pass
    return 141


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
            raise UserError("tensor parallelism needs --model (the demo runs in one process)")
        if args.chat:
            raise UserError("--chat runs in one process; under torchrun use single-shot --prompt generation")
        import transformers

        transformers.logging.set_verbosity_error()
        device = tp.init_from_env(parallel_device(args.device))
        try:
            job = prepare(args, prompt_text(args), None, device, tp.current_world_size())
            target, draft = load_models(args, device, transform=tp.shard)
            job.build_cache(target.model)  # allocate each rank's host cache now: a failure is agreed on
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
            print(error_line(exc), file=sys.stderr)
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
