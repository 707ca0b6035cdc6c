"""Long-context chat: cache reuse changes nothing, the document is prefilled once, Ctrl-C keeps the
session alive, and bad input is refused with one line."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from offload_runtime import loading, synthetic
from offload_runtime.chat import ChatSession
from offload_runtime.session import Session
from offload_runtime.settings import EngineSettings
from offload_runtime.generate import generate_autoregressive
from offload_runtime.run import main
from offload_runtime.sampling import SamplingParams

QUESTIONS = ["What is the text about?", "Who speaks first?", "Say it again, shorter."]


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    path = tmp_path_factory.mktemp("doc") / "doc.txt"
    path.write_text(synthetic.synthetic_text(300, seed=4))
    return path


def scripted(monkeypatch, capsys, argv, lines):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code = main(argv)
    captured = capsys.readouterr()
    return code, [json.loads(x) for x in captured.out.splitlines() if x.startswith("{")], captured.err


@pytest.mark.parametrize("mode,draft,offload", [("autoregressive", False, False), ("triforce", False, False),
                                                ("triforce", True, False), ("triforce", True, True)])
def test_scripted_chat_equals_fresh_generation(mode, draft, offload, checkpoint, tokenizer, document, monkeypatch,
                                               capsys):
    path = checkpoint("llama", eos_token_id=None)
    argv = ["--model", str(path), "--chat", "--context-file", str(document), "--json", "--mode", mode,
            "--max-new-tokens", "12", "--budget", "64", "--chunk-size", "8", "--gamma", "3"]
    if draft:
        argv += ["--draft", str(checkpoint("llama", seed=3, eos_token_id=None, hidden_size=32,
                                           intermediate_size=64, num_attention_heads=2, num_key_value_heads=1))]
    if offload:  # the host-resident full cache, planned for the document + the conversation
        argv += ["--offload", "on", "--on-chip-layers", "1"]
    code, turns, err = scripted(monkeypatch, capsys, argv, QUESTIONS[:2] + ["/stats"] + QUESTIONS[2:])
    assert code == 0, err
    assert len(turns) == 3 + 1  # three answers and the /stats object
    stats = turns.pop(2)
    assert stats["document_prefills"] == 1 and stats["turns"] == 2  # /stats came after two turns
    doc_text = document.read_text()
    doc_ids = tokenizer(f"Document:\n{doc_text}\n\n")["input_ids"]
    assert stats["document_tokens"] == len(doc_ids)
    target = loading.load(str(path), torch.device("cpu"), with_tokenizer=False).model
    context = list(doc_ids)
    for i, turn in enumerate(turns):
        context += turn["turn_token_ids"]
        fresh = generate_autoregressive(target, context, 12, SamplingParams(0.0), [])
        assert turn["token_ids"] == fresh.token_ids, f"turn {i + 1}"
        # the first answer's prefill includes the document; later ones only the new turn (and the previous
        # answer's last token): never the document again
        assert turn["stats"]["prefilled_tokens"] == len(turn["turn_token_ids"]) + (1 if i else len(doc_ids))
        assert turn["stats"]["document_prefills"] == 1
        assert ("offloaded_layers" in turn["stats"]) == offload
        context += turn["token_ids"]
    # the context is the conversation text
    assert tokenizer.decode(context, skip_special_tokens=True) == (
        f"Document:\n{doc_text}\n\nUser: {QUESTIONS[0]}\nAssistant:{turns[0]['text']}\nUser: {QUESTIONS[1]}\n"
        f"Assistant:{turns[1]['text']}\nUser: {QUESTIONS[2]}\nAssistant:{turns[2]['text']}")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_template_reset_and_refresh(checkpoint, tokenizer, document):
    """A tokenizer with a chat template: the document is the system message; /reset keeps its rows."""
    path = checkpoint("qwen2", eos_token_id=None)
    model = loading.load(str(path), torch.device("cpu"), with_tokenizer=False).model
    tok = synthetic.train_tokenizer()
    tok.chat_template = CHATML
    session = Session(model, None, SamplingParams(0.0), [], EngineSettings(budget=64, gamma=3), mode="triforce")
    chat = ChatSession(session, tok, document.read_text(), max_new_tokens=10)
    assert chat.format.system_document
    first = chat.ask(QUESTIONS[0])
    expected_prefix = tok.apply_chat_template(
        [{"role": "system", "content": "Answer questions about this document.\n\n" + document.read_text()},
         {"role": "user", "content": QUESTIONS[0]}], tokenize=False, add_generation_prompt=True)
    assert tok.decode(session.context[: len(session.context) - len(first.token_ids)]) == expected_prefix
    second = chat.ask(QUESTIONS[1])
    assert tok.decode(second.turn_token_ids).startswith("<|im_end|>\n<|im_start|>user\n" + QUESTIONS[1])
    fresh = generate_autoregressive(model, session.context[: -len(second.token_ids)], 10, SamplingParams(0.0), [])
    assert second.token_ids == fresh.token_ids
    builds = session.stats.retrieval_builds
    prefilled = session.stats.prefilled_tokens
    chat.reset()
    again = chat.ask(QUESTIONS[0])
    assert again.token_ids == first.token_ids  # same question after /reset: same answer
    # the document is not prefilled again (only its last token, whose logits the cache does not keep)
    assert session.stats.prefilled_tokens - prefilled == len(again.turn_token_ids) + 1
    assert session.stats.retrieval_builds > builds  # selection refreshed for the new question
    assert chat.document_prefills == 1


def test_turn_too_long_is_refused_and_session_kept(checkpoint, document, monkeypatch, capsys):
    path = checkpoint("llama", max_position_embeddings=1024, eos_token_id=None)
    long_question = synthetic.synthetic_text(400, seed=9)
    argv = ["--model", str(path), "--chat", "--context-file", str(document), "--json", "--mode", "autoregressive",
            "--max-new-tokens", "8"]
    code, turns, err = scripted(monkeypatch, capsys, argv, [long_question, "/nope", QUESTIONS[0]])
    assert code == 0
    assert len(turns) == 1 and turns[0]["user"] == QUESTIONS[0]
    assert "turn refused: this turn needs" in err and "over by" in err
    assert "unknown command /nope" in err


def test_document_longer_than_model_context(checkpoint, document, capsys):
    path = checkpoint("llama", max_position_embeddings=256)
    assert main(["--model", str(path), "--chat", "--context-file", str(document)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the document needs") and "over by" in err[0]


@pytest.mark.parametrize("content,needle", [(b"", "is empty"), (b"\x00\x01bin", "binary")])
def test_bad_context_file(checkpoint, tmp_path, capsys, content, needle):
    bad = tmp_path / "ctx"
    bad.write_bytes(content)
    assert main(["--model", str(checkpoint("llama")), "--chat", "--context-file", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: context file") and needle in err[0]


def test_ctrl_c_mid_answer_keeps_the_process(checkpoint):
    path = checkpoint("llama", eos_token_id=None, max_position_embeddings=8192)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "offload_runtime.run", "--model", str(path), "--chat", "--mode", "autoregressive",
         "--max-new-tokens", "800"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        proc.stdin.write(b"Tell me a long story.\n")
        proc.stdin.flush()
        assert proc.stdout.read(1)  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(b"Short one.\n/stats\n/exit\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert b"[answer interrupted]" in err
    stats = json.loads(out[out.index(b"\n{") + 1:])
    assert stats["turns"] == 2  # the interrupted answer, then a full one
    assert err.count(b"tokens, ") == 1 and b"[800 tokens" in err  # the second answer ran to its end


def test_template_that_trims_answers_appends_only_new_turns(checkpoint, document):
    """A template that re-renders history differently from the context (trimmed answers) must not
    make a turn re-append the conversation."""
    path = checkpoint("qwen2", eos_token_id=None)
    model = loading.load(str(path), torch.device("cpu"), with_tokenizer=False).model
    tok = synthetic.train_tokenizer()
    tok.chat_template = CHATML.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")
    session = Session(model, None, SamplingParams(0.0), [], EngineSettings(budget=64, gamma=3), mode="triforce")
    chat = ChatSession(session, tok, document.read_text(), max_new_tokens=6)
    sizes = [len(chat.ask(q).turn_token_ids) for q in QUESTIONS]
    assert max(sizes) < 2 * min(sizes) + 8, sizes  # each turn adds about its own question
    text = tok.decode(session.context)
    for q in QUESTIONS:
        assert text.count(q) == 1
    # the system message and every answer (cut by max-new-tokens here) are closed as the template closes turns
    assert text.count("<|im_end|>\n<|im_start|>user\n") == len(QUESTIONS)
