"""The decode-floor benchmark on a tiny model: it runs, writes its JSON, and our greedy tokens equal transformers'."""
from __future__ import annotations

import json

from bench.decode_floor import main


def test_tiny_decode_floor_writes_json_and_matches_transformers(tmp_path, capsys):
    assert main(["--synthetic", "tiny", "--cases", "40:gqa,33:mha", "--steps", "4", "--repeats", "1",
                 "--bandwidth-gib", "0.01", "--threads", "1", "--clock", "cpu", "--out", str(tmp_path),
                 "--tag", "tiny", "--no-compiled"]) == 0
    result = json.loads((tmp_path / "decode_floor_tiny.json").read_text())
    assert result["bandwidth"]["read_gbs"] > 0 and result["machine"]["flush_denormal"]
    assert [(r["context"], r["kind"], r["kv_heads"]) for r in result["rows"]] == [(40, "gqa", 2), (33, "mha", 4)]
    for row in result["rows"]:
        assert row["tokens_equal_transformers_steps"] and row["tokens_equal_transformers_generate"]
        assert len(row["ours_tokens"]) == 5  # the prefill's token and 4 steps
        assert row["floor_s"] > 0 and row["ours_step_s"] > 0 and row["hf_step_s"] > 0 and row["old_step_s"] > 0
        assert row["weight_bytes"] > row["cache_bytes_per_step"] > 0
        assert set(row["prefill_tok_s"]) == {"ours", "ours_old_path", "transformers"}
    out = capsys.readouterr().out
    assert "| 40 GQA |" in out and "40 GQA: ours/floor" in out and "(target <= 0.7)" in out


def test_tiny_decode_floor_times_the_compiled_step(tmp_path):
    assert main(["--synthetic", "tiny", "--cases", "40:gqa", "--steps", "3", "--repeats", "1", "--bandwidth-gib", "0.01",
                 "--threads", "1", "--no-generate-check", "--no-old-path", "--out", str(tmp_path), "--tag", "c"]) == 0
    row = json.loads((tmp_path / "decode_floor_c.json").read_text())["rows"][0]
    assert row["compiled_step_s"] > 0 and row["compile_s"] > 0 and row["compiled_over_transformers"] > 0
    assert row["compiled_tokens_equal_transformers_steps"] and len(row["compiled_tokens"]) == 4
