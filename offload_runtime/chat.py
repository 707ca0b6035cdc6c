"""Long-context chat: load a document once, then ask many questions, reusing the caches.

Turns are formatted by chat_format.py (the tokenizer's chat template, the document as a system
message; or a plain "User:/Assistant:" layout). Each turn appends only its own tokens to the
session and prefills only those: the document is prefilled once. Ctrl-C during an answer stops
that answer and keeps the session. The interactive loop and its commands: chat_loop.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .chat_format import ChatFormat
from .errors import UserError
from .session import Session


@dataclass
class Turn:
    user: str
    answer: str = ""
    token_ids: list[int] = field(default_factory=list)
    turn_token_ids: list[int] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    interrupted: bool = False


class ChatSession:
    """A conversation over one Session: a document prefix, then user turns and answers."""

    def __init__(self, session: Session, tokenizer: Any, document: str | None = None,
                 max_new_tokens: int = 256, progress: Callable[[int, int], None] | None = None,
                 max_context: int | None = None) -> None:
        """max_context: --max-context, a limit below the model's (and the planned cache's) context."""
        self.session, self.tokenizer, self.document = session, tokenizer, document
        self.max_context = max_context
        self.format = ChatFormat(tokenizer)
        self.max_new_tokens = max_new_tokens
        self.turns: list[Turn] = []
        self.document_prefills = 0
        self.session.progress = progress
        prefix = self.format.prefix_text(document)
        self.prefix_ids = self.format.encode(prefix, first=True)
        self.known_text = prefix
        self.messages = self.format.document_messages(document)
        if self.prefix_ids:
            self._check_fits(len(self.prefix_ids), "the document")
            self.session.extend(self.prefix_ids)
            self.document_prefills += 1

    def _limit(self) -> tuple[int, str]:
        """The tokens this chat may hold, and where that limit comes from (for the refusal)."""
        model = self.session.target.cfg.max_position_embeddings
        limit, source = model, f"the model's context is {model} (max_position_embeddings)"
        if self.session.max_context < limit:
            limit, source = self.session.max_context, f"the planned cache holds {self.session.max_context} " \
                                                      "(raise with --max-context)"
        if self.max_context is not None and self.max_context <= limit:
            limit, source = self.max_context, f"--max-context is {self.max_context}"
        return limit, source

    def _check_fits(self, n_new: int, what: str) -> None:
        limit, source = self._limit()
        need = len(self.session.context) + n_new + self.max_new_tokens
        if need > limit:
            raise UserError(f"{what} needs {need} tokens of context ({len(self.session.context)} held + {n_new} new "
                            f"+ {self.max_new_tokens} to answer), but {source}: over by {need - limit}")

    def _encode_turn(self, content: str) -> tuple[str, list[int]]:
        """The turn's text and token ids; any failure of the template or tokenizer refuses the turn."""
        try:
            text = self.format.turn_text(self.messages, self.known_text, content)
            return text, self.format.encode(text, first=not self.session.context)
        except Exception as exc:  # jinja's raise_exception, a tokenizer rejecting the text...
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"cannot tokenise this turn: {reason}") from None

    def ask(self, user: str, on_tokens: Callable[[list[int]], None] | None = None) -> Turn:
        """Prefill the turn's tokens and generate the answer.

        UserError if the turn cannot fit (the session is unchanged). Ctrl-C during the
        answer ends it there (the partial answer stays in the conversation); Ctrl-C during
        the turn's prefill cancels the turn and re-raises.
        """
        content = f"{self.document}\n\n{user}" if self._document_in_first_turn() else user
        text, ids = self._encode_turn(content)
        self._check_fits(len(ids), "this turn")
        turn = Turn(user=user, turn_token_ids=ids)
        start = len(self.session.context)
        try:
            self.session.extend(ids)
        except KeyboardInterrupt:
            self.session.truncate(start)
            close = getattr(self.session.progress, "close", None)
            if close:  # the progress bar of the cancelled prefill
                close()
            raise
        if self._document_in_first_turn():
            self.document_prefills += 1

        def collect(tokens: list[int]) -> None:
            turn.token_ids.extend(tokens)
            if on_tokens:
                on_tokens(tokens)

        try:
            turn.stats = self.session.generate(self.max_new_tokens, collect).stats
        except KeyboardInterrupt:
            turn.interrupted = True
        turn.answer = self.tokenizer.decode(turn.token_ids, skip_special_tokens=True)
        self.known_text += text + self.tokenizer.decode(turn.token_ids, skip_special_tokens=False)
        self.messages += [{"role": "user", "content": content}, {"role": "assistant", "content": turn.answer}]
        self.turns.append(turn)
        return turn

    def _document_in_first_turn(self) -> bool:
        """Templates without a usable system role get the document in the first user message."""
        return bool(self.document) and self.format.templated and not self.format.system_document \
            and not any(m["role"] == "user" for m in self.messages)

    def reset(self) -> None:
        """Back to the document alone: the caches keep its rows, so nothing is prefilled again."""
        self.session.truncate(len(self.prefix_ids))
        self.known_text = self.format.prefix_text(self.document)
        self.messages = self.format.document_messages(self.document)
        self.turns = []

    def stats(self) -> dict:
        s = self.session.stats.as_dict()
        s.update({"turns": len(self.turns), "context_tokens": len(self.session.context),
                  "document_tokens": len(self.prefix_ids), "document_prefills": self.document_prefills})
        return s

    def transcript(self) -> dict:
        return {"document_tokens": len(self.prefix_ids),
                "turns": [{"user": t.user, "assistant": t.answer, "interrupted": t.interrupted, "stats": t.stats}
                          for t in self.turns]}
