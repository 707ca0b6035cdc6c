"""Terminal output: text streamed as tokens are accepted, and a prefill progress bar (stderr)."""
from __future__ import annotations

import sys
from typing import Any, TextIO


class TextStreamer:
    """Prints decoded text as tokens arrive (decoding the whole answer, so merges come out right)."""

    def __init__(self, tokenizer: Any, out: TextIO | None = None) -> None:
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, tokens: list[int]) -> None:
        self.ids.extend(tokens)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def finish(self) -> None:
        self.out.write("\n")
        self.out.flush()


class PrefillProgress:
    """A tqdm bar on stderr (tokens, tokens/s, ETA) for prefills longer than `min_tokens`."""

    def __init__(self, min_tokens: int = 2048, desc: str = "prefill") -> None:
        self.min_tokens, self.desc = min_tokens, desc
        self.bar: Any = None
        self.last = 0

    def __call__(self, done: int, total: int) -> None:
        if total < self.min_tokens:
            return
        if self.bar is None or done < self.last:
            from tqdm import tqdm

            self.close()
            self.bar = tqdm(total=total, unit="tok", desc=self.desc, file=sys.stderr, leave=False)
        self.bar.update(done - self.last)
        self.last = done
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.last = None, 0


def answer_summary(stats: dict, lead: list[str] | None = None) -> str:
    """One line after an answer: tokens, rows restored from the KV store, prefill, speed, tokens per L3 pass,
    offload traffic."""
    n = stats.get("new_tokens")
    parts = list(lead or []) + [f"{n} token" if n == 1 else f"{n} tokens"]
    if stats.get("restored_tokens"):
        parts.append(f"restored {stats['restored_tokens']} tok")
    if stats.get("prefill_s"):
        parts.append(f"prefill {stats.get('prefilled_tokens', 0)} tok in {stats['prefill_s']:.2f}s")
    if stats.get("decode_tokens_per_s"):
        parts.append(f"{stats['decode_tokens_per_s']:.2f} tok/s")
    if stats.get("mean_accepted_per_pass") is not None:
        parts.append(f"{stats['mean_accepted_per_pass']:.2f} tok/L3 pass")
    if stats.get("offloaded_layers"):
        parts.append(f"{stats['offloaded_layers']} layers offloaded")
        if stats.get("h2d_bytes_per_token"):
            parts.append(f"H2D {stats['h2d_bytes_per_token'] / 2**20:.1f} MiB/tok")
        if stats.get("h2d_gbps"):
            link = f" ({stats['link_fraction']:.0%} of link)" if stats.get("link_fraction") else ""
            parts.append(f"{stats['h2d_gbps']:.1f} GB/s{link}")
    return "[" + ", ".join(parts) + "]"
