"""Long-context chat: load a document once, then ask many questions, reusing the caches.

Turns are formatted with the tokenizer's chat template (the document as a system
message); a tokenizer without one gets a plain "User:/Assistant:" layout. Each turn
appends only its own tokens to the session and prefills only those: the document is
prefilled once. Ctrl-C during an answer stops that answer and keeps the session.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from .session import Session
from .errors import UserError
from .validation import check_text

COMMANDS = {"/reset": "drop the conversation, keep the document", "/stats": "statistics of this session",
            "/save FILE": "write the transcript as JSON, never over an existing file",
            "/save! FILE": "the same, replacing FILE", "/exit": "leave"}


def plain_turn(known_text: str, user: str) -> str:
    """A user turn in the plain layout (no chat template), after the text so far."""
    sep = "" if not known_text or known_text.endswith("\n") else "\n"
    return f"{sep}User: {user}\nAssistant:"


class ChatFormat:
    """Turns messages into token ids incrementally, so a new turn is just the text it adds."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.system_document = self.templated and self._supports_system()

    def _supports_system(self) -> bool:
        """The document can be a system message if the template renders one as a stable prefix."""
        system = [{"role": "system", "content": "x"}]
        try:
            alone = self._render(system, False)
            return self._render(system + [{"role": "user", "content": "y"}], True).startswith(alone)
        except Exception:  # templates that reject a system role raise from jinja
            return False

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def describe(self) -> str:
        if self.templated:
            return "the tokenizer's chat template" + ("" if self.system_document else " (document in the first turn)")
        return "a plain 'User:/Assistant:' format (this tokenizer has no chat template)"

    def document_messages(self, document: str | None) -> list[dict]:
        if document and self.system_document:
            return [{"role": "system", "content": "Answer questions about this document.\n\n" + document}]
        return []

    def prefix_text(self, document: str | None) -> str:
        """Text before the first turn (what /reset keeps)."""
        if not self.templated:
            return f"Document:\n{document}\n\n" if document else ""
        messages = self.document_messages(document)
        return self._render(messages, False) if messages else ""

    def conversation(self, messages: list[dict]) -> str:
        """A whole conversation as text, ready for the assistant's answer (the server's prompts): the
        chat template, or the plain layout the chat writes turn by turn. A template may refuse an
        order of roles: its exception passes through."""
        if self.templated:
            return self._render(messages, True)
        text = ""
        for m in messages:
            if m["role"] == "system":
                text += m["content"] + "\n\n"
            elif m["role"] == "user":
                text += plain_turn(text, m["content"])
            else:
                text += m["content"]
        return text

    def turn_text(self, messages: list[dict], known_text: str, user: str) -> str:
        """Text a new user turn adds after `known_text` (everything the context already holds)."""
        if not self.templated:
            return plain_turn(known_text, user)
        full = self._render(messages + [{"role": "user", "content": user}], True)
        if full.startswith(known_text):
            return full[len(known_text):]
        # The template renders the history differently from what the context holds (it trims
        # answers, drops reasoning...): never append the history again, only the new turn as the
        # template renders it after the history.
        history = self._render(messages, False) if messages else ""
        if history and full.startswith(history):
            return self._closing(messages, known_text) + full[len(history):]
        common = 0  # no usable history rendering: append from where the texts diverge
        while common < min(len(full), len(known_text)) and full[common] == known_text[common]:
            common += 1
        return full[common:]

    def _closing(self, messages: list[dict], known_text: str) -> str:
        """What the template writes after the last answer (e.g. "<|im_end|>\n") that the context
        does not end with yet: an answer cut by max-new-tokens or Ctrl-C lacks all of it, one that
        ended with its EOS token lacks the rest."""
        if not messages or messages[-1]["role"] != "assistant":
            return ""
        sentinel = "\x00closing\x00"
        last = dict(messages[-1], content=messages[-1]["content"] + sentinel)
        rendered = self._render(messages[:-1] + [last], False)
        if sentinel not in rendered:
            return ""
        closing = rendered.split(sentinel, 1)[1]
        for k in range(len(closing), 0, -1):  # the longest start of `closing` the context already has
            if known_text.endswith(closing[:k]):
                return closing[k:]
        return closing

    def encode(self, text: str, first: bool) -> list[int]:
        special = first and not self.templated  # a template writes its own BOS
        return self.tokenizer(text, add_special_tokens=special)["input_ids"] if text else []


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


def _read_line(stdin: TextIO, interactive: bool) -> str | None:
    if interactive:
        try:
            return input("\nyou> ")
        except EOFError:  # Ctrl-D: end the prompt's line, so the shell's prompt starts on its own
            print(flush=True)
            return None
    line = stdin.readline()
    return None if line == "" else line


def run_chat(chat: ChatSession, json_output: bool, first: str | None = None, stdin: TextIO | None = None,
             stdout: TextIO | None = None) -> int:
    """The chat loop: one user message per line; interactive when stdin is a terminal."""
    from .console import TextStreamer, answer_summary

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if hasattr(stdin, "reconfigure"):  # undecodable bytes arrive as lone surrogates: refused per line below
        stdin.reconfigure(errors="surrogateescape")
    interactive = stdin.isatty()
    print(f"chat: turns use {chat.format.describe()}. Commands: "
          + ", ".join(f"{c} ({d})" for c, d in COMMANDS.items()), file=sys.stderr)
    pending = [first] if first else []
    while True:
        try:
            line = pending.pop() if pending else _read_line(stdin, interactive)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: leave cleanly
            print(file=sys.stderr)
            return 0
        if line is None:
            return 0
        line = line.strip()
        if not line:
            continue
        try:
            check_text(line, "this line")
        except UserError as exc:
            print(f"turn refused: {exc}", file=sys.stderr)
            continue
        if line.startswith("/"):
            if _command(chat, line, stdout) == "exit":
                return 0
            continue
        streamer = None if json_output else TextStreamer(chat.tokenizer, stdout)
        try:
            turn = chat.ask(line, streamer)
        except UserError as exc:
            print(f"turn refused: {exc}", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            print("\n[turn cancelled during prefill]", file=sys.stderr)
            continue
        if streamer:
            streamer.finish()
        if turn.interrupted:
            print("[answer interrupted]", file=sys.stderr)
        elif not json_output:
            print(answer_summary(turn.stats), file=sys.stderr)
        if json_output:
            print(json.dumps({"turn": len(chat.turns), "user": turn.user, "text": turn.answer,
                              "token_ids": turn.token_ids, "turn_token_ids": turn.turn_token_ids,
                              "prompt_tokens": len(turn.turn_token_ids), "interrupted": turn.interrupted,
                              "stats": dict(turn.stats, **{"document_prefills": chat.document_prefills})}),
                  file=stdout, flush=True)


def _command(chat: ChatSession, line: str, stdout: TextIO) -> str | None:
    """Run one in-chat command. Whatever it raises (a path the OS rejects, a full disk, Ctrl-C during
    a slow write) is one line on stderr: the conversation is never lost to a command."""
    name, _, arg = line.partition(" ")
    try:
        return _run_command(chat, name, arg.strip(), stdout)
    except KeyboardInterrupt:
        print(f"\n[{name} interrupted]", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - reported, the chat goes on
        print(f"{name} failed: {_reason(exc)}", file=sys.stderr)
    return None


def _run_command(chat: ChatSession, name: str, arg: str, stdout: TextIO) -> str | None:
    if name == "/exit":
        return "exit"
    if name == "/reset":
        chat.reset()
        print("[conversation reset; the document is kept]", file=sys.stderr)
    elif name == "/stats":
        print(json.dumps(chat.stats()), file=stdout, flush=True)
    elif name in ("/save", "/save!"):
        if not arg:
            print(f"usage: {name} FILE", file=sys.stderr)
            return None
        try:
            save_json(chat.transcript(), arg, overwrite=name == "/save!")
            print(f"[saved {len(chat.turns)} turns to {arg}]", file=sys.stderr)
        except (OSError, ValueError, RuntimeError, UserError) as exc:  # ValueError: a NUL byte; RuntimeError: ~nobody
            print(f"cannot save: {_reason(exc)}", file=sys.stderr)
    else:
        print(f"unknown command {name}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return None


def _reason(exc: BaseException) -> str:
    """One printable line for an exception: an OSError's reason and file, else its message."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    else:
        text = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def save_json(data: dict, name: str, overwrite: bool = False) -> Path:
    """Write `data` to `name` (`~` expanded) atomically: a temporary file beside it, then a rename,
    so a crash never leaves half a transcript. An existing file is kept unless `overwrite`."""
    path = Path(name).expanduser()
    if path.exists() and not overwrite:
        raise UserError(f"{name} exists (use /save! {name} to replace it)")
    if path.is_dir():
        raise UserError(f"{name} is a directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what a plain write would have given
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # (the original error is the one to report)
            os.unlink(tmp)
        raise
    return path
