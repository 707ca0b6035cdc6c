"""A persistent store of the full cache's K/V rows, keyed by token prefix: a long document is
prefilled once, then restored from disk on every later open (another question, a restart).

The rows are kept in blocks of BLOCK tokens, one file each (kv_blocks.py: the file format, the
chained keys and every check). A context finds its longest cached prefix by walking its blocks until
one is missing, and a longer version of a document reuses the blocks it shares. A block that does
not check out (corrupt, truncated, another model, dtype, weights or format) is skipped with one
warning line and deleted; the caller prefills from there as if cold, so a bad file can cost time,
never a wrong token. Writes go to a temporary file renamed into place: a reader or a second writer
never sees half a block. A full disk is a warning; generation goes on. The store keeps under a byte
limit by deleting the least recently used blocks (a read refreshes a block's time).
`python -m offload_runtime.kv_store DIR` lists, trims or clears a store.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .caches.base import FullKVCache
from .errors import OneLineParser, UserError, error_line
from .kv_blocks import (BLOCK, FORMAT, SUFFIX, BadBlock, BlockFiles, atomic_write, block_keys, digest_of,
                        model_fingerprint)
from .model import CausalLM


def _warn(message: str) -> None:
    print(f"warning: kv store: {message}", file=sys.stderr, flush=True)


class KVStore:
    """One model's blocks in a store folder: the longest cached prefix of a context, restored into a
    full cache; new whole blocks saved; the folder kept under `max_bytes` (least recently used first)."""

    def __init__(self, root: str | Path, model: CausalLM, max_bytes: int | None = None,
                 warn: Callable[[str], None] = _warn) -> None:
        """root: the store's folder (created); one subfolder per model fingerprint."""
        self.fingerprint = model_fingerprint(model)
        self.digest = digest_of(self.fingerprint)
        self.files = BlockFiles(model, self.digest)
        self.root = Path(root)
        self.dir = self.root / f"v{FORMAT}" / self.digest[:32]
        self.max_bytes, self.warn = max_bytes, warn
        self.saves_failed = False  # (a full disk warns once, then the store only reads)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            manifest = self.dir / "model.json"
            if not manifest.exists():
                atomic_write(manifest, json.dumps(self.fingerprint, indent=1).encode())
        except OSError as exc:
            self.warn(f"cannot use {self.dir}: {exc.strerror or exc}; documents are prefilled as usual")
            self.saves_failed = True

    # -- lookup and restore ----------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        return self.dir / f"{key}{SUFFIX}"

    def cached_prefix(self, tokens: list[int]) -> int:
        """Tokens of `tokens` whose rows the store holds (a whole number of blocks; files not yet read)."""
        n = 0
        for key in block_keys(self.digest, tokens):
            if not self.path(key).exists():
                break
            n += BLOCK
        return n

    def restore(self, cache: FullKVCache, tokens: list[int], limit: int) -> int:
        """Append to `cache` (holding tokens[:cache.length]) the stored rows of tokens[cache.length:n],
        n = the cached prefix, at most `limit`; return the rows appended. A block that fails its checks
        is deleted with a warning and the restore stops there (the rest is prefilled)."""
        keys = block_keys(self.digest, tokens[:limit])
        start = cache.length
        loaded: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for i in range(start // BLOCK, len(keys)):
            try:
                loaded.append(self._read(keys[i], keys[i - 1] if i else self.digest, tokens[i * BLOCK:(i + 1) * BLOCK]))
            except BadBlock as exc:
                self.warn(f"skipped a block ({exc}); prefilling from token {i * BLOCK}")
                self.path(keys[i]).unlink(missing_ok=True)
                break
            except FileNotFoundError:
                break
        stop = (start // BLOCK + len(loaded)) * BLOCK
        if stop <= start:
            return 0
        _append_rows(cache, loaded, start - (start // BLOCK) * BLOCK, stop - start)
        return stop - start

    def _read(self, key: str, prev: str, tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One block's rows per layer after every check; its time refreshed (least recently used goes first)."""
        path = self.path(key)
        rows = self.files.read(path, prev, tokens)
        os.utime(path)
        return rows

    # -- save ------------------------------------------------------------------------------------------
    def save(self, cache: FullKVCache, tokens: list[int]) -> int:
        """Store every full block of rows [0, cache.length) the store lacks; return blocks written."""
        if self.saves_failed:
            return 0
        keys = block_keys(self.digest, tokens[: cache.length])
        written = 0
        for i, key in enumerate(keys):
            if self.path(key).exists():
                continue
            try:
                atomic_write(self.path(key), self.files.encode(cache, i, keys[i - 1] if i else self.digest,
                                                               tokens[i * BLOCK:(i + 1) * BLOCK]))
            except OSError as exc:
                self.warn(f"cannot write to {self.dir} ({exc.strerror or exc}); generation goes on without saving")
                self.saves_failed = True
                break
            written += 1
        if written and self.max_bytes is not None:
            evict(self.root, self.max_bytes)
        return written


def _append_rows(cache: FullKVCache, blocks: list[list[tuple[torch.Tensor, torch.Tensor]]], skip: int,
                 n: int) -> None:
    """Write n rows (the blocks' rows after the first `skip`) after cache.length, a layer at a time,
    as the layer-major prefill does (open_layer / close_layer / advance)."""
    start = cache.length
    with torch.inference_mode():
        for layer in range(len(blocks[0])):
            k_buf, v_buf = cache.open_layer(layer, n)
            row = start
            for i, blk in enumerate(blocks):  # block by block into the cache's rows (no concatenated copy)
                a = skip if i == 0 else 0
                k_buf[:, row:row + BLOCK - a] = blk[layer][0][:, a:].to(k_buf.device, non_blocking=True)
                v_buf[:, row:row + BLOCK - a] = blk[layer][1][:, a:].to(v_buf.device, non_blocking=True)
                row += BLOCK - a
            cache.close_layer(layer, start, start + n)
        cache.advance(n)


# -- the store as a whole: list, evict, clear -------------------------------------------------------
def _blocks(root: Path) -> list[Path]:
    return sorted(root.glob(f"v*/*/*{SUFFIX}"))


def evict(root: str | Path, max_bytes: int) -> int:
    """Delete the least recently used blocks until the store holds at most max_bytes; blocks deleted."""
    files = []
    for p in _blocks(Path(root)):
        try:
            st = p.stat()
        except FileNotFoundError:  # (another process evicted it)
            continue
        files.append((st.st_mtime, st.st_size, p))
    total, gone = sum(s for _, s, _ in files), 0
    for _, size, p in sorted(files, key=lambda f: f[0]):
        if total <= max_bytes:
            break
        p.unlink(missing_ok=True)
        total, gone = total - size, gone + 1
    return gone


def describe(root: str | Path) -> list[dict]:
    """One entry per model in the store: its fingerprint, blocks, bytes and last use."""
    out = []
    for d in sorted(Path(root).glob("v*/*")):
        files = list(d.glob(f"*{SUFFIX}"))
        try:
            model = json.loads((d / "model.json").read_text())
        except (OSError, ValueError):
            model = None
        stats = [p.stat() for p in files]
        out.append({"folder": str(d), "model": model, "blocks": len(files), "tokens": len(files) * BLOCK,
                    "bytes": sum(s.st_size for s in stats),
                    "last_used": max((s.st_mtime for s in stats), default=None)})
    return out


def clear(root: str | Path) -> int:
    """Delete every block and model folder of the store; blocks deleted."""
    files = _blocks(Path(root))
    for p in files:
        p.unlink(missing_ok=True)
    for d in Path(root).glob("v*/*"):
        for p in d.iterdir():
            p.unlink(missing_ok=True)
        d.rmdir()
    return len(files)


def main(argv: list[str] | None = None) -> int:
    """python -m offload_runtime.kv_store DIR [--clear | --max-gb N]: list (default), clear or trim a store."""
    p = OneLineParser(prog="python -m offload_runtime.kv_store", description=main.__doc__)
    p.add_argument("store", help="the folder given to --kv-store")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--clear", action="store_true", help="delete everything in the store")
    action.add_argument("--max-gb", type=float, help="delete least recently used blocks down to this size")
    try:
        args = p.parse_args(argv)
        if args.max_gb is not None and not (args.max_gb >= 0 and args.max_gb != float("inf")):
            raise UserError(f"--max-gb must be a number of GB >= 0, got {args.max_gb}")
        if not Path(args.store).is_dir():
            raise UserError(f"{args.store} is not a folder")
    except UserError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    if args.clear:
        print(f"deleted {blocks(clear(args.store))}")
        return 0
    if args.max_gb is not None:
        print(f"deleted {blocks(evict(args.store, int(args.max_gb * 2**30)))}")
    models = [e for e in describe(args.store) if e["blocks"]]
    if not models:
        print(f"{args.store}: empty (no blocks)")
    for e in models:
        m = e["model"] or {}
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"])) if e["last_used"] else "-"
        print(f"{e['folder']}: {m.get('config', {}).get('model_type', '?')} {m.get('dtype', '?')}, "
              f"{blocks(e['blocks'])} ({e['tokens']} tokens), {e['bytes'] / 2**30:.2f} GiB, last used {used}")
    return 0


def blocks(n: int) -> str:
    """'1 block', '2 blocks'."""
    return f"{n} block" + ("" if n == 1 else "s")


if __name__ == "__main__":
    sys.exit(main())
