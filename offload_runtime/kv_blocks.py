"""The KV store's block files (kv_store.py keeps the index, the LRU limit and the CLI): the model's
fingerprint, the chained block keys, and a block's bytes written and read back with every check.

A block holds BLOCK tokens' K/V rows of every layer. Its key is a hash chained over the model's
fingerprint and every token of blocks 0..i (as vLLM keys its prefix-cache blocks). The file: MAGIC, the
header's length, a JSON header (format version, the fingerprint's digest, the previous key, the block's
token ids, shapes, dtype, a CRC32 per layer), then the raw K/V rows layer after layer. Reading checks
each of these and raises BadBlock (the message says why) for a file that does not check out.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .caches.base import FullKVCache
from .model import CausalLM

FORMAT = 1
BLOCK = 256  # tokens per block
MAGIC = b"ORKVSTR1"
SUFFIX = ".kvb"
_SAMPLE = 4096  # elements of each weight tensor in the weights digest


def model_fingerprint(model: CausalLM) -> dict:
    """What makes cached rows valid for a model: its shape, RoPE, dtype and a digest of its weights
    (a strided sample of every tensor: a swapped or retrained checkpoint changes it)."""
    cfg, hf = model.cfg, model.cfg.hf_config
    digest = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE].float().cpu()
            digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            digest.update(sample.numpy().tobytes())
    rope = {k: getattr(hf, k, None) for k in ("rope_parameters", "rope_scaling", "rope_theta")}
    shape = {k: getattr(cfg, k) for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                          "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                          "max_position_embeddings")}
    shape["sliding_windows"] = list(cfg.sliding_windows)
    return {"format": FORMAT, "config": shape, "rope": json.loads(json.dumps(rope, default=str)),
            "dtype": str(model.dtype).replace("torch.", ""), "weights": digest.hexdigest()}


def digest_of(obj: object) -> str:
    """The fingerprint's digest: what block keys chain from and block headers name."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def block_keys(fingerprint_digest: str, tokens: list[int]) -> list[str]:
    """Chained keys of the full blocks of `tokens`: key i commits to the model and tokens[:(i+1)*BLOCK]."""
    keys, prev = [], fingerprint_digest
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        h = hashlib.sha256(prev.encode())
        h.update(struct.pack(f"<{BLOCK}q", *tokens[start:start + BLOCK]))
        prev = h.hexdigest()
        keys.append(prev)
    return keys


@dataclass
class BlockHeader:
    format: int
    fingerprint: str
    prev: str
    tokens: list[int]
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    crc: list[int]  # CRC32 of each layer's K then V bytes

    def layer_bytes(self) -> int:
        item = torch.empty(0, dtype=getattr(torch, self.dtype)).element_size()
        return 2 * self.kv_heads * BLOCK * self.head_dim * item


class BadBlock(Exception):
    """A block file that does not check out (the message says why)."""


class BlockFiles:
    """One model's block files: written from a cache's rows, read back after every check (the header
    against this model, the key chain and tokens, each layer's CRC, the length)."""

    def __init__(self, model: CausalLM, fingerprint_digest: str) -> None:
        self.cfg, self.dtype, self.digest = model.cfg, model.dtype, fingerprint_digest
        self.dtype_name = str(model.dtype).replace("torch.", "")

    def read(self, path: Path, prev: str, tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One block's rows per layer, (K, V) [Hkv, BLOCK, D]; BadBlock if any check fails."""
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
                raise BadBlock(f"{path.name}: not a block file")
            (n,) = struct.unpack("<Q", head[len(MAGIC):])
            try:
                h = BlockHeader(**json.loads(f.read(min(n, 1 << 20))))
            except (ValueError, TypeError) as exc:
                raise BadBlock(f"{path.name}: unreadable header ({exc})") from None
            self._check(h, prev, tokens, path.name)
            size = h.layer_bytes()
            raw = torch.empty(h.layers, size, dtype=torch.uint8)  # read straight into tensor memory
            out = []
            for layer in range(h.layers):
                data = raw[layer].numpy()
                if f.readinto(data) < size:
                    raise BadBlock(f"{path.name}: truncated at layer {layer}")
                if zlib.crc32(data) != h.crc[layer]:
                    raise BadBlock(f"{path.name}: checksum mismatch in layer {layer}")
                kv = raw[layer].view(self.dtype).view(2, h.kv_heads, BLOCK, h.head_dim)
                out.append((kv[0], kv[1]))
            if f.read(1):
                raise BadBlock(f"{path.name}: trailing bytes")
        return out

    def _check(self, h: BlockHeader, prev: str, tokens: list[int], name: str) -> None:
        cfg = self.cfg
        if h.format != FORMAT:
            raise BadBlock(f"{name}: format {h.format}, this runtime reads {FORMAT}")
        if h.fingerprint != self.digest:
            raise BadBlock(f"{name}: written for another model, dtype or weights")
        if (h.layers, h.kv_heads, h.head_dim, h.dtype) != (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                                            self.dtype_name):
            raise BadBlock(f"{name}: shapes or dtype differ from the model's")
        if h.prev != prev or h.tokens != tokens or len(h.crc) != h.layers:
            raise BadBlock(f"{name}: its tokens are not this context's")

    def encode(self, cache: FullKVCache, i: int, prev: str, tokens: list[int]) -> list:
        """Block i of the cache's rows as the file's pieces, in order (written piece by piece: no joined copy)."""
        a, b = i * BLOCK, (i + 1) * BLOCK
        layers = []
        for layer in range(self.cfg.num_layers):
            k, v = cache.rows(layer, a, b)
            layers.append(torch.stack([k, v]).to("cpu").contiguous().view(torch.uint8).numpy())
        h = BlockHeader(FORMAT, self.digest, prev, list(tokens), self.cfg.num_layers, self.cfg.num_kv_heads,
                        self.cfg.head_dim, self.dtype_name, [zlib.crc32(x) for x in layers])
        header = json.dumps(h.__dict__).encode()
        return [MAGIC, struct.pack("<Q", len(header)), header, *layers]


def atomic_write(path: Path, parts: bytes | list) -> None:
    """Write `parts` (bytes-like, in order) to a temporary file beside `path`, then rename: readers see
    the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.writelines([parts] if isinstance(parts, bytes) else parts)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
