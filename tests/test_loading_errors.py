"""Loading paths (sharded, hub ids) and the bad inputs of the CLI: one `error:` line, exit 2."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from offload_runtime import loading
from offload_runtime.caches import FullCache
from offload_runtime.run import main

PROMPT = "Kamiro telan vorsi lu den."


def run_err(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_user_error(capsys, argv, needle):
    code, err = run_err(capsys, argv)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert needle in err[0], err[0]


def test_sharded_checkpoint_loads_same_as_single(checkpoint, tokenizer):
    single = checkpoint("llama")
    sharded = checkpoint("llama", max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids = torch.tensor(tokenizer(PROMPT)["input_ids"])
    a = loading.load(str(single), torch.device("cpu"), with_tokenizer=False).model
    b = loading.load(str(sharded), torch.device("cpu"), with_tokenizer=False).model
    cfg = a.cfg
    assert torch.equal(a(ids, FullCache(cfg, "cpu", torch.float32)), b(ids, FullCache(cfg, "cpu", torch.float32)))


def test_bf16_checkpoint_dtype_auto(checkpoint):
    path = checkpoint("qwen2", dtype=torch.bfloat16)
    assert loading.load(str(path), torch.device("cpu"), "auto").model.dtype == torch.float32  # CPU: fp32
    assert loading.load(str(path), torch.device("cpu"), "bfloat16").model.dtype == torch.bfloat16


def test_missing_path(capsys):
    assert_user_error(capsys, ["--model", "/no/such/dir", "--prompt", "x"], "does not exist")


def test_dir_without_config(capsys, tmp_path):
    assert_user_error(capsys, ["--model", str(tmp_path), "--prompt", "x"], "no config.json")


def test_unsupported_model_type(capsys, tmp_path, checkpoint):
    bad = tmp_path / "gpt2ish"
    shutil.copytree(checkpoint("llama"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_user_error(capsys, ["--model", str(bad), "--prompt", "x"], "unsupported model_type 'gpt2'")
    code, err = run_err(capsys, ["--model", str(bad), "--prompt", "x"])
    assert "llama, mistral, qwen2" in err[0]


def test_corrupt_and_missing_shard(capsys, tmp_path, checkpoint):
    src = checkpoint("llama", max_shard_size="40KB")
    bad = tmp_path / "corrupt"
    shutil.copytree(src, bad)
    shard = sorted(bad.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    assert_user_error(capsys, ["--model", str(bad), "--prompt", "x"], f"cannot read weights {shard.name}")
    shard.unlink()
    assert_user_error(capsys, ["--model", str(bad), "--prompt", "x"], f"missing safetensors shard {shard.name}")


def test_hub_id_not_cached_offline(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert_user_error(capsys, ["--model", "someorg/some-model", "--prompt", "x"], "pass a local checkpoint path")


def test_prompt_longer_than_context(capsys, checkpoint):
    path = checkpoint("llama", max_position_embeddings=32)
    assert_user_error(capsys, ["--model", str(path), "--prompt", PROMPT * 10, "--mode", "autoregressive"],
                      "exceeds the model's context of 32 tokens")


@pytest.mark.parametrize("flags,needle", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be positive"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--mode", "fast"], "invalid choice"),
    (["--max-new-tokens", "many"], "invalid int value"),
])
def test_bad_flags(capsys, checkpoint, flags, needle):
    assert_user_error(capsys, ["--model", str(checkpoint("llama")), "--prompt", "x"] + flags, needle)


def test_prompt_and_context_files(capsys, tmp_path, checkpoint):
    path = str(checkpoint("llama"))
    assert_user_error(capsys, ["--model", path, "--prompt-file", str(tmp_path / "nope.txt")], "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_user_error(capsys, ["--model", path, "--prompt", "q", "--context-file", str(empty)], "is empty")
    binary = tmp_path / "bin.dat"
    binary.write_bytes(b"\x00\x01\x02abc")
    assert_user_error(capsys, ["--model", path, "--prompt", "q", "--context-file", str(binary)], "binary")
    doc = tmp_path / "doc.txt"
    doc.write_text("Kamiro telan vorsi.")
    assert main(["--model", path, "--prompt", "What?", "--context-file", str(doc), "--json",
                 "--mode", "autoregressive", "--max-new-tokens", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_tokens"] > len("What?") // 2 and len(out["token_ids"]) == 3
