"""What a run was asked for, typed and frozen: one `RunConfig` per run (one `ServeConfig` per server).

cli_args.py builds them from argv, after every check; launch.py, run.py, the chat, the server and the
demo read them. Nothing here parses or checks, and nothing heavy is imported: `--help` and a bad flag
stay fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .sampling import SamplingParams
    from .settings import EngineSettings

Mode = Literal["triforce", "autoregressive"]
STORE_MAX_GB = 50.0  # --kv-store-max-gb when --kv-store is given without it


@dataclass(frozen=True)
class Models:
    """--model (None: the stories260K demo) and --draft (None: the two-level hierarchy)."""
    target: str | None = None
    draft: str | None = None


@dataclass(frozen=True)
class Inputs:
    """--prompt, --prompt-file, --context-file as given (files are read at run time, run.py)."""
    prompt: str | None = None
    prompt_file: str | None = None
    context_file: str | None = None


@dataclass(frozen=True)
class Generation:
    """How much to generate and how to sample; the server's defaults for requests that do not say."""
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def sampling(self) -> SamplingParams:
        from .sampling import SamplingParams

        return SamplingParams(self.temperature, self.top_p)


@dataclass(frozen=True)
class StoreOptions:
    """--kv-store DIR (None: no store) and its size limit."""
    folder: str | None = None
    max_gb: float = STORE_MAX_GB

    @property
    def max_bytes(self) -> int:
        return int(self.max_gb * 2**30)


@dataclass(frozen=True)
class Memory:
    """Where the weights and the full cache live."""
    device: str = "auto"  # auto, cpu, cuda
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    on_chip_layers: int | None = None  # None: as many as the memory plan fits (--on-chip-layers auto)
    offload: str = "auto"  # auto, on, off
    emulate_link: float | None = None  # GB/s of an EMULATED link (CPU)
    max_context: int | None = None  # tokens the full cache is planned for (None: what the request needs)
    compile: bool = False  # --compile: the one-token step as one torch.compile graph (CPU)


@dataclass(frozen=True)
class Output:
    chat: bool = False  # interactive multi-turn chat
    json: bool = False  # one JSON object (per turn in a chat)


@dataclass(frozen=True)
class RunConfig:
    """One run of `python -m offload_runtime.run` (or the engine part of the server's flags)."""
    models: Models
    engine: EngineSettings
    mode: Mode = "triforce"
    generation: Generation = field(default_factory=Generation)
    store: StoreOptions = field(default_factory=StoreOptions)
    memory: Memory = field(default_factory=Memory)
    inputs: Inputs = field(default_factory=Inputs)
    output: Output = field(default_factory=Output)

    @property
    def uses_draft(self) -> bool:
        """A draft model is loaded (L1): --draft given, in TriForce mode."""
        return self.models.draft is not None and self.mode == "triforce"


@dataclass(frozen=True)
class ServeConfig:
    """`python -m offload_runtime.serve`: the engine's configuration plus the server's own flags."""
    run: RunConfig
    model_name: str  # the id clients send and /v1/models lists (--model-name, else --model)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # --api-key, else $OFFLOAD_RUNTIME_API_KEY, else none
    max_body_mb: float = 8.0
    context_ram_gb: float = 0.0
    read_timeout: float = 30.0
