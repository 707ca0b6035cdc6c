"""The offloading benchmark on a tiny configuration, and the cost model's arithmetic."""
from __future__ import annotations

import json

import pytest
import torch

from bench import cost_model
from bench.offload_bench import main


def test_tiny_benchmark_writes_json_table_and_plot(tmp_path, capsys):
    assert main(["--synthetic", "tiny", "--contexts", "96,160", "--new-tokens", "8", "--budget", "32",
                 "--out", str(tmp_path), "--assume-accepted-per-pass", "4", "--offload", "on",
                 "--on-chip-layers", "1"]) == 0
    result = json.loads((tmp_path / "offload_bench_cpu_tiny.json").read_text())
    assert (tmp_path / "offload_bench_cpu_tiny.png").stat().st_size > 1000
    systems = {r["system"] for r in result["rows"]}
    assert systems == {"ours autoregressive", "ours triforce 2-level", "ours triforce 3-level", "transformers generate"}
    for row in result["rows"]:
        assert row["decode_s_per_token"] > 0 and row["prefill_s"] > 0
        assert row["identical_to_ours_autoregressive"], row["system"]  # greedy, fp32: everyone agrees
        if row["system"].startswith("ours"):  # the offloaded cache's bytes: one offloaded layer's K/V per pass
            assert row["h2d_bytes_per_token"] > 0 and row["pinned_host_gib"] > 0
    assert set(result["ours_ar_over_transformers"]) == {"96", "160"}
    assert result["machine"]["torch"] and result["machine"]["device"] == "cpu"
    proj = result["projections"]
    assert proj["accepted_per_pass_used"] == 4 and "assumed" in proj["accepted_per_pass_source"]
    assert len(proj["rows"]) == 12 and len(proj["this_machine"]) == 2
    out = capsys.readouterr().out
    assert "| ours triforce 3-level | 160 |" in out and "PROJECTIONS" in out and "0.108" in out


def test_cost_model_arithmetic():
    """Numbers worked out by hand (not the formulas again): a plausible slip in cost_model changes them."""
    costs = cost_model.PhaseCosts(l1_step_s=0.001, l2_step_s=0.01, l3_pass_s=1.0)
    assert cost_model.seconds_per_token(costs, 5.0, 6, 12) == pytest.approx(0.2144)  # (1 + 6 x 0.01 + 12 x 0.001) / 5
    m = cost_model.LLAMA2_7B_128K
    assert m.kv_bytes_per_token == 524288  # K and V x 32 layers x 32 heads x 128 dims x 2 bytes
    assert m.kv_bytes_per_token * 131072 == 64 * 2 ** 30  # the 64 GiB of docs/ARCHITECTURE.md
    one = cost_model.roofline_costs(m, 131072, 4096, n_cards=1)
    two = cost_model.roofline_costs(m, 131072, 4096, n_cards=2)
    # L3: 64 GiB over a 25 GB/s link (2.7488 s) + 13.48 GB of weights at 0.8 x 1008 GB/s (0.0167 s)
    assert one.l3_pass_s == pytest.approx(2.76550, rel=1e-5) and two.l3_pass_s == pytest.approx(1.38275, rel=1e-5)
    # L2: weights + 4096 rows x 524288 B (2.147 GB) at 806.4 GB/s; L1: 136 MB of draft weights + 1 ms launch
    assert one.l2_step_s == pytest.approx(0.0193793, rel=1e-5) and one.l1_step_s == pytest.approx(0.00116865, rel=1e-5)
    rows = cost_model.project(8.0, 6, 12)
    r = next(r for r in rows if r["model"] == m.name and r["cards"] == 1 and r["context"] == 131072)
    assert r["autoregressive_s_per_token"] == pytest.approx(2.76550, rel=1e-5)
    # (2.7655 + 6 x 0.019379 + 12 x 0.0011687) / 8
    assert r["triforce_s_per_token"] == pytest.approx(0.361974, rel=1e-5)


def projection_mismatches() -> list[str]:
    """bench.pipeline_bench.projection on inputs worked out by hand; the fields that differ from the hand values.

    Per round: drafting 0.2 s (of which x1, one L2 step, 0.1 s), an L3 pass of 0.8 s, 4 tokens per pass; the
    pre-draft is used in 0.5 x 0.8 = 40% of rounds. Hidden 0.15 s/pass: x1 first, then 0.05 s of the next round
    saved when used: 1 - 0.4 x 0.05 = 0.98 s. Hidden 0.5 s: the whole 0.2 s saved: 1 - 0.4 x 0.2 = 0.92 s.
    Hidden 0.05 s: less than x1, nothing saved: 1.0 s."""
    from bench import pipeline_bench

    off = {"stats": {"time_l2_s": 2.0, "time_l3_s": 8.0, "l3_passes": 10, "l2_forwards": 20}}
    acc = {"all_accepted_share": 0.5, "acceptance": 0.8, "accepted_per_pass": 4.0}
    bad = []
    for hidden_s, on_round_s in ((0.15, 0.98), (0.5, 0.92), (0.05, 1.0)):
        on = {"stats": {"time_overlapped_s": hidden_s * 10, "l3_passes": 10}}
        got = pipeline_bench.projection(off, on, acc)
        want = {"draft_per_round_s": 0.2, "l3_pass_s": 0.8, "hidden_per_pass_s": hidden_s, "predraft_used_share": 0.4,
                "off_s_per_token": 0.25, "on_s_per_token": on_round_s / 4, "gain": 1.0 / on_round_s}
        bad += [f"hidden {hidden_s}: {k} {got[k]} != {v}" for k, v in want.items() if got[k] != pytest.approx(v)]
    return bad


def test_pipeline_projection_by_hand():
    assert projection_mismatches() == []


def test_projection_check_catches_a_wrong_round_cost(monkeypatch):
    """Sabotage: a pipelined round that forgets x1 comes first in the copy waits (saves min(draft, hidden)).
    Its gain is still >= 1, as the old check asked; the hand values are not met."""
    from offload_runtime import cost

    monkeypatch.setattr(cost, "pipelined_round_seconds",
                        lambda l3, draft, first, used, hidden: l3 + draft - used * min(draft, hidden))
    bad = projection_mismatches()
    assert any("hidden 0.15: gain" in b for b in bad) and not any(b.startswith("hidden 0.5:") for b in bad)


def test_benchmark_of_a_real_checkpoint(tmp_path, checkpoint, long_text, capsys):
    """--model/--draft/--prompt-file: a checkpoint through the real loading path, text prompts."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(long_text[:2000])
    path, draft = checkpoint("qwen2"), checkpoint("qwen2", seed=2)
    assert main(["--model", str(path), "--draft", str(draft), "--prompt-file", str(prompt), "--contexts", "120",
                 "--new-tokens", "8", "--budget", "32", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / f"offload_bench_cpu_{path.name}.json").read_text())
    assert result["note"] == "a real checkpoint"
    assert result["projections"]["accepted_per_pass_source"] == "measured on this checkpoint"
    assert {r["system"] for r in result["rows"]} >= {"ours triforce 3-level", "transformers generate"}
    assert all(r["identical_to_ours_autoregressive"] for r in result["rows"])
    assert main(["--model", str(path), "--contexts", "64", "--new-tokens", "4", "--budget", "32",
                 "--out", str(tmp_path), "--tag", "nodraft"]) == 0  # no draft: no 3-level row
    result = json.loads((tmp_path / f"offload_bench_cpu_{path.name}_nodraft.json").read_text())
    assert "ours triforce 3-level" not in {r["system"] for r in result["rows"]}


def test_emulated_link_benchmark_tiny(tmp_path, capsys):
    """`python -m bench --emulate-link` on a tiny shape: every row, JSON, plot, labelled EMULATED."""
    from bench.link_bench import main as link_main

    assert link_main(["--emulate-link", "0.5", "--synthetic", "tiny", "--contexts", "128", "--passes", "1",
                      "--ar-tokens", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "link_bench_tiny.json").read_text())
    assert (tmp_path / "link_bench_tiny.png").stat().st_size > 1000
    assert result["emulated_link_gbps"] == 0.5 and "EMULATED" in result["note"]
    rows = {r["system"]: r for r in result["rows"]}
    assert len(rows) == 5 and all(r["identical_tokens"] for r in rows.values())
    full = rows["ours triforce 2-level, budget >= context"]
    assert full["tokens_per_l3_pass"] == 7  # budget >= context: every token of gamma 6 accepted
    assert full["l3"]["bytes_per_pass"] > 0 and full["l3"]["achieved_link_gbps"] <= 0.5 * 1.05
    modelled = [r for r in rows.values() if r["kind"] == "cost model"]
    assert len(modelled) == 2 and all(r["tokens_per_l3_pass"] > 2 for r in modelled)
    out = capsys.readouterr().out
    assert "EMULATED link" in out and "cost model" in out


def test_adaptive_sweep_on_the_trained_pair(tmp_path, capsys):
    """bench.adaptive_sweep: auto and fixed gammas side by side, every system's tokens equal autoregressive."""
    from bench import adaptive_sweep

    assert adaptive_sweep.main(["--gammas", "1,3", "--draft-gammas", "2", "--repeats", "1", "--new-tokens", "8",
                                "--prompt-tokens", "64", "--emulate-link", "2", "--out", str(tmp_path), "--tag", "t"]) == 0
    result = json.loads((tmp_path / "adaptive_sweep_t.json").read_text())
    names = {r["system"] for r in result["rows"]}
    assert names == {"autoregressive", "auto 2-level", "auto 3-level", "fixed gamma 1 2-level", "fixed gamma 3 2-level",
                     "fixed gamma 1 3-level dg 2", "fixed gamma 3 3-level dg 2"}
    assert all(r["same_tokens_as_autoregressive"] and r["s_per_token"] > 0 for r in result["rows"])
    assert result["rows"][1]["adaptive"]["rounds"] and "best fixed" in capsys.readouterr().out


def test_pipeline_benchmark_tiny(tmp_path, capsys):
    """bench.pipeline_bench on a tiny shape, both link modes: off and on side by side, tokens identical."""
    from bench import pipeline_bench

    common = ["--synthetic", "tiny", "--context", "128", "--gamma", "4", "--new-tokens", "12", "--repeats", "1",
              "--out", str(tmp_path)]
    assert pipeline_bench.main(common + ["--emulate-link", "0.5", "--tag", "fixed"]) == 0
    result = json.loads((tmp_path / "pipeline_bench_tiny_fixed.json").read_text())
    assert result["emulated_link_gbps"] == [0.5] and result["identical_tokens"]
    assert result["pipelined_stats"]["draft_steps_overlapped"] > 0 and result["s_per_token"]["on"] > 0
    proj, acc = result["projection"], result["trained_acceptance"]  # (its arithmetic: test_pipeline_projection_by_hand)
    assert proj["predraft_used_share"] == pytest.approx(acc["all_accepted_share"] * acc["acceptance"])
    assert proj["predraft_used_share"] > 0.5  # stories260K accepts whole rounds often: the pre-draft is used
    assert proj["gain"] == pytest.approx(proj["off_s_per_token"] / proj["on_s_per_token"])
    assert proj["off_s_per_token"] == pytest.approx((proj["draft_per_round_s"] + proj["l3_pass_s"])
                                                    / acc["accepted_per_pass"])
    assert pipeline_bench.main(common + ["--emulate-link", "calibrate", "--tag", "cal"]) == 0
    assert "EMULATED link" in capsys.readouterr().out
    assert pipeline_bench.main(common + ["--emulate-link", "-1"]) == 2
    if not torch.cuda.is_available():
        assert pipeline_bench.main(common + ["--device", "cuda"]) == 2


def test_prefill_floor_counts_what_a_flop_counter_counts():
    """The prefill benchmark's floor: its multiply-add count equals torch's FLOP counter on transformers'
    eager forward (which computes the whole T x T score matrix: the masked half added back)."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.models import SHAPES, build_pair
    from bench.prefill_bench import forward_flops

    shape, t = SHAPES["tiny"], 32
    hf, _ = build_pair(shape, torch.device("cpu"), torch.float32)
    hf.config._attn_implementation = "eager"
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        hf(input_ids=torch.zeros(1, t, dtype=torch.long), logits_to_keep=1)
    masked_half = 2 * shape.layers * 2 * shape.hidden * (t * t - t * (t + 1) // 2)  # heads x head_dim = hidden
    assert counter.get_total_flops() == forward_flops(shape, t) + masked_half


def test_prefill_floor_of_ours_counts_what_our_forward_does(monkeypatch):
    """Ours' floor: a last-only forward of one chunk, counted by torch's FLOP counter with the reference
    attention (which scores every key of the block: the masked part added back), equals ours_flops."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.models import SHAPES, build_pair
    from bench.prefill_bench import ours_flops
    from offload_runtime.caches import FullCache

    monkeypatch.setenv("OFFLOAD_RUNTIME_KERNELS", "reference")
    shape, t = SHAPES["tiny"], 100
    _, model = build_pair(shape, torch.device("cpu"), torch.float32)
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(t, dtype=torch.long), FullCache(model.cfg, "cpu", torch.float32), last_only=True)

    def masked(rows):  # score products of keys after each query row
        return 2 * 2 * shape.hidden * sum(t - (p + 1) for p in rows)

    masked_total = (shape.layers - 1) * masked(range(t)) + masked(range(t - 64, t))  # the last layer: 64 rows
    assert counter.get_total_flops() == ours_flops(shape, t) + masked_total


def test_prefill_benchmark_tiny(tmp_path, capsys):
    from bench.prefill_bench import main as prefill_main

    assert prefill_main(["--shape", "tiny", "--contexts", "100", "--repeats", "1", "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("prefill_bench_tiny*.json")
    [row] = json.loads(path.read_text())["rows"]
    assert row["same_first_token"] and set(row["over_floor"]) == {"ours", "transformers"}
    assert 0 < row["flops"]["ours"] < row["flops"]["transformers"]  # ours skips the last layer's unused rows
    assert "ours / its floor" in capsys.readouterr().out
