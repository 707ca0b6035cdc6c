"""From a RunConfig to a Session: the device, the memory plan before any weight loads, the planned L3
cache, the models (and --compile), the KV store. The CLI (single shot, chat, tensor-parallel ranks)
and the server start runs here; the demo and the benchmarks take its loading and offloaded cache.

Order matters: `prepare` reads the config and tokenizer and plans memory first, so a request that
cannot fit is refused (a UserError) before anything large is allocated; `load_models` then loads;
`make_session` builds each Session over a planned cache of its own (`Job.new_cache`: the server's
several contexts each own one, as the plan counted them).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import UserError
from .run_config import RunConfig
from .validation import check_emulated_link, check_link_time

if TYPE_CHECKING:
    import torch

    from .caches.offloaded import OffloadedCache
    from .kv_store import KVStore
    from .loading import LoadedModel
    from .planner import Plan
    from .session import Session

CHAT_HEADROOM = 16384  # tokens planned for a chat's turns beyond the document (raise with --max-context)


def pick_device(name: str) -> torch.device:
    """--device: auto (CUDA when there is one), cpu or cuda (refused without a GPU)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return torch.device(name)


def offloaded_cache(cfg: Any, device: torch.device | str, dtype: torch.dtype, capacity: int, on_chip_layers: int,
                    emulate_link: float | None = None, n_slabs: int | None = None) -> OffloadedCache:
    """An L3 cache with layers past `on_chip_layers` in host memory: streamed over an EMULATED link of
    `emulate_link` GB/s (a copy-engine thread, CPU), else the device's own link (its measured GB/s
    recorded for the reports)."""
    from .caches.offloaded import OffloadedCache
    from .cuda_streams import SLABS, link_bandwidth, make_backend

    return OffloadedCache(cfg, device, dtype, capacity, on_chip_layers,
                          backend=make_backend(device, link_gbps=emulate_link),
                          n_slabs=SLABS if n_slabs is None else n_slabs,
                          link_gbps=emulate_link or link_bandwidth(device))


def plan_run(config: RunConfig, device: torch.device, path: Path, hf: Any, n_prompt: int,
             tp: int = 1, context_ram: int = 0) -> tuple[Plan, bool]:
    """Plan memory before any weight or cache is allocated: (plan, whether the L3 cache is host-resident).
    Refuses (UserError) what does not fit, so nothing is left half-allocated. context_ram: the server's
    --context-ram-gb in bytes (planner._contexts); on a GPU its contexts' full caches live in host
    memory (--offload auto means on)."""
    from . import loading
    from .config import ModelConfig
    from .planner import plan_memory, probe_resources

    memory, new = config.memory, config.generation.max_new_tokens
    check_emulated_link(memory, device)
    cfg = ModelConfig.from_hf(hf)
    dtype = loading.pick_dtype(memory.dtype, device, path, hf)
    draft_cfg = None
    if config.uses_draft:
        draft_cfg = ModelConfig.from_hf(loading.load_hf_config(loading.resolve_checkpoint(config.models.draft)))
    slots = config.engine.max_gamma + 1 if config.mode == "triforce" else 0
    needed = n_prompt + new + slots
    context = memory.max_context or needed
    if needed > context:
        raise UserError(f"context of {needed} tokens (prompt {n_prompt} + {new} new"
                        f"{f' + {slots} verification slots' if slots else ''}) is longer than --max-context {context}")
    on_chip, offload = memory.on_chip_layers, memory.offload
    if context_ram and device.type == "cuda" and offload == "auto":
        offload = "on"
    if memory.emulate_link is not None and on_chip is None:
        on_chip = 0  # the emulated link carries the whole cache unless --on-chip-layers says otherwise
    plan = plan_memory(cfg, dtype, context, probe_resources(device), new_tokens=new + slots,
                       budget=config.engine.budget, draft_cfg=draft_cfg, draft_window=config.engine.window, tp=tp,
                       on_chip_layers=on_chip, offload=offload, context_ram=context_ram)
    check_link_time(memory.emulate_link, plan.pinned_host)
    return plan, bool(plan.offload or offload == "on" or on_chip is not None or memory.emulate_link is not None)


@dataclass
class Job:
    """What is known before any weight is loaded: the device, the request's tokens and the memory plan;
    then the L3 caches the plan asks for, one per context (new_cache; None: the growing on-device
    FullCache). The plan is the one source of truth for where layers live: each cache is built with
    its on-chip layers, and the plan counted `plan.contexts` of them."""
    device: torch.device
    prompt_ids: list[int] | None
    plan: Plan
    offload: bool  # the L3 cache is an OffloadedCache of plan.context tokens
    emulate_link: float | None = None  # GB/s of an EMULATED link (CPU): the whole cache crosses it by default
    caches: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # the caches built and still alive
    store: KVStore | None = None  # --kv-store, once opened (see kv_store)
    store_opened: bool = False

    def new_cache(self, model: Any) -> OffloadedCache | None:
        """A new planned L3 cache for the loaded model (each context owns one; its owner closes it when
        it drops the context, Job.close any still alive), or None for a growing FullCache."""
        if not self.offload:
            return None
        cache = offloaded_cache(model.cfg, self.device, model.dtype, self.plan.context, self.plan.on_chip_layers,
                                self.emulate_link)
        self.caches.add(cache)
        return cache

    def kv_store(self, config: RunConfig, model: Any) -> KVStore | None:
        """The --kv-store for the job's sessions, opened by the first (the server's contexts share it:
        opening one fingerprints every weight)."""
        if not self.store_opened:
            self.store, self.store_opened = open_kv_store(config, model), True
        return self.store

    def close(self) -> None:
        """Stop the caches' copy engines (an emulated link's thread) now, in order, before the interpreter
        exits: copies not yet run are dropped (the run is over)."""
        for cache in list(self.caches):
            cache.close()


def prepare(config: RunConfig, prompt: str | None, document: str | None, device: torch.device, tp: int = 1,
            context_ram: int = 0) -> Job:
    """Config, tokenizer and memory plan first: refuse before any weight or cache is allocated. `prompt`:
    a single shot's whole prompt; else a chat's (or the server's) conversations over `document`;
    context_ram: the server's --context-ram-gb in bytes (its contexts, each planned as a chat's)."""
    from . import loading
    from .config import ModelConfig
    from .request import check_request
    from .validation import check_kernels, check_max_context

    check_kernels(device)
    new, max_context = config.generation.max_new_tokens, config.memory.max_context
    path = loading.resolve_checkpoint(config.models.target)
    hf = loading.load_hf_config(path)
    cfg = ModelConfig.from_hf(hf)
    check_max_context(max_context, cfg.max_position_embeddings)
    loading.weight_files(path)  # a checkpoint without weights says so before its tokenizer is read
    tokenizer = loading.load_tokenizer(path)
    prompt_ids = None
    if prompt is not None:
        prompt_ids = tokenizer(prompt)["input_ids"]
        check_request(len(prompt_ids), new, cfg.max_position_embeddings)
        planned = len(prompt_ids)
    else:  # a chat: the document plus room for the conversation, within the model's context
        n_doc = len(tokenizer(document)["input_ids"]) if document else 0
        limit = min(cfg.max_position_embeddings, max_context or cfg.max_position_embeddings)
        room = limit - new - config.engine.max_gamma - 1
        if room <= 0:
            source = "--max-context" if limit == max_context else "the model's context"
            raise UserError(f"--max-new-tokens {new} leaves no room for a chat turn in {source} of {limit} tokens")
        planned = max(n_doc, min(room, n_doc + CHAT_HEADROOM))
    plan, offload = plan_run(config, device, path, hf, planned, tp, context_ram)
    return Job(device, prompt_ids, plan, offload, config.memory.emulate_link)


def load_model(name: str, device: torch.device, dtype: str, compile: bool = False, with_tokenizer: bool = True,
               transform: Callable | None = None) -> LoadedModel:
    """One checkpoint (loading.load), its one-token step compiled with --compile (compiled.py)."""
    from . import loading

    loaded = loading.load(name, device, dtype, transform=transform, with_tokenizer=with_tokenizer)
    if compile:
        from . import compiled

        compiled.enable(loaded.model)
    return loaded


def load_models(config: RunConfig, device: torch.device,
                transform: Callable | None = None) -> tuple[LoadedModel, LoadedModel | None]:
    """The target (with tokenizer; `transform`: e.g. tensor-parallel sharding) and the optional draft,
    checked for a shared vocabulary."""
    from .vocabulary import check_same_vocabulary

    dtype = config.memory.dtype
    target = load_model(config.models.target, device, dtype, config.memory.compile, transform=transform)
    draft = None
    if config.uses_draft:
        draft = load_model(config.models.draft, device, dtype)
        check_same_vocabulary(target, draft)
    return target, draft


def open_kv_store(config: RunConfig, model: Any) -> KVStore | None:
    """--kv-store: the store of the model's full-cache rows on disk (None without the flag)."""
    if config.store.folder is None:
        return None
    from .kv_store import KVStore

    return KVStore(config.store.folder, model, max_bytes=config.store.max_bytes)


def make_session(config: RunConfig, job: Job, target: LoadedModel, draft: LoadedModel | None,
                 capacity: int = 0) -> Session:
    """A Session over a planned L3 cache of its own (single shot, chat and each of the server's contexts
    alike); `capacity`: tokens to reserve in a growing on-device cache."""
    import torch

    from .session import Session

    generator = torch.Generator(device=job.device).manual_seed(config.generation.seed)
    return Session(target.model, draft.model if draft else None, config.generation.sampling(), target.eos_ids,
                   config.engine, generator, config.mode, cache=job.new_cache(target.model), capacity=capacity,
                   kv_store=job.kv_store(config, target.model))
