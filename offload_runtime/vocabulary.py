"""Whether a draft can speculate for a target: decided by the ids the models can emit.

A model can emit any id below its `vocab_size` (its embedding and lm_head rows), whatever its
tokenizer's length. The pair is compatible when every id both models can emit names the same
token in both tokenizers, and every id only the target can emit is padding (no token in the
target's tokenizer): the draft is fed a placeholder for such an id, which only lowers
acceptance (verification keeps the output the target's). Tokenizer entries beyond both
models' rows (transformers' Qwen2 tokenizer appends `<|endoftext|>` to any vocabulary) are
never emitted and do not count.
"""
from __future__ import annotations

from typing import Any

from .errors import UserError

PLACEHOLDER_ID = 0  # what the draft is fed for a target id it has no row for (target padding)


def check_same_vocabulary(target: Any, draft: Any) -> None:
    """UserError (one line) unless `draft` can speculate for `target` (LoadedModels: model + tokenizer)."""
    tv, dv = target.model.cfg.vocab_size, draft.model.cfg.vocab_size
    tt, dt = target.tokenizer, draft.tokenizer
    shared = min(tv, dv)
    a, b = _tokens(tt, shared), _tokens(dt, shared)
    if a != b:
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        raise UserError(f"draft and target tokenizers map id {i} to different tokens ({b[i]!r} vs {a[i]!r}): "
                        "vocabularies differ")
    if tv > dv:
        extra = [(i, t) for i, t in enumerate(_tokens(tt, tv)[dv:], start=dv) if t is not None]
        if extra:
            i, t = extra[0]
            raise UserError(f"the target can emit token {t!r} (id {i}) but the draft has only {dv} embedding rows: "
                            "vocabularies differ")


def _tokens(tokenizer: Any, n: int) -> list[str | None]:
    """The token of each id below n (None where the tokenizer has none: a padded embedding row)."""
    size = len(tokenizer)
    known = tokenizer.convert_ids_to_tokens(list(range(min(n, size))))
    return list(known) + [None] * max(0, n - size)
