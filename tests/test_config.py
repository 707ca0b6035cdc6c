"""The typed configuration (cli_args.py -> run_config.py): every flag reaches its field, the server's
configuration goes through the same checks as `run`'s, and a configuration cannot be changed after
it is built. (The refusals themselves: tests/test_bad_inputs.py, tests/test_cli_fuzz.py.)"""
from __future__ import annotations

import dataclasses

import pytest

from offload_runtime.cli_args import parse_run_args, parse_serve_args
from offload_runtime.errors import UserError
from offload_runtime.run_config import Generation, Inputs, Memory, Models, Output, StoreOptions
from offload_runtime.settings import EngineSettings

ENGINE_FLAGS = ["--mode", "triforce", "--budget", "96", "--chunk-size", "4", "--gamma", "5", "--draft-gamma", "2",
                "--sinks", "3", "--window", "40", "--refresh-every", "7", "--refresh-below", "0.25", "--pipeline", "on"]
MEMORY_FLAGS = ["--device", "cpu", "--dtype", "bfloat16", "--on-chip-layers", "2", "--offload", "on",
                "--emulate-link", "0.5", "--max-context", "900", "--compile"]
GENERATION_FLAGS = ["--max-new-tokens", "17", "--temperature", "0.7", "--top-p", "0.9", "--seed", "11"]


def test_every_flag_reaches_its_field(tmp_path):
    """Values unlike their defaults, so a flag wired to the wrong field (or dropped) shows."""
    argv = ["--model", "m", "--draft", "d", "--prompt", "Hi", "--context-file", "doc.txt", *ENGINE_FLAGS,
            *MEMORY_FLAGS, *GENERATION_FLAGS, "--kv-store", str(tmp_path), "--kv-store-max-gb", "2.5", "--json"]
    config = parse_run_args(argv)
    assert config.models == Models("m", "d") and config.mode == "triforce" and config.uses_draft
    assert config.engine == EngineSettings(budget=96, chunk_size=4, gamma=5, draft_gamma=2, sinks=3, window=40,
                                           refresh_every=7, refresh_below=0.25, pipeline="on")
    assert config.memory == Memory("cpu", "bfloat16", 2, "on", 0.5, 900, True)
    assert config.generation == Generation(17, 0.7, 0.9, 11)
    assert config.store == StoreOptions(str(tmp_path), 2.5) and config.store.max_bytes == int(2.5 * 2**30)
    assert config.inputs == Inputs("Hi", None, "doc.txt") and config.output == Output(chat=False, json=True)


def test_defaults_are_the_documented_ones():
    config = parse_run_args(["--model", "m", "--prompt", "Hi"])
    assert config.engine == EngineSettings(budget=4096, chunk_size=8, gamma=None, draft_gamma=None, sinks=16,
                                           window=256, refresh_every=0, refresh_below=0.0, pipeline="auto")
    assert config.memory == Memory("auto", "auto", None, "auto", None, None, False)
    assert config.generation == Generation(128, 0.0, 1.0, 0) and config.store == StoreOptions(None, 50.0)
    assert not config.uses_draft and config.mode == "triforce"


def test_the_server_builds_its_configuration_through_the_same_path(monkeypatch):
    """Same flags, same engine, memory and generation parts; the server's own flags on top, no input."""
    monkeypatch.delenv("OFFLOAD_RUNTIME_API_KEY", raising=False)
    shared = ["--model", "m", *ENGINE_FLAGS, *MEMORY_FLAGS, *GENERATION_FLAGS]
    run = parse_run_args([*shared, "--prompt", "Hi"])
    served = parse_serve_args([*shared, "--port", "0", "--model-name", "tiny", "--context-ram-gb", "1.5"])
    assert served.run == dataclasses.replace(run, inputs=Inputs())
    assert (served.model_name, served.port, served.context_ram_gb, served.api_key) == ("tiny", 0, 1.5, None)
    assert parse_serve_args(["--model", "m"]).model_name == "m"  # unset: --model


@pytest.mark.parametrize("flags, message", [
    (["--gamma", "0"], "--gamma must be positive, got 0"),
    (["--window", "16", "--sinks", "16"], "--window 16 must be larger than --sinks 16"),
    (["--gamma", "64"], "--gamma must be below 64"),
    (["--on-chip-layers", "many"], "--on-chip-layers must be a non-negative integer or auto"),
    (["--draft", "d", "--mode", "autoregressive"], "--draft is used only by --mode triforce"),
    (["--kv-store-max-gb", "5"], "--kv-store-max-gb needs --kv-store"),  # not silently ignored
])
def test_run_and_serve_refuse_an_engine_flag_alike(flags, message):
    errors = []
    for parse, extra in ((parse_run_args, ["--prompt", "Hi"]), (parse_serve_args, [])):
        with pytest.raises(UserError) as exc:
            parse(["--model", "m", *flags, *extra])
        errors.append(str(exc.value))
    assert errors[0] == errors[1] and message in errors[0], errors


def test_the_store_limit_is_50_gb_unless_given(tmp_path, capsys):
    store = ["--model", "m", "--prompt", "Hi", "--kv-store", str(tmp_path)]
    assert parse_run_args(store).store == StoreOptions(str(tmp_path), 50.0)
    assert parse_serve_args([*store[:2], *store[4:]]).run.store == StoreOptions(str(tmp_path), 50.0)
    from offload_runtime.run import main

    assert main(["--kv-store-max-gb", "5"]) == 2  # the demo takes no store either
    assert capsys.readouterr().err == "error: --kv-store-max-gb needs --kv-store\n"


def test_help_says_what_each_program_does_with_model_and_device(capsys):
    from offload_runtime.cli_flags import build_parser, build_serve_parser

    run_help, serve_help = (" ".join(p.format_help().split()) for p in (build_parser(), build_serve_parser()))
    assert "(omit for the stories260K demo)" in run_help and "stories260K" not in serve_help  # serve needs --model
    assert "--model MODEL target checkpoint to serve (required)" in serve_help
    for text in (run_help, serve_help):
        assert "--device {auto,cpu,cuda} auto: CUDA when a GPU is available, else the CPU" in text
        assert "deleted beyond it (default: 50) memory and device:" in text  # 50 GB, said once (its parser default is None)


def test_a_configuration_cannot_change_after_it_is_built():
    config = parse_run_args(["--model", "m", "--prompt", "Hi"])
    for part, field in ((config, "mode"), (config.memory, "device"), (config.generation, "seed"),
                        (config.engine, "budget"), (config.inputs, "prompt")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(part, field, None)
