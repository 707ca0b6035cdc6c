"""The no-model demo: the trained stories260K pair continues a story, tokens identical in every mode,
real acceptance at a budget of ~1/8 of the context."""
from __future__ import annotations

import json

import pytest

from offload_runtime.run import main


def test_demo_json(capsys):
    assert main(["--json", "--max-new-tokens", "15"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["synthetic"] is False and out["model"] == "stories260K" and "--model" in captured.err
    assert [r["mode"] for r in out["runs"]] == ["autoregressive", "triforce, 2 levels", "triforce, 3 levels",
                                               "triforce, offloaded"]
    assert all(r["identical_to_autoregressive"] for r in out["runs"])
    assert 380 <= out["prompt_tokens"] <= 450 and out["budget"] * 8 <= out["prompt_tokens"]
    assert all(r["mean_accepted_per_pass"] > 2 for r in out["runs"][1:])
    assert len(out["text"].split()) >= 5


def test_demo_table_over_the_emulated_link(capsys):
    assert main(["--max-new-tokens", "8", "--emulate-link", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "[continued:]" in out and "tokens/L3 pass" in out and "EMULATED link 0.5 GB/s" in out


def test_help_groups_flags(capsys):
    with pytest.raises(SystemExit) as exc:  # argparse prints the help and exits 0; returning is a bug
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for group in ("model:", "generation:", "engine:", "memory and device:", "output:"):
        assert group in text
    assert "(default: 4096)" in text
