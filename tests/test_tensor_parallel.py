"""Tensor parallelism: TP=2 (two processes, gloo on CPU) gives exactly the tokens of TP=1.

Spawning processes and importing transformers costs seconds, so one 2-process run does
every check: each rank runs the CLI's parallel path (`run.main` with the torchrun
environment variables set) over a list of argument sets, and the parent compares rank 0's
output with the same command run in one process. With OFFLOAD_TP_BACKEND=nccl (bench/gpu_check.sh)
the ranks use GPUs 0 and 1 and NCCL instead.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from offload_runtime import loading, tp
from offload_runtime.errors import UserError
from offload_runtime.run import main
from offload_runtime.trained import one_thread

BACKEND = os.environ.get("OFFLOAD_TP_BACKEND", "gloo")
DEVICE = "cuda" if BACKEND == "nccl" else "cpu"
ENGINE = ["--budget", "64", "--chunk-size", "8", "--gamma", "4", "--draft-gamma", "3", "--sinks", "4",
          "--window", "64", "--max-new-tokens", "40", "--device", DEVICE, "--dtype", "float32", "--json"]
SAMPLED = ["--temperature", "0.8", "--top-p", "0.95"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, runs: dict, out_dir: str) -> None:
    """One rank: the same CLI runs as every other rank, through run.main's tensor-parallel path."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dev = torch.device("cuda", rank) if BACKEND == "nccl" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # A group made here (not by run.main) stays up across the runs; the timeout turns a deadlock into an error.
    torch.distributed.init_process_group(BACKEND, rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=120))
    results = {}
    for name, argv in runs.items():
        out, err = io.StringIO(), io.StringIO()
        argv = [a.replace("{rank}", str(rank)) for a in argv]  # lets one run fail on one rank only
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        results[name] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
    # Each rank's caches hold only its KV heads.
    model = loading.load(runs["llama greedy autoregressive"][1], dev, "float32",
                         with_tokenizer=False, transform=tp.shard).model
    from offload_runtime.caches.full import FullCache
    from offload_runtime.caches.retrieval import RetrievalCache

    full = FullCache(model.cfg, dev, torch.float32, capacity=16)
    model(torch.arange(5, 21, device=dev), full)
    retrieval = RetrievalCache(model.cfg, dev, torch.float32, budget=8, chunk_size=4)
    retrieval.build(full, 16, [q[:, -1] for q in full.recent_queries])
    results["cache_kv_heads"] = [full.k[0].shape[0], retrieval.k[0].shape[0], full.recent_queries[0].shape[0]]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    torch.distributed.barrier()  # both ranks are done with the group
    # Leave at once, as the CLI's torchrun ranks do: tearing gloo's threads down (destroy_process_group
    # or interpreter exit) aborts now and then with "terminate called without an active exception".
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def tp_runs(checkpoint, long_text, tmp_path_factory):
    """The argument sets (name -> argv) and each rank's results of running them with TP=2."""
    if BACKEND == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs for NCCL")
    llama = checkpoint("llama", num_attention_heads=8, num_key_value_heads=4, attention_bias=True, mlp_bias=True)
    qwen2 = checkpoint("qwen2")
    drafts = {"llama": checkpoint("llama", seed=1), "qwen2": checkpoint("qwen2", seed=1, hidden_size=32,
                                                                         num_attention_heads=2, num_key_value_heads=1)}
    tmp = tmp_path_factory.mktemp("tp")
    prompt = tmp / "prompt.txt"
    prompt.write_text(long_text[:3000])
    runs = {}
    for family, path in (("llama", llama), ("qwen2", qwen2)):
        base = ["--model", str(path), "--prompt-file", str(prompt)] + ENGINE
        draft = ["--draft", str(drafts[family])]
        runs[f"{family} greedy autoregressive"] = base + ["--mode", "autoregressive"]
        runs[f"{family} greedy triforce"] = base
        runs[f"{family} greedy triforce+draft"] = base + draft
        runs[f"{family} sampled autoregressive"] = base + SAMPLED + ["--mode", "autoregressive", "--seed", "5"]
        runs[f"{family} sampled triforce+draft"] = base + SAMPLED + draft + ["--seed", "6"]
        offload = ["--offload", "on", "--on-chip-layers", "1"]  # each rank streams its heads' share from host
        runs[f"{family} offloaded autoregressive"] = base + offload + ["--mode", "autoregressive"]
        runs[f"{family} offloaded triforce+draft"] = base + offload + draft
    (tmp / "prompt_rank0.txt").write_text("Kamiro telan vorsi.")  # no prompt_rank1.txt
    runs["error on rank 1 only"] = ["--model", str(qwen2), "--prompt-file", str(tmp / "prompt_rank{rank}.txt")] + ENGINE
    runs["kv heads 1"] = ["--model", str(checkpoint("llama", num_key_value_heads=1)), "--prompt", "x"] + ENGINE
    world = 2
    mp.spawn(_rank_main, args=(world, _free_port(), runs, str(tmp)), nprocs=world, join=True)
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]
    return runs, ranks


TOKEN_RUNS = [f"{family} {kind}" for family in ("llama", "qwen2") for kind in (
    "greedy autoregressive", "greedy triforce", "greedy triforce+draft", "sampled autoregressive",
    "sampled triforce+draft", "offloaded autoregressive", "offloaded triforce+draft")]


def test_tp2_gives_the_tokens_of_tp1(tp_runs, capsys):
    runs, ranks = tp_runs
    lengths = []
    for name in TOKEN_RUNS:
        rank0, rank1 = ranks[0][name], ranks[1][name]
        assert rank0["code"] == 0 and rank1["code"] == 0, (name, rank0["stderr"], rank1["stderr"])
        assert rank1["stdout"] == "" and rank1["stderr"] == "", f"{name}: only rank 0 prints"
        got = json.loads(rank0["stdout"])
        with one_thread():
            assert main(runs[name]) == 0  # the same command in one process (TP=1)
        want = json.loads(capsys.readouterr().out)
        assert got["token_ids"] == want["token_ids"], name
        assert got["text"] == want["text"]
        if "triforce" in name:
            assert got["stats"]["l3_passes"] == want["stats"]["l3_passes"], name
        if "offloaded" in name:  # each rank streamed only its half of the KV heads
            assert got["stats"]["offloaded_layers"] == want["stats"]["offloaded_layers"] > 0
            assert got["stats"]["h2d_bytes"] * 2 == want["stats"]["h2d_bytes"], name
        lengths.append(len(want["token_ids"]))
    print("generated tokens per run:", dict(zip(TOKEN_RUNS, lengths)))
    assert min(lengths) >= 8, f"runs should generate more than a few tokens: {lengths}"


def test_torchrun_end_to_end(tp_runs):
    """The real launcher: torchrun starts 2 ranks, they make and tear down their own group; one JSON line."""
    runs, ranks = tp_runs
    name = "qwen2 greedy triforce+draft"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", "-m", "offload_runtime.run"] + runs[name],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "only rank 0 prints"
    assert json.loads(lines[0])["token_ids"] == json.loads(ranks[0][name]["stdout"])["token_ids"]
    assert "error" not in proc.stderr


def test_tp2_kv_heads_must_divide(tp_runs):
    _, ranks = tp_runs
    rank0, rank1 = ranks[0]["kv heads 1"], ranks[1]["kv heads 1"]
    assert rank0["code"] == 2 and rank1["code"] == 2
    lines = rank0["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "num_key_value_heads (1) to be a multiple of 2" in lines[0]
    assert rank1["stderr"] == "" and rank0["stdout"] == rank1["stdout"] == ""


def test_tp2_error_on_one_rank_ends_all_ranks(tp_runs):
    _, ranks = tp_runs
    rank0, rank1 = ranks[0]["error on rank 1 only"], ranks[1]["error on rank 1 only"]
    assert rank0["code"] == 2 and rank1["code"] == 2
    lines = rank0["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 1: prompt file") and "does not exist" in lines[0], lines
    assert rank1["stderr"] == "" and rank0["stdout"] == rank1["stdout"] == ""


def test_tp2_caches_hold_the_ranks_kv_heads(tp_runs):
    _, ranks = tp_runs
    for r in ranks:
        assert r["cache_kv_heads"] == [2, 2, 4]  # llama 8 query / 4 KV heads, split over 2 ranks


def test_shards_partition_the_weights(checkpoint):
    """Slicing alone (no process group): rank shards put back together are the original weights."""
    path = str(checkpoint("llama", num_attention_heads=8, num_key_value_heads=4, attention_bias=True, mlp_bias=True))
    whole = loading.load(path, torch.device("cpu"), with_tokenizer=False).model
    shards = [tp.shard(loading.load(path, torch.device("cpu"), with_tokenizer=False).model, r, 2) for r in range(2)]
    w, s = whole.model.layers[1], [m.model.layers[1] for m in shards]
    for name in ("q_proj", "k_proj", "v_proj"):
        for p in ("weight", "bias"):
            full = getattr(getattr(w.self_attn, name), p)
            assert torch.equal(torch.cat([getattr(getattr(x.self_attn, name), p) for x in s]), full)
    assert torch.equal(torch.cat([x.self_attn.o_proj.weight for x in s], dim=1), w.self_attn.o_proj.weight)
    assert torch.equal(torch.cat([x.mlp.gate_proj.weight for x in s]), w.mlp.gate_proj.weight)
    assert torch.equal(torch.cat([x.mlp.down_proj.weight for x in s], dim=1), w.mlp.down_proj.weight)
    assert all(torch.equal(x.self_attn.o_proj.tp_bias, w.self_attn.o_proj.bias) for x in s)
    assert all(x.mlp.down_proj.bias is None and torch.equal(x.mlp.down_proj.tp_bias, w.mlp.down_proj.bias) for x in s)
    assert torch.equal(shards[1].lm_head.weight, whole.lm_head.weight)
    cfg = shards[0].cfg
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.kv_groups) == (4, 2, 64, 2)
    for x in s:  # each rank's rows fused again (the whole model's fused matrices would be stale)
        attn, mlp = x.self_attn, x.mlp
        assert attn.qkv.current([attn.q_proj, attn.k_proj, attn.v_proj]) and mlp.gate_up.current([mlp.gate_proj, mlp.up_proj])
        assert x.self_attn.qkv.weight.shape[0] == (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        assert x.mlp.gate_up.weight.shape[0] == 2 * cfg.intermediate_size
    assert (shards[1].tp_rank, shards[1].tp_world_size) == (1, 2)
    with pytest.raises(ValueError, match="already sharded"):
        tp.shard(shards[0], 0, 2)


def test_uneven_split_is_a_user_error(checkpoint):
    model = loading.load(str(checkpoint("llama", num_key_value_heads=1)), torch.device("cpu"), with_tokenizer=False).model
    with pytest.raises(UserError, match=r"num_key_value_heads \(1\) to be a multiple of 2"):
        tp.shard(model, 0, 2)
    model = loading.load(str(checkpoint("llama")), torch.device("cpu"), with_tokenizer=False).model
    with pytest.raises(UserError, match=r"num_key_value_heads \(2\) to be a multiple of 3"):
        tp.shard(model, 0, 3)
    assert model.cfg.num_kv_heads == 2  # nothing was changed
