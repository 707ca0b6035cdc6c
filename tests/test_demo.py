"""The no-model demo: labelled synthetic, runs both modes, tokens identical."""
from __future__ import annotations

import json

from offload_runtime.run import main


def test_demo_json(capsys):
    assert main(["--json", "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["synthetic"] is True and "SYNTHETIC" in captured.err and "--model" in captured.err
    assert [r["mode"] for r in out["runs"]] == ["autoregressive", "triforce, 2 levels", "triforce, 3 levels",
                                               "triforce, offloaded"]
    assert all(r["identical_to_autoregressive"] for r in out["runs"])
    assert out["prompt_tokens"] > 1000


def test_help_groups_flags(capsys):
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    text = capsys.readouterr().out
    for group in ("model:", "generation:", "engine:", "memory and device:", "output:"):
        assert group in text
    assert "(default: 4096)" in text
