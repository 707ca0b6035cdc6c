"""The command line: `python -m offload_runtime.run` (see docs/CLI.md for the flags).

argv becomes one RunConfig (cli_args.py), a run is planned, loaded and given a Session (launch.py);
here: the single shot and its printed result, the chat's start, and the tensor-parallel ranks under
torchrun. A user error prints one line `error: ...` on stderr and exits 2, never a traceback.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any, Sequence

from .cli_args import parse_run_args
from .errors import UserError, error_line
from .launch import Job, load_models, make_session, pick_device, prepare
from .run_config import Inputs, RunConfig
from .validation import check_text, read_text


def prompt_text(inputs: Inputs) -> str:
    """The single shot's prompt: --prompt or --prompt-file, after --context-file's document."""
    if inputs.prompt is not None and inputs.prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    prompt = read_text(inputs.prompt_file, "prompt file") if inputs.prompt_file else inputs.prompt
    if prompt is None:
        raise UserError("--prompt or --prompt-file is required with --model (or use --chat)")
    check_text(prompt, "--prompt")
    if inputs.context_file:
        prompt = read_text(inputs.context_file, "context file") + "\n\n" + prompt
    return prompt


def first_chat_message(inputs: Inputs) -> str | None:
    """--prompt or --prompt-file with --chat: the first user message."""
    if inputs.prompt is not None and inputs.prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    return read_text(inputs.prompt_file, "prompt file") if inputs.prompt_file else inputs.prompt


def generate_once(config: RunConfig, job: Job, target: Any, draft: Any, stream: bool = True) -> dict:
    """The single shot: the prompt prefilled, the answer generated (streamed unless --json)."""
    from .console import TextStreamer
    from .generate import answer, answer_capacity

    prompt_ids, new = job.prompt_ids, config.generation.max_new_tokens
    stream = TextStreamer(target.tokenizer) if stream and not config.output.json else None
    capacity = answer_capacity(len(prompt_ids), new, config.engine, config.mode)
    result = answer(make_session(config, job, target, draft, capacity=capacity), prompt_ids, new, stream)
    if stream:
        stream.finish()
    result.stats["memory_plan"] = job.plan.as_dict()
    text = target.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    return {"text": text, "token_ids": result.token_ids, "prompt_tokens": len(prompt_ids), "stats": result.stats}


def chat(config: RunConfig, job: Job, document: str | None, first: str | None, target: Any, draft: Any) -> int:
    """--chat: the document prefilled once (Ctrl-C there ends the run, 130), then the chat loop."""
    from .chat import ChatSession
    from .chat_loop import run_chat
    from .console import PrefillProgress

    session = make_session(config, job, target, draft)
    progress = PrefillProgress()
    try:
        conversation = ChatSession(session, target.tokenizer, document, config.generation.max_new_tokens, progress,
                                   max_context=config.memory.max_context)
    except KeyboardInterrupt:
        print("interrupted while reading the document", file=sys.stderr)
        return 130
    finally:
        progress.close()
    return run_chat(conversation, config.output.json, first)


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
    config = parse_run_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    if config.models.target is None:
        from . import demo

        return demo.run_demo(config)
    # file errors and the memory plan before the slow model load
    inputs, chatting = config.inputs, config.output.chat
    prompt = None if chatting else prompt_text(inputs)
    document = read_text(inputs.context_file, "context file") if chatting and inputs.context_file else None
    first = first_chat_message(inputs) if chatting else None
    job = prepare(config, prompt, document, pick_device(config.memory.device))
    jobs.append(job)
    target, draft = load_models(config, job.device)
    if chatting:
        return chat(config, job, document, first, target, draft)
    print_result(generate_once(config, job, target, draft), config)
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


def print_result(out: dict, config: RunConfig) -> None:
    """The single shot's JSON object (--json), else its summary line on stderr (the text was streamed)."""
    if config.output.json:
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
    """A rank's run: parse, plan, load its shard, generate; errors agreed on across the ranks."""
    from . import tp

    try:
        config = parse_run_args(argv)
        if config.models.target is None:
            raise UserError("tensor parallelism needs --model (the demo runs in one process)")
        if config.output.chat:
            raise UserError("--chat runs in one process; under torchrun use single-shot --prompt generation")
        import transformers

        transformers.logging.set_verbosity_error()
        device = tp.init_from_env(parallel_device(config.memory.device))
        try:
            job = prepare(config, prompt_text(config.inputs), None, device, tp.current_world_size())
            target, draft = load_models(config, device, transform=tp.shard)
            job.build_cache(target.model)  # allocate each rank's host cache now: a failure is agreed on
            error = None
        except UserError as exc:
            error = str(exc)
        error = tp.first_error(error)  # every rank learns of an error on any rank
        if error is not None:
            raise UserError(error)
        out = generate_once(config, job, target, draft, stream=rank0)
        if rank0:
            print_result(out, config)
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
