"""A chat survives bad input (issue 15): an undecodable line or a turn the template/tokenizer rejects is
refused as a turn and the next turn answers; /save never loses or clobbers a transcript; Ctrl-D and
Ctrl-C leave the terminal tidy; --max-context binds a chat as it binds a single run."""
from __future__ import annotations

import builtins
import io
import json
import os
import sys

import pytest
import torch

from offload_runtime import loading, synthetic
from offload_runtime.chat import ChatSession
from offload_runtime.chat_loop import run_chat, save_json
from offload_runtime.console import PrefillProgress
from offload_runtime.session import Session
from offload_runtime.settings import EngineSettings
from offload_runtime.errors import UserError
from offload_runtime.run import main
from offload_runtime.sampling import SamplingParams

RAISING_TEMPLATE = (
    "{% for m in messages %}{% if 'BOOM' in m['content'] %}{{ raise_exception('no booms here') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def target(checkpoint):
    return loading.load(str(checkpoint("llama", eos_token_id=None)), torch.device("cpu"))


def new_chat(target, tokenizer=None, progress=None, max_new_tokens=4):
    session = Session(target.model, None, SamplingParams(0.0), [], EngineSettings(budget=64, gamma=3),
                      mode="autoregressive")
    return ChatSession(session, tokenizer or target.tokenizer, None, max_new_tokens, progress)


def answers(stdout: str) -> list[dict]:
    return [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]


def test_undecodable_line_is_refused_and_the_chat_goes_on(checkpoint, monkeypatch, capsys):
    raw = b"What is it?\n\xff\xfe caf\xe9\nWho speaks?\n"  # the middle line is not UTF-8 (latin-1 bytes)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))  # strict, as Python's
    code = main(["--model", str(checkpoint("llama", eos_token_id=None)), "--chat", "--json", "--mode",
                 "autoregressive", "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err
    assert [t["user"] for t in answers(captured.out)] == ["What is it?", "Who speaks?"]
    assert captured.err.count("turn refused: this line is not valid UTF-8 text") == 1


def test_turn_the_template_rejects_is_refused(target, capsys):
    tok = synthetic.train_tokenizer()
    tok.chat_template = RAISING_TEMPLATE
    chat = new_chat(target, tok)
    out = io.StringIO()
    assert run_chat(chat, True, stdin=io.StringIO("BOOM now\nWhat is it?\n"), stdout=out) == 0
    err = capsys.readouterr().err
    assert "turn refused: cannot tokenise this turn: no booms here" in err
    assert [t["user"] for t in answers(out.getvalue())] == ["What is it?"]
    assert len(chat.turns) == 1 and chat.messages[-2]["content"] == "What is it?"  # the refused turn left no trace


def test_save_expands_home_refuses_overwrite_and_replaces_with_bang(target, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    chat = new_chat(target)
    script = "What?\n/save ~/t.json\nAgain?\n/save ~/t.json\n/save! ~/t.json\n"
    assert run_chat(chat, True, stdin=io.StringIO(script), stdout=io.StringIO()) == 0
    err = capsys.readouterr().err
    assert "cannot save: ~/t.json exists (use /save! ~/t.json to replace it)" in err
    assert "[saved 1 turn to ~/t.json]" in err and "[saved 2 turns to ~/t.json]" in err
    saved = json.loads((tmp_path / "t.json").read_text())
    assert [t["user"] for t in saved["turns"]] == ["What?", "Again?"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]  # no temporary file left behind


def test_save_names_the_users_path_never_the_temporary_file(target, tmp_path, monkeypatch, capsys):
    """A missing folder is said as such; a directory is refused at once by /save and /save! alike; an
    error while writing names the user's file, not the `.NAME.xxxx.tmp` beside it."""
    missing = tmp_path / "missing" / "x.json"
    script = f"What?\n/save {missing}\n/save {tmp_path}\n/save! {tmp_path}\n/save! {tmp_path / 'y.json'}\n"

    def crash(src, dst):
        raise OSError(28, "No space left on device", src)  # as os.replace names its source: the temporary file

    monkeypatch.setattr(os, "replace", crash)
    assert run_chat(new_chat(target), True, stdin=io.StringIO(script), stdout=io.StringIO()) == 0
    failures = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cannot save: ")]
    assert failures == [f"cannot save: no such folder: {missing.parent} (for {missing})",
                        f"cannot save: {tmp_path} is a directory: name a file in it",
                        f"cannot save: {tmp_path} is a directory: name a file in it",
                        f"cannot save: No space left on device: {tmp_path / 'y.json'}"]
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_save_is_atomic(tmp_path, monkeypatch):
    dest = tmp_path / "t.json"
    save_json({"turns": [1]}, str(dest))
    umask = os.umask(0o022)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temporary file's 0600

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_json({"turns": [1, 2]}, str(dest), overwrite=True)
    assert json.loads(dest.read_text()) == {"turns": [1]}  # the old transcript is intact
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]
    with pytest.raises(UserError, match="is a directory"):
        save_json({}, str(tmp_path), overwrite=True)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_ctrl_d_ends_the_prompt_line(target, monkeypatch, capsys):
    def ctrl_d(prompt=""):
        raise EOFError

    monkeypatch.setattr(builtins, "input", ctrl_d)
    assert run_chat(new_chat(target), False, stdin=_Terminal()) == 0
    assert capsys.readouterr().out == "\n"


def test_ctrl_c_during_prefill_closes_the_progress_bar(target, capsys):
    progress = PrefillProgress(min_tokens=1)
    chat = new_chat(target, progress=progress)
    extend = chat.session.extend
    bars = []

    def interrupted_once(tokens):
        chat.session.extend = extend
        progress(1, 100)  # the bar is drawn...
        bars.append(progress.bar)
        raise KeyboardInterrupt  # ...and Ctrl-C comes

    chat.session.extend = interrupted_once
    assert run_chat(chat, True, stdin=io.StringIO("First?\n"), stdout=io.StringIO()) == 0
    assert bars[0] is not None and bars[0].disable is True  # tqdm's close() marks the bar disabled
    assert progress.bar is None
    assert "[turn cancelled during prefill]" in capsys.readouterr().err
    assert not chat.turns and not chat.session.context  # the cancelled turn left nothing behind
    assert len(chat.ask("Second?").token_ids) == 4  # and the next turn answers


@pytest.mark.parametrize("flags,source", [(["--max-context", "100"], "but --max-context is 100: over by"),
                                          ([], "but the model's context is 1024 (max_position_embeddings): over by")])
def test_chat_limit_is_enforced_and_named(checkpoint, monkeypatch, capsys, flags, source):
    path = checkpoint("llama", max_position_embeddings=1024, eos_token_id=None)
    long_turn = synthetic.synthetic_text(60 if flags else 400, seed=9)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{long_turn}\nWhat?\n"))
    assert main(["--model", str(path), "--chat", "--json", "--mode", "autoregressive", "--max-new-tokens", "4"]
                + flags) == 0
    captured = capsys.readouterr()
    assert "turn refused: this turn needs" in captured.err and source in captured.err
    assert [t["user"] for t in answers(captured.out)] == ["What?"]


def test_save_to_paths_the_os_rejects_is_one_message_and_the_chat_goes_on(target, tmp_path, monkeypatch, capsys):
    """Issue 25: every /save failure (a directory, a path under a file, a name too long, a NUL byte, an
    unknown ~user, permission, a full disk) is one line; the conversation survives and saves later."""
    import errno

    from offload_runtime import chat_loop as chat_module

    (tmp_path / "file").write_text("x")
    rejected = [str(tmp_path), str(tmp_path / "file" / "t.json"), str(tmp_path / ("n" * 300)),
                str(tmp_path / "nul\x00.json"), "~no_such_user_zz/t.json", str(tmp_path / "missing" / "t.json")]
    script = "What?\n" + "".join(f"/save! {p}\n" for p in rejected) + \
        f"/save! {tmp_path / 'DENIED'}\n/save! {tmp_path / 'FULL'}\nAgain?\n/save {tmp_path / 'ok.json'}\n"
    real_write = chat_module.atomic_write

    def full_disk():  # the write fails half-way, after the temporary file was made
        yield b"{"
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(path, data):  # simulated: root may write anywhere, and no disk here is full
        if path.name == "DENIED":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_write(path, full_disk() if path.name == "FULL" else data)

    monkeypatch.setattr(chat_module, "atomic_write", write)
    chat = new_chat(target)
    out = io.StringIO()
    assert run_chat(chat, True, stdin=io.StringIO(script), stdout=out) == 0
    err = capsys.readouterr().err
    failures = [line for line in err.splitlines() if line.startswith("cannot save: ")]
    assert len(failures) == len(rejected) + 2, err  # one line each, no traceback, nothing else went wrong
    assert "Traceback" not in err and "is a directory" in failures[0] and "Not a directory" in failures[1]
    assert "File name too long" in failures[2] and "null byte" in failures[3]
    assert "Permission denied" in failures[-2] and "No space left on device" in failures[-1]
    assert [t["user"] for t in answers(out.getvalue())] == ["What?", "Again?"]  # the chat went on
    saved = json.loads((tmp_path / "ok.json").read_text())
    assert [t["user"] for t in saved["turns"]] == ["What?", "Again?"]  # nothing of the conversation was lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ok.json"]  # no temporary file left behind


def test_any_command_failure_is_one_line(target, monkeypatch, capsys):
    """A command that raises something unforeseen (here /stats) reports it; the chat goes on."""
    chat = new_chat(target)

    def broken():
        raise RuntimeError("stats exploded\nsecond line")

    monkeypatch.setattr(chat, "stats", broken)
    out = io.StringIO()
    assert run_chat(chat, True, stdin=io.StringIO("/stats\nWhat?\n"), stdout=out) == 0
    err = capsys.readouterr().err
    assert "/stats failed: stats exploded\n" in err and "second line" not in err and "Traceback" not in err
    assert [t["user"] for t in answers(out.getvalue())] == ["What?"]


def test_the_summary_line_counts_in_words():
    """One generated token is `1 token`; rows from the KV store are named only when there are some."""
    from offload_runtime.console import answer_summary

    assert answer_summary({"new_tokens": 1}).startswith("[1 token")
    assert answer_summary({"new_tokens": 2}).startswith("[2 tokens")
    assert "restored" not in answer_summary({"new_tokens": 2, "restored_tokens": 0})
    assert "restored 256 tok" in answer_summary({"new_tokens": 2, "restored_tokens": 256})
