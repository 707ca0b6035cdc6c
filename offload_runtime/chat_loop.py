"""The chat's loop on a terminal or a script: one user message per line, streamed answers, and the
in-chat commands (/reset, /stats, /save, /save!, /exit). Nothing a line or a command does ends the
chat but /exit, Ctrl-D or Ctrl-C at the prompt: a refused turn or a failed command is one line on
stderr.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from .chat import ChatSession
from .errors import UserError
from .kv_blocks import atomic_write
from .validation import check_text

COMMANDS = {"/reset": "drop the conversation, keep the document", "/stats": "statistics of this session",
            "/save FILE": "write the transcript as JSON, never over an existing file",
            "/save! FILE": "the same, replacing FILE", "/exit": "leave"}


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
            n = len(chat.turns)
            print(f"[saved {n} turn{'' if n == 1 else 's'} to {arg}]", file=sys.stderr)
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
    if path.is_dir():
        raise UserError(f"{name} is a directory: name a file in it")
    if path.exists() and not overwrite:
        raise UserError(f"{name} exists (use /save! {name} to replace it)")
    if not path.parent.exists():
        raise UserError(f"no such folder: {path.parent} (for {name})")
    try:
        atomic_write(path, json.dumps(data, indent=1).encode("utf-8"))
    except OSError as exc:
        raise _naming(exc, name) from exc
    return path


def _naming(exc: OSError, name: str) -> OSError:
    """The same error, naming the user's file rather than the temporary one beside it."""
    return OSError(exc.errno, exc.strerror, name) if exc.strerror else exc
