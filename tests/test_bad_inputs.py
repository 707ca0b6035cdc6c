"""The CLI contract for bad inputs (issue 15): one `error:` line on stderr, exit 2, no traceback,
refused before any weight loads where the problem is visible without weights. In-process via main()."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from offload_runtime import demo, loading, planner, synthetic
from offload_runtime.config import ModelConfig
from offload_runtime.errors import UserError
from offload_runtime.planner import GiB, Resources, plan_memory
from offload_runtime.run import main

PROMPT = "Kamiro telan vorsi lu den."


def refused(capsys, argv, needle):
    """Run main(argv): exit 2, exactly one stderr line, `error: ...` containing needle, no traceback."""
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2, (code, captured.err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert needle in err[0], err[0]
    assert "Traceback" not in captured.err
    return err[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if weights are loaded or the demo runs: these refusals come first."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the request was refused")

    monkeypatch.setattr(loading, "load", boom)
    monkeypatch.setattr(demo, "run_demo", boom)


@pytest.fixture
def model(checkpoint):
    return str(checkpoint("llama"))


def edited_checkpoint(src, dest, config=None, remove=()):
    shutil.copytree(src, dest)
    if config is not None:
        cfg = json.loads((dest / "config.json").read_text())
        config(cfg)
        (dest / "config.json").write_text(json.dumps(cfg))
    for pattern in remove:
        for f in dest.glob(pattern):
            f.unlink()
    return str(dest)


# -- flags and their combinations, refused before anything loads ----------------------------------

@pytest.mark.parametrize("flags,needle", [
    (["--seed=-1"], "--seed must be between 0 and 2**64-1, got -1"),
    (["--seed", str(2**70)], "--seed must be between 0 and 2**64-1"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--temperature=-inf"], "--temperature must be a finite number"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--mode", "autoregressive", "--draft", "somewhere"], "--draft is used only by --mode triforce"),
])
def test_bad_flag_values(capsys, model, no_loading, flags, needle):
    refused(capsys, ["--model", model, "--prompt", PROMPT] + flags, needle)


@pytest.mark.parametrize("prompt,needle", [
    ("", "--prompt is empty"),
    ("  \n\t ", "--prompt is empty"),
    ("caf\udce9 bytes", "--prompt is not valid UTF-8 text"),  # how Python passes undecodable argv bytes
])
def test_prompt_that_is_not_text(capsys, model, no_loading, prompt, needle):
    refused(capsys, ["--model", model, "--prompt", prompt], needle)
    if prompt.strip():
        refused(capsys, ["--model", model, "--chat", "--prompt", prompt], needle)


@pytest.mark.parametrize("flags", [["--chat"], ["--prompt", "hi"], ["--prompt-file", "p.txt"],
                                   ["--context-file", "doc.txt"], ["--draft", "d"]])
def test_inputs_without_model_do_not_run_the_demo(capsys, no_loading, flags):
    msg = refused(capsys, flags, "needs --model")
    assert msg.startswith(f"error: {flags[0]} needs --model") and "demo" in msg


def test_max_context_above_the_model(capsys, model, no_loading):
    refused(capsys, ["--model", model, "--prompt", PROMPT, "--max-context", "5000"],
            "--max-context 5000 is above the model's context of 4096 tokens")
    refused(capsys, ["--model", model, "--chat", "--max-context", "5000"], "is above the model's context")


@pytest.mark.parametrize("value,needle", [("fast", "OFFLOAD_RUNTIME_KERNELS='fast' is not one of auto, triton, "
                                                  "reference"),
                                          ("triton", "OFFLOAD_RUNTIME_KERNELS=triton cannot run on cpu")])
def test_kernel_setting(capsys, model, no_loading, monkeypatch, value, needle):
    monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", value)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    refused(capsys, ["--model", model, "--prompt", PROMPT, "--device", "cpu"], needle)


def test_triton_kernels_without_triton(capsys, model, no_loading, monkeypatch):
    import offload_runtime.kernels as kernels

    monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", "triton")
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    refused(capsys, ["--model", model, "--prompt", PROMPT], "the `triton` package is not installed")


# -- files ------------------------------------------------------------------------------------------

def test_prompt_and_context_file_that_is_not_a_file(capsys, model, no_loading, tmp_path):
    refused(capsys, ["--model", model, "--prompt-file", str(tmp_path)], f"prompt file {tmp_path} is a directory")
    refused(capsys, ["--model", model, "--prompt", "q", "--context-file", str(tmp_path)], "is a directory")
    refused(capsys, ["--model", model, "--prompt-file", "/dev/null"], "is not a regular file")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # never opened: reading it would block until a writer comes
    refused(capsys, ["--model", model, "--chat", "--context-file", str(fifo)], "is not a regular file")
    refused(capsys, ["--model", model, "--prompt-file", str(tmp_path / "nope.txt")], "does not exist")


def test_checkpoint_without_tokenizer(capsys, checkpoint, no_loading, tmp_path):
    path = edited_checkpoint(checkpoint("llama"), tmp_path / "m", remove=["tokenizer*", "special_tokens_map.json"])
    msg = refused(capsys, ["--model", path, "--prompt", PROMPT], "no tokenizer in")
    assert "looked for tokenizer.json, tokenizer.model" in msg


def test_config_without_weights(capsys, checkpoint, no_loading, tmp_path):
    """Only config.json (no weights, no tokenizer): the weights are named as what is missing."""
    path = edited_checkpoint(checkpoint("llama"), tmp_path / "m", remove=["*.safetensors", "tokenizer*"])
    refused(capsys, ["--model", path, "--prompt", PROMPT], "the weights are missing")


def test_config_without_model_type(capsys, checkpoint, no_loading, tmp_path):
    path = edited_checkpoint(checkpoint("llama"), tmp_path / "m", config=lambda c: c.pop("model_type"))
    refused(capsys, ["--model", path, "--prompt", PROMPT], "config.json has no model_type (expected one of llama")


def test_unknown_rope_type(capsys, checkpoint, no_loading, tmp_path):
    def weird(cfg):
        cfg.pop("rope_parameters", None)
        cfg["rope_scaling"] = {"rope_type": "weird", "factor": 2.0}

    path = edited_checkpoint(checkpoint("llama"), tmp_path / "m", config=weird)
    msg = refused(capsys, ["--model", path, "--prompt", PROMPT], "unsupported rope_type 'weird'")
    assert "supported: default, dynamic, linear, llama3" in msg and "yarn" in msg


# -- output: a reader that leaves, or no stdout at all --------------------------------------------

class _ClosedPipe:
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_broken_pipe_in_process(capsys, model, monkeypatch):
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["--model", model, "--prompt", PROMPT, "--max-new-tokens", "3", "--mode", "autoregressive"]) == 141
    assert "Traceback" not in capsys.readouterr().err


def test_stdout_closed(capsys, model, monkeypatch):
    monkeypatch.setattr(sys, "stdout", None)  # what Python gives a process started with `>&-`
    assert main(["--model", model, "--prompt", PROMPT, "--max-new-tokens", "3", "--json"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_reader_closes_the_pipe_early(checkpoint):
    """`python -m offload_runtime.run ... | head -c 1`: the writer stops quietly (status 0 or 141)."""
    path = checkpoint("llama", eos_token_id=None)
    proc = subprocess.Popen([sys.executable, "-m", "offload_runtime.run", "--model", str(path), "--prompt", PROMPT,
                             "--mode", "autoregressive", "--max-new-tokens", "3000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        assert proc.stdout.read(1)  # the answer is streaming
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode in (0, 141), err.decode()
    assert b"Traceback" not in err and b"Exception ignored" not in err, err.decode()


# -- the planner's refusal -------------------------------------------------------------------------

def big_config(**overrides):
    base = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=32768)
    return ModelConfig.from_hf(synthetic.hf_config("llama", 32000, **dict(base, **overrides)))


def gib_items(msg):
    """(total, [items]) from 'needs T GiB ... (name X, name Y ...)'."""
    total = float(re.search(r"needs ([\d.]+) GiB", msg).group(1))
    inside = msg[msg.index("(") + 1:msg.index(")")]
    return total, [float(x) for x in re.findall(r" ([\d.]+)(?:,| for|$)", inside)]


@pytest.mark.parametrize("res", [Resources("cpu", 8 * GiB),
                                 Resources("cuda", 64 * GiB, gpu_total=16 * GiB, gpu_free=16 * GiB)])
def test_planner_refusal_items_add_up(res):
    import torch

    with pytest.raises(UserError) as info:
        plan_memory(big_config(), torch.float16, 32768, res, new_tokens=128, offload="off")
    msg = str(info.value)
    total, items = gib_items(msg)
    assert "prefill activations" in msg
    assert abs(sum(items) - total) <= 0.05 * len(items) + 1e-9, (msg, items)


def test_planner_hint_within_model_context():
    """Asked for more than the model's context (as a chat's document can make it), the hint stays within it."""
    import torch

    cfg = big_config(num_hidden_layers=2, max_position_embeddings=4096)
    with pytest.raises(UserError) as info:
        plan_memory(cfg, torch.float32, 2_000_000, Resources("cpu", 6 * GiB), new_tokens=64)
    hint = int(re.search(r"try --max-context (\d+)", str(info.value)).group(1))
    assert 64 < hint <= 4096


def test_cli_planner_refusal_names_activations(capsys, model, no_loading, monkeypatch):
    monkeypatch.setattr(planner, "probe_resources", lambda device: Resources("cpu", 1000))
    msg = refused(capsys, ["--model", model, "--prompt", PROMPT], "GiB of host memory for")
    assert "prefill activations" in msg and "draft" in msg


def test_chat_answer_longer_than_the_context(capsys, model, no_loading):
    refused(capsys, ["--model", model, "--chat", "--max-new-tokens", "5000"],
            "--max-new-tokens 5000 leaves no room for a chat turn in the model's context of 4096 tokens")
    refused(capsys, ["--model", model, "--chat", "--max-new-tokens", "500", "--max-context", "300"],
            "in --max-context of 300 tokens")
