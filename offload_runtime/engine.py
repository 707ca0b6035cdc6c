"""The engine's public face: settings, the Session, single-shot generation, the draft check.

Where things live (docs/ARCHITECTURE.md has the whole map):
- session.py: Session, the decode loop (one round policy call site, one autoregressive step);
- context.py: the context's tokens and the target's caches, the one prefill dispatch;
- triforce.py: the TriForce round (L1 DraftLevel, L2 drafting, L3 verification, re-retrieval);
- policy.py: the per-round choice (FixedPolicy by default); sampler.py: tokens, TP agreement;
- generate.py: single-shot generation (a Session for one prompt).
"""
from __future__ import annotations

from .generate import generate_autoregressive, generate_triforce
from .policy import FixedPolicy, RoundChoice, RoundOutcome, RoundPolicy
from .request import GenerationResult
from .session import Session
from .settings import EngineSettings
from .stats import Stats
from .triforce import REFRESH_WINDOW, DraftLevel
from .vocabulary import check_same_vocabulary

__all__ = ["EngineSettings", "Session", "generate_triforce", "generate_autoregressive", "GenerationResult",
           "check_same_vocabulary", "DraftLevel", "Stats", "REFRESH_WINDOW", "RoundPolicy", "RoundChoice",
           "RoundOutcome", "FixedPolicy"]


