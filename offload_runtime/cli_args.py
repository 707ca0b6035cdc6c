"""argv, turned into one checked, frozen configuration (run_config.py).

`parse_run_args` (python -m offload_runtime.run) and `parse_serve_args` (python -m offload_runtime.serve:
the same flags without input and output, plus the server's; cli_flags.py) are the only readers of an
argparse namespace. Every check that needs no model runs here, before transformers is imported: a bad
flag is one `error: ...` line (a UserError, exit 2), never a traceback.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .cli_flags import build_parser, build_serve_parser
from .errors import UserError
from .run_config import STORE_MAX_GB, Generation, Inputs, Memory, Models, Output, RunConfig, ServeConfig, StoreOptions
from .validation import check_text, kernel_setting

if TYPE_CHECKING:
    from .settings import EngineSettings

__all__ = ["build_parser", "build_serve_parser", "parse_run_args", "parse_serve_args", "run_config"]

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes seeds in [0, 2**64)
NEEDS_MODEL = ("prompt", "prompt_file", "context_file", "draft", "chat", "kv_store")


def parse_run_args(argv: Sequence[str] | None = None) -> RunConfig:
    """`run`'s flags, checked: a RunConfig, or a UserError naming the first problem."""
    return run_config(build_parser().parse_args(argv))


def parse_serve_args(argv: Sequence[str] | None = None) -> ServeConfig:
    """The server's flags, checked (the engine's through run_config, as `run` checks them)."""
    ns = build_serve_parser().parse_args(argv)
    if ns.api_key is None:  # read here, not as the flag's default: --help must not print a key
        ns.api_key = os.environ.get("OFFLOAD_RUNTIME_API_KEY")
    if ns.model is None:
        raise UserError("--model is required: the checkpoint to serve")
    run = run_config(ns)
    if not 0 <= ns.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {ns.port}")
    if not ns.max_body_mb > 0:
        raise UserError(f"--max-body-mb must be positive, got {ns.max_body_mb}")
    if not (ns.read_timeout > 0 and math.isfinite(ns.read_timeout)):
        raise UserError(f"--read-timeout must be a positive number of seconds, got {ns.read_timeout}")
    if not (ns.context_ram_gb >= 0 and math.isfinite(ns.context_ram_gb)):
        raise UserError(f"--context-ram-gb must be a number >= 0, got {ns.context_ram_gb}")
    if ns.api_key is not None and not ns.api_key.strip():
        raise UserError("--api-key is empty")
    return ServeConfig(run, model_name=ns.model_name or ns.model, host=ns.host, port=ns.port, api_key=ns.api_key,
                       max_body_mb=ns.max_body_mb, context_ram_gb=ns.context_ram_gb, read_timeout=ns.read_timeout)


def run_config(ns: argparse.Namespace) -> RunConfig:
    """Check a parsed namespace (in the order the CLI contract's errors are reported) and freeze it."""
    check_flags(ns)
    check_generation(ns)
    engine = engine_settings(ns)
    check_memory_and_store(ns)
    return RunConfig(
        models=Models(ns.model, ns.draft or None), engine=engine, mode=ns.mode,
        generation=Generation(ns.max_new_tokens, ns.temperature, ns.top_p, ns.seed),
        store=StoreOptions(ns.kv_store, STORE_MAX_GB if ns.kv_store_max_gb is None else ns.kv_store_max_gb),
        memory=Memory(ns.device, ns.dtype, None if ns.on_chip_layers == "auto" else int(ns.on_chip_layers),
                      ns.offload, ns.emulate_link, ns.max_context, ns.compile),
        inputs=Inputs(ns.prompt, ns.prompt_file, ns.context_file), output=Output(ns.chat, ns.json))


def check_flags(ns: argparse.Namespace) -> None:
    """Flag values and combinations that are wrong whatever the model."""
    if not 0 <= ns.seed <= SEED_MAX:
        raise UserError(f"--seed must be between 0 and 2**64-1, got {ns.seed}")
    if not math.isfinite(ns.temperature):
        raise UserError(f"--temperature must be a finite number >= 0, got {ns.temperature}")
    if ns.model is None:
        given = [f"--{name.replace('_', '-')}" for name in NEEDS_MODEL if getattr(ns, name) not in (None, False)]
        if given:
            raise UserError(f"{given[0]} needs --model PATH|HUB_ID (without --model the stories260K demo runs, "
                            "which takes no input)")
    if ns.draft is not None and ns.mode == "autoregressive":
        raise UserError("--draft is used only by --mode triforce: drop it, or drop --mode autoregressive")
    if ns.prompt is not None:
        check_text(ns.prompt, "--prompt")
    kernel_setting()


def check_generation(ns: argparse.Namespace) -> None:
    """Lengths, sampling and the engine's sizes."""
    if ns.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {ns.max_new_tokens}")
    from .sampling import SamplingParams

    SamplingParams(ns.temperature, ns.top_p)  # raises on bad values
    for flag in ("chunk_size", "gamma", "draft_gamma", "budget"):
        if getattr(ns, flag) is not None and getattr(ns, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(ns, flag)}")
    if ns.budget < 2 * ns.chunk_size:
        raise UserError(f"--budget {ns.budget} must hold at least 2 chunks of --chunk-size {ns.chunk_size}")
    if ns.sinks < 0 or ns.window <= ns.sinks:
        raise UserError(f"--window {ns.window} must be larger than --sinks {ns.sinks} (>= 0)")


def engine_settings(ns: argparse.Namespace) -> EngineSettings:
    """The engine's knobs, checked by EngineSettings itself; with a draft (the demo always has one), the
    draft's window must hold a round's rollback. (settings.py imports torch: imported here, not above.)"""
    from .settings import EngineSettings

    settings = EngineSettings(budget=ns.budget, chunk_size=ns.chunk_size, gamma=ns.gamma,
                              draft_gamma=ns.draft_gamma, sinks=ns.sinks, window=ns.window,
                              refresh_every=ns.refresh_every, refresh_below=ns.refresh_below, pipeline=ns.pipeline)
    if ns.mode == "triforce" and (ns.draft or ns.model is None):
        settings.check_draft()
    return settings


def check_memory_and_store(ns: argparse.Namespace) -> None:
    if ns.on_chip_layers != "auto":
        try:
            n = int(ns.on_chip_layers)
        except ValueError:
            n = -1
        if n < 0:
            raise UserError(f"--on-chip-layers must be a non-negative integer or auto, got {ns.on_chip_layers}")
    if ns.max_context is not None and ns.max_context <= 0:
        raise UserError(f"--max-context must be positive, got {ns.max_context}")
    if ns.kv_store_max_gb is not None:
        if ns.kv_store is None:
            raise UserError("--kv-store-max-gb needs --kv-store")
        if not (math.isfinite(ns.kv_store_max_gb) and ns.kv_store_max_gb > 0):
            raise UserError(f"--kv-store-max-gb must be a positive number, got {ns.kv_store_max_gb}")
    if ns.kv_store is not None and Path(ns.kv_store).exists() and not Path(ns.kv_store).is_dir():
        raise UserError(f"--kv-store {ns.kv_store} is not a folder")
    if ns.kv_store is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--kv-store does not work with tensor parallelism yet (each rank holds part of the cache)")
