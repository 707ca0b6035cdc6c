"""The engine's knobs (retrieval budget, speculation lengths, draft cache shape, re-retrieval), checked once."""
from __future__ import annotations

from dataclasses import dataclass

from .caches.full import RECENT_QUERIES
from .errors import UserError


@dataclass(frozen=True)
class EngineSettings:
    budget: int = 4096  # retrieval-cache tokens (L2)
    chunk_size: int = 8
    gamma: int = 6  # L2 tokens per L3 pass
    draft_gamma: int = 4  # L1 tokens per L2 check
    sinks: int = 16  # StreamingLLM sinks (L1)
    window: int = 256  # StreamingLLM total cache rows (L1)
    refresh_every: int = 0  # rebuild the retrieval selection every N L3 passes (0: never)
    refresh_below: float = 0.0  # ... or when L3's acceptance of L2 over the last REFRESH_WINDOW passes is below this
    pipeline: str = "off"  # draft the next round during the L3 pass: on, off, auto (on when the cache is offloaded)

    def __post_init__(self) -> None:
        if self.refresh_every < 0 or not 0 <= self.refresh_below <= 1:
            raise UserError(f"--refresh-every must be >= 0 and --refresh-below in [0, 1], got "
                            f"{self.refresh_every}, {self.refresh_below}")
        if self.pipeline not in ("on", "off", "auto"):
            raise UserError(f"--pipeline must be on, off or auto, got {self.pipeline!r}")
        if self.chunk_size <= 0:
            raise UserError(f"--chunk-size must be positive, got {self.chunk_size}")
        if self.gamma <= 0 or self.draft_gamma <= 0:
            raise UserError(f"--gamma and --draft-gamma must be positive, got {self.gamma}, {self.draft_gamma}")
        if self.gamma >= RECENT_QUERIES:  # an L3 pass's query rows are kept for re-retrieval
            raise UserError(f"--gamma must be below {RECENT_QUERIES}, got {self.gamma}")
        if self.budget < 2 * self.chunk_size:
            raise UserError(f"--budget {self.budget} must hold at least 2 chunks of --chunk-size {self.chunk_size}")

    def check_draft(self) -> None:
        """The draft's StreamingLLM cache must hold a round's rollback (only checked when there is a draft)."""
        if self.window - self.sinks <= 2 * (self.gamma + self.draft_gamma):
            raise UserError(f"--window {self.window} minus --sinks {self.sinks} must exceed "
                            f"2 x (gamma + draft-gamma) = {2 * (self.gamma + self.draft_gamma)}")
