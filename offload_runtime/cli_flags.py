"""The flags of `run` and `serve` (argparse parsers, with their help); cli_args.py checks what they parse.

The server takes `run`'s flags but the input and output groups, plus its own; the flags it lacks
are set to their defaults in its namespace, so both namespaces have every field of a RunConfig.
"""
from __future__ import annotations

import argparse

from .errors import OneLineParser
from .run_config import STORE_MAX_GB

RUN_DESCRIPTION = ("Lossless long-context generation with a host-resident KV cache and TriForce hierarchical "
                   "speculative decoding. Without --model: a demo on the trained stories260K pair shipped with "
                   "the package.")
SERVE_DESCRIPTION = ("An OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models) over the "
                     "TriForce engine; follow-up requests prefill only what they add to the conversation.")
RUN_MODEL_HELP = "target checkpoint: a local directory or a Hugging Face hub id (omit for the stories260K demo)"
SERVE_MODEL_HELP = "target checkpoint to serve (required): a local directory or a Hugging Face hub id"


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default in its help, unless the help already says its own `(default: ...)`."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "(default:" in action.help:
            return action.help
        return super()._get_help_string(action)


def auto_or_int(text: str) -> int | None:
    """`auto` (None: the engine's controller chooses) or an integer."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or an integer, got {text!r}") from None


def build_parser(prog: str = "python -m offload_runtime.run", description: str = RUN_DESCRIPTION,
                 io_flags: bool = True) -> argparse.ArgumentParser:
    """The flags of `run`; io_flags=False leaves out the input and output groups (the server reuses the rest)."""
    p = OneLineParser(prog=prog, description=description, formatter_class=DefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", help=RUN_MODEL_HELP if io_flags else SERVE_MODEL_HELP)
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
    add_engine_flags(p)
    g = p.add_argument_group("kv store")
    g.add_argument("--kv-store", metavar="DIR", default=None,
                   help="keep the full cache of prompts on disk in DIR and restore a cached prefix instead of "
                   "prefilling it (a document reopened, another question, a restart); off by default")
    g.add_argument("--kv-store-max-gb", type=float, default=None, metavar="GB",  # None: not given (50 GB)
                   help="the store's size limit, with --kv-store; the least recently used blocks are deleted "
                   f"beyond it (default: {STORE_MAX_GB:g})")
    add_memory_flags(p)
    if io_flags:
        g = p.add_argument_group("output")
        g.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
        g.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, prompt_tokens, stats")
    else:  # not flags of this program, but fields of its configuration
        p.set_defaults(prompt=None, prompt_file=None, context_file=None, chat=False, json=False)
    return p


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The engine group: the mode, the retrieval cache, speculation lengths, the draft's cache, re-retrieval."""
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


def add_memory_flags(p: argparse.ArgumentParser) -> None:
    """The memory and device group: where the weights and the full cache live."""
    g = p.add_argument_group("memory and device")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA when a GPU is available, else the CPU; cuda is refused without a GPU")
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


def build_serve_parser() -> argparse.ArgumentParser:
    """`serve`'s flags: run's model, generation (the requests' defaults), engine, kv store and memory
    groups, and the server group."""
    p = build_parser(prog="python -m offload_runtime.serve", description=SERVE_DESCRIPTION, io_flags=False)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (unset: "
                   "$OFFLOAD_RUNTIME_API_KEY if set, else no key)")
    g.add_argument("--model-name", help="the model id clients send and /v1/models lists (unset: --model)")
    g.add_argument("--max-body-mb", type=float, default=8.0, help="larger request bodies are refused (413)")
    g.add_argument("--context-ram-gb", type=float, default=0.0, metavar="GB",
                   help="keep several documents' contexts in host memory, up to this many GB of full caches "
                   "(0: one context; as many as the memory plan holds; on CUDA host-resident: --offload auto "
                   "means on); with --kv-store the others come back from disk")
    g.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request's headers, then its body, must arrive within this time (else the connection "
                   "is closed, or 408)")
    return p
