"""The memory planner: what goes where for a context length, and a refusal when it cannot fit.

From the model config, dtype, planned context, retrieval budget, draft and TP degree it
counts the GPU's share (weights, retrieval cache, draft, slabs, activations, a fixed
reserve for the CUDA context and allocator) and the host's share (the offloaded layers'
full cache, pinned), picks the on-chip layers (`--on-chip-layers auto`: as many as fit
after everything else) and refuses, with one line naming the numbers, a plan that does
not fit. The server's several contexts (--context-ram-gb) each count their own caches, the
weights once (`_contexts`). GPU memory comes from pynvml (nvidia-ml-py), host memory from
psutil; without an NVIDIA driver (or with --device cpu) it plans for the CPU: everything in
host memory.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from .caches.full import FullCache
from .caches.offloaded import OffloadedCache
from .caches.retrieval import RetrievalCache
from .caches.streaming import StreamingCache
from .config import ModelConfig
from .cuda_streams import SLABS
from .errors import UserError
from .prefill import MASK_BYTES, PREFILL_CHUNK  # the activations the layer-major prefill holds

GiB = 2**30
CUDA_RESERVE = 1 * GiB  # CUDA context, cuBLAS workspaces, allocator fragmentation
HOST_RESERVE = 2 * GiB  # left free for the OS, Python and the weights' load path (at most 5% of what is available)


@dataclass(frozen=True)
class Resources:
    """What the machine has: device kind, GPU memory (bytes, per GPU), host memory available."""

    device: str  # "cuda" or "cpu"
    host_available: int
    gpu_total: int = 0
    gpu_free: int = 0
    gpu_name: str = ""


def gpu_memory(index: int = 0) -> tuple[int, int, str] | None:
    """(total, free, name) of GPU `index` from NVML, or None without an NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        handle = None
        if torch.cuda.is_available():  # NVML numbers devices without CUDA_VISIBLE_DEVICES: match by PCI bus
            props = torch.cuda.get_device_properties(index)
            bus = getattr(props, "pci_bus_id", None)
            if bus is not None:
                bus_id = f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
                try:
                    handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
                except Exception:
                    handle = None
        if handle is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        return int(info.total), int(info.free), name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def host_available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def probe_resources(device: torch.device | str) -> Resources:
    """Resources for planning on `device`: NVML for a CUDA device (CPU plan without a driver), psutil for RAM."""
    device = torch.device(device)
    gpu = gpu_memory(device.index or 0) if device.type == "cuda" else None
    if gpu is None and device.type == "cuda" and torch.cuda.is_available():  # no NVML: ask the CUDA runtime
        free, total = torch.cuda.mem_get_info(device)
        gpu = total, free, torch.cuda.get_device_name(device)
    if gpu is None:
        return Resources("cpu", host_available())
    total, free, name = gpu
    return Resources("cuda", host_available(), total, free, name)


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of a Llama-family model from its config (what loading allocates)."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    attn = h * d * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
    if cfg.qkv_bias:
        attn += d * (cfg.num_heads + 2 * cfg.num_kv_heads)
    if cfg.o_bias:
        attn += h
    mlp = 3 * h * i + ((2 * i + h) if cfg.mlp_bias else 0)
    per_layer = attn + mlp + 2 * h
    embed = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return cfg.num_layers * per_layer + embed + h


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


@dataclass
class Plan:
    device: str
    context: int  # tokens the full cache is allocated for
    on_chip_layers: int
    offloaded_layers: int
    weights: int
    retrieval: int
    draft: int
    on_chip_kv: int
    slabs: int
    activations: int
    reserve: int
    gpu_needed: int
    gpu_free: int
    pinned_host: int  # host-resident full cache (pinned on CUDA) of one context, this process
    host_needed: int  # everything this machine's RAM must hold (all TP ranks, every context)
    host_available: int
    contexts: int = 1  # contexts planned, each with its own full, retrieval and draft caches (--context-ram-gb)
    context_ram: int = 0  # one context's full cache in host memory (what --context-ram-gb counts)
    contexts_asked: int = 1  # contexts --context-ram-gb asked for (more than `contexts`: the machine holds fewer)

    @property
    def offload(self) -> bool:
        return self.offloaded_layers > 0

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        g = lambda b: f"{b / GiB:.1f}"  # noqa: E731
        if self.device == "cpu":
            return (f"plan (cpu): {self.context} tokens, host {g(self.host_needed)} of {g(self.host_available)} GiB "
                    f"(weights {g(self.weights)}, KV cache {g(self.on_chip_kv + self.pinned_host)})")
        return (f"plan ({self.device}): {self.context} tokens, {self.on_chip_layers} on-chip layers, "
                f"{self.offloaded_layers} offloaded; GPU {g(self.gpu_needed)} of {g(self.gpu_free)} GiB free "
                f"(weights {g(self.weights)}, retrieval {g(self.retrieval)}, draft {g(self.draft)}, "
                f"slabs {g(self.slabs)}, on-chip KV {g(self.on_chip_kv)}); pinned host {g(self.pinned_host)} GiB")


def _activations(cfg: ModelConfig, b: int, context: int, prompt: int, tp: int) -> int:
    """The layer-major prefill's activations: the prompt's hidden states and rotary tables, one chunk's
    activations and attention mask (SDPA on CUDA), logits of a verification block."""
    chunk = min(PREFILL_CHUNK, max(prompt, 1))
    return (context * (cfg.hidden_size + 2 * cfg.head_dim) * b
            + chunk * (4 * cfg.hidden_size + 3 * cfg.intermediate_size // tp) * b
            + min(3 * cfg.kv_groups * chunk * context, MASK_BYTES)
            + cfg.vocab_size * 64 * 4)


def _layout(cfg: ModelConfig, dtype: torch.dtype, context: int, res: Resources, *, new_tokens: int, budget: int,
            draft_cfg: ModelConfig | None, draft_window: int, tp: int, on_chip: int | None,
            offload: str, contexts: int = 1) -> Plan:
    """The plan for one context length (no checks); on_chip None = as many as fit. `contexts`: how many
    contexts (the server's --context-ram-gb) each hold their own full, retrieval and draft caches; the
    weights and the prefill's activations are counted once."""
    b = dtype_bytes(dtype)
    layers = cfg.num_layers
    layer_kv = FullCache.planned_bytes(cfg, dtype, context, layers=1, tp=tp)  # one layer, this rank
    vocab_params = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    # tensor parallelism splits the layers; embeddings and lm_head are replicated on every rank (tp.py)
    weights = ((count_parameters(cfg) - vocab_params) // tp + vocab_params) * b
    prompt = max(0, context - new_tokens)
    retrieval = RetrievalCache.planned_bytes(cfg, dtype, prompt, budget, new_tokens, tp)
    draft_weights = draft_kv = 0
    if draft_cfg is not None:
        draft_weights = count_parameters(draft_cfg) * b
        draft_kv = StreamingCache.planned_bytes(draft_cfg, dtype, draft_window)
    draft, activations = draft_weights + draft_kv, _activations(cfg, b, context, prompt, tp)
    shared, each = weights + draft_weights + activations, retrieval + draft_kv  # once; per context
    if res.device == "cpu":
        # host and "device" are the same memory: nothing to gain, offload only when asked
        n_on = on_chip if on_chip is not None else (0 if offload == "on" else layers)
        on_kv, slabs, pinned = OffloadedCache.planned_bytes(cfg, dtype, context, n_on, tp)
        ram = on_kv + slabs + pinned  # one context's full cache, all of it in RAM
        return Plan("cpu", context, n_on, layers - n_on, weights, retrieval, draft, on_kv, slabs, activations, 0,
                    0, 0, pinned, (shared + contexts * (each + ram)) * tp, res.host_available, contexts, ram)
    fixed = shared + contexts * each + CUDA_RESERVE
    auto_on = (res.gpu_free - fixed - contexts * SLABS * layer_kv) // max(contexts * layer_kv, 1)
    if offload == "off":
        n_on = layers
    elif on_chip is not None:
        n_on = on_chip
    elif offload == "on" or fixed + contexts * layers * layer_kv > res.gpu_free:
        n_on = max(0, min(layers - 1, auto_on))
    else:
        n_on = layers  # everything fits: no offloading
    on_kv, slabs, pinned = OffloadedCache.planned_bytes(cfg, dtype, context, n_on, tp)
    gpu = fixed + contexts * (on_kv + slabs)
    return Plan(res.device, context, n_on, layers - n_on, weights, retrieval, draft, on_kv, slabs, activations,
                CUDA_RESERVE, gpu, res.gpu_free, pinned, contexts * pinned * tp, res.host_available, contexts, pinned)


def host_usable(available: int) -> int:
    return available - min(HOST_RESERVE, available // 20)


def _fits(p: Plan) -> bool:
    host_ok = p.host_needed <= host_usable(p.host_available)
    return host_ok if p.device == "cpu" else host_ok and p.gpu_needed <= p.gpu_free


def plan_memory(cfg: ModelConfig, dtype: torch.dtype, context: int, res: Resources, *, new_tokens: int = 0,
                budget: int = 4096, draft_cfg: ModelConfig | None = None, draft_window: int = 256, tp: int = 1,
                on_chip_layers: int | None = None, offload: str = "auto", context_ram: int = 0) -> Plan:
    """Plan a full cache of `context` tokens; raise UserError naming the numbers if it does not fit.
    on_chip_layers None = auto; offload auto|on|off; context_ram: bytes of full caches the server may
    keep in host memory (--context-ram-gb; 0: one context), see _contexts."""
    if on_chip_layers is not None and not 0 <= on_chip_layers <= cfg.num_layers:
        raise UserError(f"--on-chip-layers {on_chip_layers} must be between 0 and the model's {cfg.num_layers} layers")
    if offload == "off" and on_chip_layers is not None and on_chip_layers < cfg.num_layers:
        raise UserError(f"--on-chip-layers {on_chip_layers} offloads layers, but --offload is off")
    if tp > 1:
        from .tp import check_divisible

        check_divisible(cfg, tp)  # the same message as the sharding itself gives
    kw = dict(new_tokens=new_tokens, budget=budget, draft_cfg=draft_cfg, draft_window=draft_window, tp=tp,
              on_chip=on_chip_layers, offload=offload)
    plan = _layout(cfg, dtype, context, res, **kw)
    if _fits(plan):
        return _contexts(cfg, dtype, context, res, plan, context_ram, kw) if context_ram else plan
    g = lambda b: f"{b / GiB:.1f}"  # noqa: E731
    hint = _max_context_hint(cfg, dtype, context, res, kw)
    avail = host_usable(plan.host_available)
    if plan.device == "cpu":
        ranks = f" per rank, x {tp} ranks" if tp > 1 else ""
        raise UserError(f"needs {g(plan.host_needed)} GiB of host memory for {context} tokens (weights {g(plan.weights)}, "
                        f"KV cache {g(plan.on_chip_kv + plan.pinned_host + plan.slabs)}, retrieval {g(plan.retrieval)}, "
                        f"draft {g(plan.draft)}, prefill activations {g(plan.activations)}{ranks}), "
                        f"{g(avail)} GiB available{hint}")
    if plan.gpu_needed > plan.gpu_free:
        raise UserError(f"needs {g(plan.gpu_needed)} GiB of GPU memory for {context} tokens (weights {g(plan.weights)}, "
                        f"retrieval cache {g(plan.retrieval)}, draft {g(plan.draft)}, slabs {g(plan.slabs)}, "
                        f"on-chip KV {g(plan.on_chip_kv)} for {plan.on_chip_layers} layers, prefill activations "
                        f"{g(plan.activations)}, reserve {g(plan.reserve)}), {g(plan.gpu_free)} GiB free{hint}")
    raise UserError(f"needs {g(plan.host_needed)} GiB of pinned host memory for {context} tokens "
                    f"({plan.offloaded_layers} offloaded layers), {g(avail)} GiB available{hint}")


def _contexts(cfg: ModelConfig, dtype: torch.dtype, context: int, res: Resources, one: Plan, ram: int,
              kw: dict) -> Plan:
    """The server's contexts in RAM: as many as `ram` bytes hold of full caches (`one.context_ram` each),
    each counted with its own full, retrieval and draft caches (on a GPU: its on-chip layers and slabs
    too). Fewer when the machine holds fewer (the plan's `contexts_asked` says how many were asked); a
    UserError when not even two fit. A budget below two contexts keeps one, as without the flag."""
    g = lambda b: f"{b / GiB:.1f}"  # noqa: E731
    if one.context_ram == 0:
        raise UserError(f"--context-ram-gb keeps each context's full cache in host memory, but this plan holds all "
                        f"{cfg.num_layers} layers on the GPU (--offload off or --on-chip-layers {cfg.num_layers})")
    asked = ram // one.context_ram
    if asked < 2:
        return one
    plan = lambda k: _layout(cfg, dtype, context, res, **kw, contexts=k)  # noqa: E731
    if not _fits(two := plan(2)):
        gpu = two.device != "cpu" and two.gpu_needed > two.gpu_free
        need, have = (two.gpu_needed, two.gpu_free) if gpu else (two.host_needed, host_usable(two.host_available))
        raise UserError(f"--context-ram-gb {ram / GiB:g} asks for {asked} contexts of {g(one.context_ram)} GiB, but "
                        f"two need {g(need)} GiB of {'GPU' if gpu else 'host'} memory for {context} tokens each, "
                        f"{g(have)} GiB {'free' if gpu else 'available'}; serve one context (no --context-ram-gb) "
                        f"or plan shorter ones (--max-context)")
    lo, hi = (asked, asked) if _fits(plan(asked)) else (2, asked)  # the most that fit: lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits(plan(mid)) else (lo, mid)
    return replace(plan(lo), contexts_asked=asked)


def _max_context_hint(cfg: ModelConfig, dtype: torch.dtype, context: int, res: Resources, kw: dict) -> str:
    """'; try --max-context N' with the largest context (a multiple of 1024, at most the model's) that fits, if any."""
    hi = min(context, cfg.max_position_embeddings)
    step = 1024 if hi > 8192 else 64
    lo = hi if hi < context and _fits(_layout(cfg, dtype, hi, res, **kw)) else 0
    while hi - lo > step:
        mid = (lo + hi) // 2
        if _fits(_layout(cfg, dtype, mid, res, **kw)):
            lo = mid
        else:
            hi = mid
    if lo != min(context, cfg.max_position_embeddings):
        lo = lo // step * step
    if lo <= kw["new_tokens"] or not _fits(_layout(cfg, dtype, lo, res, **kw)):
        return "; the model does not fit even with a short context (try a smaller --budget, a smaller --dtype or more GPUs)"
    return f"; try --max-context {lo}"
