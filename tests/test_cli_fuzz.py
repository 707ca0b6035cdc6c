"""Fuzz the command line: 200 seeded random argument vectors, flags taken from the parser itself (so flags
added later are fuzzed too) with values of wrong types and ranges. None may give a traceback or an exit
status other than 0, 2 or 130; a status 2 is exactly one `error:` line.

Most vectors are refused before any model loads; those that run use a tiny random checkpoint, few new
tokens and a scripted stdin (with an undecodable line) for --chat. The demo (no --model) is replaced by
a stub: it has its own test, and it is slow.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import sys


from offload_runtime import demo, loading
from offload_runtime.cli_flags import build_parser
from offload_runtime.run import main

N_VECTORS = int(os.environ.get("FUZZ_VECTORS", 200))  # FUZZ_SEED / FUZZ_VECTORS: explore further by hand
SEED = int(os.environ.get("FUZZ_SEED", 15))
WRONG = ["-1", "0", str(2**70), f"-{2**70}", "1.5", "-0.5", "nan", "inf", "-inf", "1e309", "abc", "", "  ", "é",
         "caf\udce9", "0x10", "auto", "/no/such/path", "/dev/null", "--json"]
CHAT_STDIN = b"Hello there\n\xff\xfe\n/stats\n/nope\nWhy?\n"
KERNEL_SETTINGS = [None, None, None, "auto", "reference", "fast", "triton", ""]


def flag_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def plausible(rng: random.Random, action: argparse.Action, paths: dict) -> str:
    """A value of the flag's own kind, usually valid (small, so a run stays short)."""
    if action.choices:
        return str(rng.choice(list(action.choices)))
    if action.type is int:
        return rng.choice(["1", "2", "3", "4", "8", "64"])
    if action.type is float:
        return rng.choice(["0", "0.5", "1", "0.9"])
    return rng.choice([paths["doc"], paths["model"], paths["dir"], "Kamiro telan?", "auto", "2"])


def random_vector(rng: random.Random, actions: list[argparse.Action], paths: dict) -> list[str]:
    argv: list[str] = []
    if rng.random() < 0.6:
        argv += ["--model", paths["model"], "--max-new-tokens", "2"]  # a later random value overrides these
    if rng.random() < 0.5:
        argv += ["--prompt", "Kamiro telan vorsi?"]
    for _ in range(rng.randint(1, 4)):
        action = rng.choice(actions)
        flag = rng.choice(action.option_strings)
        if action.nargs == 0:
            argv.append(flag)
            continue
        value = plausible(rng, action, paths) if rng.random() < 0.5 else rng.choice(WRONG + [paths["dir"]])
        argv += [f"{flag}={value}"] if rng.random() < 0.5 else [flag, value]
    if rng.random() < 0.03:
        argv.append(rng.choice(["--help", "-h"]))
    return argv


def run_vector(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(CHAT_STDIN), encoding="utf-8"))
    try:
        code = main(argv)
    except SystemExit as exc:  # --help
        code = exc.code
    return code, capsys.readouterr().err


def test_fuzz_argument_vectors(checkpoint, tmp_path, monkeypatch, capsys):
    paths = {"model": str(checkpoint("llama", max_position_embeddings=512)), "dir": str(tmp_path)}
    doc = tmp_path / "doc.txt"
    doc.write_text("Kamiro telan vorsi lu den. Paqui astber onul zeha.")
    paths["doc"] = str(doc)
    loads = []
    real_load = loading.load
    monkeypatch.setattr(loading, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    monkeypatch.setattr(demo, "run_demo", lambda args: 0)
    rng = random.Random(SEED)
    actions = flag_actions(build_parser())
    failures, codes = [], []
    for _ in range(N_VECTORS):
        argv = random_vector(rng, actions, paths)
        setting = rng.choice(KERNEL_SETTINGS)
        if setting is None:
            monkeypatch.delenv("OFFLOAD_RUNTIME_KERNELS", raising=False)
        else:
            monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", setting)
        try:
            code, err = run_vector(argv, monkeypatch, capsys)
        except BaseException as exc:  # noqa: BLE001 - the point: nothing may escape main()
            failures.append((setting, argv, f"raised {type(exc).__name__}: {exc}"))
            continue
        codes.append(code)
        lines = err.strip().splitlines()
        if code not in (0, 2, 130) or "Traceback" in err:
            failures.append((setting, argv, f"exit {code}: {err[-500:]}"))
        elif code == 2 and not (len(lines) == 1 and lines[0].startswith("error: ")):
            failures.append((setting, argv, f"exit 2 without exactly one error line: {lines}"))
    monkeypatch.delenv("OFFLOAD_RUNTIME_KERNELS", raising=False)
    assert not failures, "\n".join(map(repr, failures[:5]))
    # the vectors explore both sides: refusals, and runs that load a model and generate
    print(f"exit statuses: {sorted((c, codes.count(c)) for c in set(codes))}, {len(loads)} model loads")
    assert codes.count(2) > N_VECTORS // 2 and codes.count(0) >= 10 and len(loads) >= 5, (codes, len(loads))
