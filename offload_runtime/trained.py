"""The trained model pair shipped with the project (offload_runtime/assets/, see its README).

stories260K (a 260K-parameter Llama trained on TinyStories, 512-token context) and its weak
distilled draft stories260K-draft41K: small enough for the demo and the tests, trained, so
acceptance rates and text mean something. `story_prompt()` is a ~400-token story the demo
and the tests continue.
"""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
TARGET = ASSETS / "stories260K"
DRAFT = ASSETS / "stories260K-draft41K"
STORY = ASSETS / "story_prompt.txt"


def story_prompt() -> str:
    """The demo's story (written by stories260K itself from a short opening, see the assets README)."""
    return STORY.read_text(encoding="utf-8")
