"""`python -m offload_runtime.serve`: an OpenAI-compatible HTTP server over one engine Session.

Takes the model, generation, engine and memory flags of `run` (the generation flags are the
defaults of requests that do not set them) plus --host, --port and --api-key. One engine, batch 1:
requests queue and run one at a time; each reuses the caches of the longest token prefix it shares
with the previous conversation (see server/engine.py). A user error prints one `error:` line, exit 2.
SIGTERM or SIGINT stop accepting, cancel the running generations and exit 0 within about a second.
"""
from __future__ import annotations

import argparse
import copy
import functools
import math
import os
import sys
from typing import Any, Sequence

from .errors import UserError
from .run import build_parser as run_parser
from .run import load_models, pick_device, prepare, validate


def build_parser() -> argparse.ArgumentParser:
    p = run_parser(prog="python -m offload_runtime.serve", io_flags=False,
                   description="An OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models) "
                   "over the TriForce engine; follow-up requests prefill only what they add to the conversation.")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (unset: "
                   "$OFFLOAD_RUNTIME_API_KEY if set, else no key)")
    g.add_argument("--model-name", help="the model id clients send and /v1/models lists (unset: --model)")
    g.add_argument("--max-body-mb", type=float, default=8.0, help="larger request bodies are refused (413)")
    g.add_argument("--context-ram-gb", type=float, default=0.0, metavar="GB",
                   help="keep several documents' contexts in host memory, up to this many GB of full caches "
                   "(0: one context; CPU only for now); with --kv-store the others come back from disk")
    g.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request's headers, then its body, must arrive within this time (else the connection "
                   "is closed, or 408)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.api_key is None:  # read here, not as the flag's default: --help must not print a key
        args.api_key = os.environ.get("OFFLOAD_RUNTIME_API_KEY")
    if args.model is None:
        raise UserError("--model is required: the checkpoint to serve")
    validate(args)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    if not args.max_body_mb > 0:
        raise UserError(f"--max-body-mb must be positive, got {args.max_body_mb}")
    if not (args.read_timeout > 0 and math.isfinite(args.read_timeout)):
        raise UserError(f"--read-timeout must be a positive number of seconds, got {args.read_timeout}")
    if not (args.context_ram_gb >= 0 and math.isfinite(args.context_ram_gb)):
        raise UserError(f"--context-ram-gb must be a number >= 0, got {args.context_ram_gb}")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api-key is empty")
    return args


def build(args: argparse.Namespace) -> tuple[Any, Any]:
    """Plan, load and wrap the engine: (FastAPI app, EngineWorker). The caller closes the worker."""
    import transformers

    from .server.app import ServerConfig, create_app
    from .server.engine import ContextPool, EngineWorker, new_session

    transformers.logging.set_verbosity_error()
    job = prepare(args, None, None, pick_device(args.device))  # planned as the chat plans a conversation
    target, draft = load_models(args, job.device)
    if args.context_ram_gb > 0 and (job.device.type == "cuda" or job.offload):
        raise UserError("--context-ram-gb keeps several contexts on CPU only, without a host-resident cache "
                        "(--offload on, --emulate-link), for now")
    first = new_session(args, job, target, draft)
    contexts = ContextPool(first, lambda: new_session(args, job, target, draft), int(args.context_ram_gb * 2**30))
    worker = EngineWorker(first, target.tokenizer, target.eos_ids, job.device, args.seed, contexts)
    config = ServerConfig(args.model_name or args.model, args, args.api_key, int(args.max_body_mb * (1 << 20)),
                          args.read_timeout)
    return create_app(worker, config), worker


def make_server(app: Any, worker: Any, host: str, port: int, read_timeout: float, log_level: str = "info") -> Any:
    """The uvicorn server as `serve` runs it (tests start the same one): a deadline for request headers,
    and a signal stops it at once (see Server)."""
    import uvicorn

    from .server.http import DeadlineProtocol, Server

    http = functools.partial(DeadlineProtocol, read_timeout=read_timeout)
    logs = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)  # our one-line notes (disconnects, timeouts) as uvicorn's
    logs["loggers"]["offload_runtime"] = {"handlers": ["default"], "level": log_level.upper()}
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=http, log_config=logs,
                            timeout_graceful_shutdown=Server.GRACE_S)
    return Server(config, worker)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        try:
            import uvicorn  # noqa: F401  (installed?)
        except ImportError:
            raise UserError("the server needs fastapi and uvicorn: pip install 'offload_runtime[serve]'")
        app, worker = build(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    print(f"serving {args.model_name or args.model} at http://{args.host}:{args.port}/v1 "
          f"(context {worker.max_context} tokens)", file=sys.stderr)
    try:
        make_server(app, worker, args.host, args.port, args.read_timeout).run()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
