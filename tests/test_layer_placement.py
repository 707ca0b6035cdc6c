"""One source of truth for where layers live (issue 25): the cache is built from the memory plan, so the
answer's `stats` and its `stats.memory_plan` agree on the on-chip and offloaded layers. Before, with
--emulate-link, the plan kept all 5 layers on chip while the cache offloaded all 5."""
from __future__ import annotations

import json

import pytest

from offload_runtime import trained
from offload_runtime.run import main

LAYERS = 5  # stories260K


@pytest.mark.parametrize("flags, on_chip", [
    (["--emulate-link", "0.5"], 0),  # the emulated link carries the whole cache by default
    (["--emulate-link", "0.5", "--on-chip-layers", "2"], 2),
    (["--offload", "on"], 0),
    ([], LAYERS),  # the default on the CPU: no offloading, a growing on-device cache
])
def test_stats_and_memory_plan_agree(capsys, flags, on_chip):
    assert main(["--model", str(trained.TARGET), "--prompt", "Once upon a time", "--device", "cpu",
                 "--max-new-tokens", "3", "--json"] + flags) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    plan = stats["memory_plan"]
    assert (plan["on_chip_layers"], plan["offloaded_layers"]) == (on_chip, LAYERS - on_chip)
    # an offloaded cache reports its layers; the on-device FullCache has none to report (nothing offloaded)
    assert stats.get("on_chip_layers", LAYERS) == plan["on_chip_layers"]
    assert stats.get("offloaded_layers", 0) == plan["offloaded_layers"]
    assert (stats.get("offload_backend") == "emulated") == ("--emulate-link" in flags)
