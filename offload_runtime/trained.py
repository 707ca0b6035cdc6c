"""The trained model pair shipped with the project (offload_runtime/assets/, see its README).

stories260K (a 260K-parameter Llama trained on TinyStories, 512-token context) and its weak
distilled draft stories260K-draft41K: small enough for the demo and the tests, trained, so
acceptance rates and text mean something. `story_prompt()` is a ~400-token story the demo
and the tests continue.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

ASSETS = Path(__file__).resolve().parent / "assets"
TARGET = ASSETS / "stories260K"
DRAFT = ASSETS / "stories260K-draft41K"
STORY = ASSETS / "story_prompt.txt"
RECALL = ASSETS / "recall-320K"  # the long-range recall model (recall_task.py, train_recall.py)


def story_prompt() -> str:
    """The demo's story (written by stories260K itself from a short opening, see the assets README)."""
    return STORY.read_text(encoding="utf-8")


@contextmanager
def one_thread() -> Iterator[None]:
    """Run a 260K-parameter model on one CPU thread: its 64-wide matmuls are far too small to split,
    and on a busy machine a second thread only waits for a core (10x slower measured)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
