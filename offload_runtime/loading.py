"""Loading a checkpoint: resolve a path or hub id, read config, tokenizer and (sharded) safetensors.

Everything goes through transformers, huggingface_hub and safetensors' public APIs;
any problem a user can cause becomes a one-line UserError.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .config import ModelConfig
from .errors import UserError
from .fused import fuse_projections
from .model import CausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: Any
    eos_ids: list[int]
    path: Path


def resolve_checkpoint(name: str) -> Path:
    """A local directory as it is; otherwise a hub id resolved through huggingface_hub's cache."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model path {name} is not a directory")
        if not (path / "config.json").is_file():
            raise UserError(f"{name} has no config.json: not a transformers checkpoint directory")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"model path {name} does not exist")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise UserError(f"model {name} is not a local directory and not in the Hugging Face cache "
                        "(offline mode): pass a local checkpoint path")
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as exc:  # network, auth, unknown repo
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"could not fetch model {name} from the hub ({reason}): pass a local checkpoint path")


def load_hf_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        raw = _read_json(path / "config.json")
        from .config import SUPPORTED_MODEL_TYPES

        if not isinstance(raw, dict) or "model_type" not in raw:
            raise UserError(f"{path / 'config.json'} has no model_type (expected one of "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)})")
        mt = raw.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise UserError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        raise UserError(f"cannot read {path / 'config.json'}: {str(exc).splitlines()[0]}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}")


def checkpoint_dtype(path: Path, hf_config: Any) -> torch.dtype:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.bfloat16


def pick_dtype(requested: str, device: torch.device, path: Path, hf_config: Any) -> torch.dtype:
    """`auto`: the checkpoint's dtype on CUDA, float32 on CPU (bf16 matmuls are slow there)."""
    if requested == "auto":
        return checkpoint_dtype(path, hf_config) if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise UserError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {requested}")
    return DTYPES[requested]


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not names:
            raise UserError(f"{index} lists no weight files")
        files = [path / n for n in names]
        for f in files:
            if not f.is_file():
                raise UserError(f"missing safetensors shard {f.name} listed in {index.name}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    other = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    found = f" (found {', '.join(other[:2])}: only safetensors weights are read)" if other else ""
    raise UserError(f"the weights are missing: no model.safetensors or model.safetensors.index.json in {path}{found}")


def read_state_dict(files: list[Path], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key).to(device=device, dtype=dtype)
        except UserError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise UserError(f"cannot read weights {f.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return tensors


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> CausalLM:
    """Create the module without allocating, then adopt the checkpoint's tensors."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = set(model.state_dict().keys())
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
        state.pop("lm_head.weight", None)
    missing = sorted(expected - state.keys())
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise UserError(f"checkpoint is missing weights: {', '.join(missing[:3])}{more}")
    for key in list(state):
        if key not in expected:
            del state[key]  # e.g. rotary_emb.inv_freq buffers in old checkpoints
    for name, tensor in state.items():
        want = model.get_parameter(name).shape
        if tuple(tensor.shape) != tuple(want):
            raise UserError(f"weight {name} has shape {tuple(tensor.shape)}, config implies {tuple(want)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.rope.to(device)
    return model.eval().requires_grad_(False)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"no tokenizer in {path}: looked for {', '.join(TOKENIZER_FILES)}")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise UserError(f"cannot load the tokenizer from {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def eos_token_ids(path: Path, hf_config: Any, tokenizer: Any) -> list[int]:
    """EOS ids from generation_config.json, else the config, else the tokenizer."""
    ids: Any = None
    gen = path / "generation_config.json"
    if gen.is_file():
        ids = _read_json(gen).get("eos_token_id")
    if ids is None:
        ids = getattr(hf_config, "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


def load(name: str, device: torch.device, dtype: str = "auto", with_tokenizer: bool = True,
         transform: Callable[[CausalLM], Any] | None = None) -> LoadedModel:
    """Load a checkpoint onto `device`. With `transform` (e.g. tensor-parallel sharding) the
    weights are read into host memory, transformed there, and only the result moves to `device`."""
    path = resolve_checkpoint(name)
    hf_config = load_hf_config(path)
    cfg = ModelConfig.from_hf(hf_config)
    torch_dtype = pick_dtype(dtype, device, path, hf_config)
    staging = torch.device("cpu") if transform is not None else device
    state = read_state_dict(weight_files(path), staging, torch_dtype)
    model = build_model(cfg, state, staging, torch_dtype)
    del state  # the model holds the weights now: fusing below then frees each replaced one at once
    if transform is not None:
        transform(model)
        model.to(device)
        model.rope.to(device)
    fuse_projections(model)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the separate weights' blocks: no fused matrix fits in them
    tokenizer = load_tokenizer(path) if with_tokenizer else None
    return LoadedModel(model, tokenizer, eos_token_ids(path, hf_config, tokenizer), path)
