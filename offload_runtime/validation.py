"""Checks of a request that need no weights: each problem becomes one UserError line (exit 2).

cli_args.py checks the flags right after parsing (before transformers is even imported, with
`check_text` and `kernel_setting` from here); run.py calls `check_text` on every prompt and document,
launch.py `check_kernels` once the device is known and `check_max_context` once the model's config is
read: a bad request is refused before any model loads.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

from .errors import UserError


def check_text(text: str, what: str) -> str:
    """Text a tokenizer can take: valid Unicode (no undecodable bytes) and not blank."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in argv or stdin arrive as lone surrogates
        raise UserError(f"{what} is not valid UTF-8 text") from None
    if not text.strip():
        raise UserError(f"{what} is empty")
    return text


def read_text(path: str, what: str) -> str:
    """A prompt or document file: a readable, regular, non-empty UTF-8 text file."""
    f = Path(path).expanduser()
    if not f.exists():
        raise UserError(f"{what} {path} does not exist")
    if f.is_dir():
        raise UserError(f"{what} {path} is a directory, not a file")
    if not f.is_file():
        raise UserError(f"{what} {path} is not a regular file (a device, pipe or socket)")
    try:
        data = f.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if b"\x00" in data:
        raise UserError(f"{what} {path} is binary, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None
    if not text.strip():
        raise UserError(f"{what} {path} is empty")
    return text


def kernel_setting() -> str:
    """OFFLOAD_RUNTIME_KERNELS, refused here (not at the first attention call) when unknown."""
    from .kernels import MODES, kernel_mode

    try:
        return kernel_mode()
    except ValueError:
        value = os.environ.get("OFFLOAD_RUNTIME_KERNELS", "")
        raise UserError(f"OFFLOAD_RUNTIME_KERNELS={value!r} is not one of {', '.join(MODES)}") from None


def check_kernels(device: Any) -> None:
    """OFFLOAD_RUNTIME_KERNELS=triton needs Triton installed and CUDA (or its interpreter, TRITON_INTERPRET=1)."""
    if kernel_setting() != "triton":
        return
    from .kernels import triton_available

    if not triton_available():
        raise UserError("OFFLOAD_RUNTIME_KERNELS=triton, but the `triton` package is not installed "
                        "(unset it, or set it to auto or reference)")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError(f"OFFLOAD_RUNTIME_KERNELS=triton cannot run on {device.type}: it needs a CUDA device "
                        "or TRITON_INTERPRET=1 (unset it, or set it to auto or reference)")


def check_max_context(max_context: int | None, model_context: int) -> None:
    if max_context is not None and max_context > model_context:
        raise UserError(f"--max-context {max_context} is above the model's context of {model_context} tokens "
                        "(max_position_embeddings)")


def check_emulated_link(memory: Any, device: Any) -> None:
    """--emulate-link: a positive, finite GB/s, on the CPU, with the cache offloaded. `memory`: the
    configuration's memory part (run_config.Memory: its emulate_link and offload)."""
    gbps = memory.emulate_link
    if gbps is None:
        return
    if not (gbps > 0 and math.isfinite(gbps)):
        raise UserError(f"--emulate-link must be a positive GB/s, a finite number: got {gbps:g}")
    if device.type != "cpu":
        raise UserError("--emulate-link emulates a GPU's link on the CPU: use it with --device cpu")
    if memory.offload == "off":
        raise UserError("--emulate-link streams the cache over the emulated link: it cannot be used with --offload off")


LINK_WARN_S = 10.0  # one pass over the emulated link longer than this: a warning with the time it takes
LINK_REFUSE_S = 3600.0  # longer than this: refused (every generated token needs about one pass)


def check_link_time(gbps: float | None, pass_bytes: int) -> None:
    """Refuse an --emulate-link so slow that one pass over the offloaded cache (`pass_bytes`, what every
    L3 pass copies at the planned context) takes over an hour; warn, with the time, above 10 s."""
    if gbps is None or pass_bytes <= 0:
        return
    seconds = pass_bytes / (gbps * 1e9)
    what = f"--emulate-link {gbps:g}: one pass over the offloaded cache ({pass_bytes / 1e6:.3g} MB) takes " \
           f"{duration(seconds)}"
    if seconds > LINK_REFUSE_S:
        raise UserError(f"{what}; the slowest link accepted for this run is {pass_bytes / LINK_REFUSE_S / 1e9:.2g} "
                        "GB/s (one pass an hour)")
    if seconds > LINK_WARN_S:
        print(f"warning: {what} (every generated token needs about one); Ctrl-C stops the run", file=sys.stderr)


def duration(seconds: float) -> str:
    """'42 s', '9.2 minutes', '6.4 days'."""
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.2g} {unit}"
    return f"{seconds:.2g} s"
