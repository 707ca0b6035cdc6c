"""train_recall's mistakes are one `error:` line and exit 2, before any training starts."""
from __future__ import annotations

import pytest

from offload_runtime import train_recall


@pytest.mark.parametrize("argv, says", [
    (["--stage3", "300x4"], "STEPSxBATCHxLENGTH"),
    (["--stage3", "ax4x2048"], "STEPSxBATCHxLENGTH"),
    (["--stage3", "300x0x2048"], "positive"),
    (["--stage1-steps", "-1"], "--stage1-steps"),
    (["--eval-prompts", "0"], "--eval-prompts"),
    (["--lr", "0"], "--lr"),
    (["--resume", "/nonexistent-checkpoint"], "--resume"),
    (["--out", "/proc/no-such/place"], "--out"),
])
def test_bad_arguments_are_one_line_before_training(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(train_recall, "build_model", lambda seed: pytest.fail("training started"))
    status = train_recall.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error:") and says in err[0], err
