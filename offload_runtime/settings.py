"""The engine's knobs (retrieval budget, speculation lengths, draft cache shape, re-retrieval), checked once."""
from __future__ import annotations

from dataclasses import dataclass

from .caches.base import RECENT_QUERIES
from .caches.selection import SCORERS
from .errors import UserError

AUTO_MAX_GAMMA = 16  # the largest gamma the adaptive controller chooses (fixed values go to RECENT_QUERIES - 1)
AUTO_MAX_DRAFT_GAMMA = 8


@dataclass(frozen=True)
class EngineSettings:
    budget: int = 4096  # retrieval-cache tokens (L2)
    chunk_size: int = 8
    gamma: int | None = None  # L2 tokens per L3 pass (None: chosen every round, see adaptive.py)
    draft_gamma: int | None = None  # L1 tokens per L2 check (None: chosen every round)
    sinks: int = 16  # StreamingLLM sinks (L1)
    window: int = 256  # StreamingLLM total cache rows (L1)
    refresh_every: int = 0  # rebuild the retrieval selection every N L3 passes (0: never)
    refresh_below: float = 0.0  # ... or when L3's acceptance of L2 over the last REFRESH_WINDOW passes is below this
    pipeline: str = "off"  # draft the next round during the L3 pass: on, off, auto (on when the cache is offloaded)
    selection: str = "best-key"  # how L2 scores chunks (caches/selection.py); the others are benchmark baselines

    def __post_init__(self) -> None:
        if self.refresh_every < 0 or not 0 <= self.refresh_below <= 1:
            raise UserError(f"--refresh-every must be >= 0 and --refresh-below in [0, 1], got "
                            f"{self.refresh_every}, {self.refresh_below}")
        if self.pipeline not in ("on", "off", "auto"):
            raise UserError(f"--pipeline must be on, off or auto, got {self.pipeline!r}")
        if self.selection not in SCORERS:
            raise UserError(f"selection must be one of {', '.join(SCORERS)}, got {self.selection!r}")
        if self.chunk_size <= 0:
            raise UserError(f"--chunk-size must be positive, got {self.chunk_size}")
        if (self.gamma or 1) <= 0 or (self.draft_gamma or 1) <= 0:
            raise UserError(f"--gamma and --draft-gamma must be positive, got {self.gamma}, {self.draft_gamma}")
        if (self.gamma or 0) >= RECENT_QUERIES:  # an L3 pass's query rows are kept for re-retrieval
            raise UserError(f"--gamma must be below {RECENT_QUERIES}, got {self.gamma}")
        if self.budget < 2 * self.chunk_size:
            raise UserError(f"--budget {self.budget} must hold at least 2 chunks of --chunk-size {self.chunk_size}")

    @property
    def adaptive(self) -> bool:
        """Is some gamma chosen every round (None)? With a draft, either; without, gamma alone matters."""
        return self.gamma is None or self.draft_gamma is None

    @property
    def max_gamma(self) -> int:
        """The largest gamma a round may use (the fixed one, or the controller's cap): capacity planning."""
        return self.gamma or AUTO_MAX_GAMMA

    def gamma_limits(self, has_draft: bool) -> tuple[int, int]:
        """(gamma, draft gamma) caps of the controller: the fixed values, else AUTO_MAX_*, shrunk with a
        draft so that a round's rollback fits the draft's StreamingLLM window (see check_draft)."""
        if not has_draft:
            return self.max_gamma, self.draft_gamma or AUTO_MAX_DRAFT_GAMMA
        room = (self.window - self.sinks - 1) // 2  # gamma + draft gamma must stay within it
        draft = self.draft_gamma or max(1, min(AUTO_MAX_DRAFT_GAMMA, room // 3, room - (self.gamma or 1)))
        return self.gamma or max(1, min(AUTO_MAX_GAMMA, room - draft)), draft

    def check_draft(self) -> None:
        """The draft's StreamingLLM cache must hold a round's rollback (only checked when there is a draft)."""
        gamma, draft = self.gamma_limits(True)
        if self.window - self.sinks <= 2 * (gamma + draft):
            raise UserError(f"--window {self.window} minus --sinks {self.sinks} must exceed "
                            f"2 x (gamma + draft-gamma) = {2 * (gamma + draft)}")
