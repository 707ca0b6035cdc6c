"""`python -m offload_runtime.serve`: an OpenAI-compatible HTTP server over one engine Session.

Takes the model, generation, engine and memory flags of `run` (the generation flags are the
defaults of requests that do not set them) plus --host, --port and --api-key (cli_flags.py; checked
into one ServeConfig by cli_args.py, the path `run` takes). One engine, batch 1:
requests queue and run one at a time; each reuses the caches of the longest token prefix it shares
with the previous conversation (see server/engine.py). A user error prints one `error:` line, exit 2.
SIGTERM or SIGINT stop accepting, cancel the running generations and exit 0 within about a second.
"""
from __future__ import annotations

import copy
import functools
import sys
from typing import Any, Sequence

from .cli_args import parse_serve_args as parse_args  # (serve.parse_args: argv -> the checked ServeConfig)
from .errors import UserError
from .launch import load_models, make_session, pick_device, prepare
from .run_config import ServeConfig


def build(config: ServeConfig) -> tuple[Any, Any]:
    """Plan, load and wrap the engine: (FastAPI app, EngineWorker). The caller closes the worker."""
    import transformers

    from .server.app import ServerConfig, create_app
    from .server.engine import ContextPool, EngineWorker

    transformers.logging.set_verbosity_error()
    run = config.run
    job = prepare(run, None, None, pick_device(run.memory.device))  # planned as the chat plans a conversation
    target, draft = load_models(run, job.device)
    if config.context_ram_gb > 0 and (job.device.type == "cuda" or job.offload):
        raise UserError("--context-ram-gb keeps several contexts on CPU only, without a host-resident cache "
                        "(--offload on, --emulate-link), for now")
    first = make_session(run, job, target, draft)
    contexts = ContextPool(first, lambda: make_session(run, job, target, draft), int(config.context_ram_gb * 2**30))
    worker = EngineWorker(first, target.tokenizer, target.eos_ids, job.device, run.generation.seed, contexts)
    app_config = ServerConfig(config.model_name, run.generation, config.api_key, int(config.max_body_mb * (1 << 20)),
                              config.read_timeout)
    return create_app(worker, app_config), worker


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
        config = parse_args(argv)
        try:
            import uvicorn  # noqa: F401  (installed?)
        except ImportError:
            raise UserError("the server needs fastapi and uvicorn: pip install 'offload_runtime[serve]'")
        app, worker = build(config)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if config.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        print(f"warning: listening on {config.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    print(f"serving {config.model_name} at http://{config.host}:{config.port}/v1 "
          f"(context {worker.max_context} tokens)", file=sys.stderr)
    try:
        make_server(app, worker, config.host, config.port, config.read_timeout).run()
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
