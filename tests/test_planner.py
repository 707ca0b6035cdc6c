"""The memory planner with mocked device and host memory, and the CLI's refusals (exit 2, one line)."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from transformers import LlamaConfig

from offload_runtime import planner
from offload_runtime.caches.streaming import StreamingCache
from offload_runtime.config import ModelConfig
from offload_runtime.errors import UserError
from offload_runtime.planner import GiB, Resources, plan_memory
from offload_runtime.run import main

LLAMA2_7B = ModelConfig.from_hf(LlamaConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=131072))
LLAMA_68M = ModelConfig.from_hf(LlamaConfig(
    vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12,
    num_key_value_heads=12))
CTX = 131072  # 128K tokens
RTX_4090 = dict(gpu_total=24564 * 2**20, gpu_free=int(23.5 * GiB), gpu_name="NVIDIA GeForce RTX 4090")


def plan_7b(host_gib: float, gpu_free_gib: float | None = None, **kw):
    gpu = dict(RTX_4090)
    if gpu_free_gib is not None:
        gpu["gpu_free"] = int(gpu_free_gib * GiB)
    res = Resources("cuda", int(host_gib * GiB), **gpu)
    return plan_memory(LLAMA2_7B, torch.float16, CTX, res, new_tokens=256, draft_cfg=LLAMA_68M, **kw)


def test_parameter_count_of_llama2_7b():
    assert abs(planner.count_parameters(LLAMA2_7B) - 6_738_415_616) == 0
    assert 67e6 < planner.count_parameters(LLAMA_68M) < 69e6


def test_7b_at_128k_on_a_24gb_card_picks_offloading():
    plan = plan_7b(host_gib=128)
    # the full cache is 64 GiB (0.5 MiB per token): almost all of it lives in host memory
    assert plan.on_chip_layers == 1 and plan.offloaded_layers == 31
    assert plan.pinned_host == 31 * CTX * 2 * 32 * 128 * 2 == 62 * GiB
    assert plan.slabs == 2 * 2 * GiB  # two device slabs of one layer at 128K
    assert abs(plan.weights / GiB - 12.55) < 0.01
    assert plan.gpu_needed <= plan.gpu_free
    assert plan.gpu_needed + 2 * GiB > plan.gpu_free  # a second on-chip layer would not fit


def test_7b_at_128k_refuses_without_enough_host_memory():
    with pytest.raises(UserError) as err:
        plan_7b(host_gib=48)
    msg = str(err.value)
    assert msg.startswith("needs 62.0 GiB of pinned host memory for 131072 tokens (31 offloaded layers), "
                          "46.0 GiB available; try --max-context "), msg
    suggested = int(msg.rsplit("--max-context ", 1)[1])
    assert 90_000 < suggested < CTX and suggested % 1024 == 0
    res = Resources("cuda", 48 * GiB, **RTX_4090)  # the suggestion fits
    plan = plan_memory(LLAMA2_7B, torch.float16, suggested, res, new_tokens=256, draft_cfg=LLAMA_68M)
    assert plan.host_needed <= 46 * GiB


def test_7b_refuses_a_card_too_small_for_weights():
    with pytest.raises(UserError, match=r"needs .* GiB of GPU memory for 131072 tokens \(weights 12.6.* 11.0 GiB free; "
                                        r"the model does not fit even with a short context"):
        plan_7b(host_gib=128, gpu_free_gib=11)


def test_short_context_keeps_everything_on_chip():
    res = Resources("cuda", 128 * GiB, **RTX_4090)
    plan = plan_memory(LLAMA2_7B, torch.float16, 8192, res, new_tokens=256, draft_cfg=LLAMA_68M)
    assert plan.on_chip_layers == 32 and not plan.offload and plan.pinned_host == 0


def test_explicit_on_chip_layers():
    plan = plan_7b(host_gib=128, on_chip_layers=0)
    assert plan.offloaded_layers == 32 and plan.pinned_host == 64 * GiB
    with pytest.raises(UserError, match="GiB of GPU memory .* on-chip KV 10.0 for 5 layers"):
        plan_7b(host_gib=128, on_chip_layers=5)
    for bad in (-1, 33):
        with pytest.raises(UserError, match=f"--on-chip-layers {bad} must be between 0 and the model's 32 layers"):
            plan_7b(host_gib=128, on_chip_layers=bad)


def test_tensor_parallel_halves_each_gpu_share():
    one, two = plan_7b(host_gib=256), plan_7b(host_gib=256, tp=2)
    vocab = 32000 * 4096 * 2 * 2  # embeddings + lm_head in bf16: replicated on every rank
    assert two.weights == (one.weights - vocab) // 2 + vocab
    assert two.on_chip_layers > one.on_chip_layers
    with pytest.raises(UserError, match=r"num_key_value_heads \(\d+\) to be a multiple of 3"):
        plan_7b(host_gib=256, tp=3)


def test_cpu_plan_counts_everything_in_host_memory():
    res = Resources("cpu", 64 * GiB)
    plan = plan_memory(LLAMA2_7B, torch.float32, 4096, res, new_tokens=128)
    assert plan.device == "cpu" and not plan.offload and plan.on_chip_layers == 32
    assert plan.host_needed > plan.weights + 32 * 4096 * 2 * 32 * 128 * 4
    with pytest.raises(UserError, match=r"needs .* GiB of host memory for 131072 tokens .* 62.0 GiB available"):
        plan_memory(LLAMA2_7B, torch.float32, CTX, res, new_tokens=128)


def test_probe_resources_without_a_driver_plans_for_cpu(monkeypatch):
    fake = types.ModuleType("pynvml")

    def no_driver():
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = no_driver
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(planner, "host_available", lambda: 7 * GiB)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert planner.probe_resources("cuda") == Resources("cpu", 7 * GiB)
    assert planner.probe_resources("cpu") == Resources("cpu", 7 * GiB)


def test_probe_resources_reads_nvml(monkeypatch):
    fake = types.ModuleType("pynvml")
    fake.nvmlInit = fake.nvmlShutdown = lambda: None
    fake.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=24 * GiB, free=20 * GiB, used=4 * GiB)
    fake.nvmlDeviceGetName = lambda h: b"NVIDIA GeForce RTX 4090"
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(planner, "host_available", lambda: 60 * GiB)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert planner.probe_resources("cuda") == Resources("cuda", 60 * GiB, 24 * GiB, 20 * GiB, "NVIDIA GeForce RTX 4090")


# -- the CLI: one `error:` line, exit 2, refused before any weight or cache is allocated ------------

PROMPT = "Kamiro telan vorsi lu den. Paqui astber onul zeha?"


def cli_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if weights are loaded: refusals must come before any allocation."""
    from offload_runtime import loading

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the plan was refused")

    monkeypatch.setattr(loading, "load", boom)


def test_cli_not_enough_host_memory(capsys, checkpoint, monkeypatch, no_loading):
    monkeypatch.setattr(planner, "probe_resources", lambda device: Resources("cpu", 1000))
    msg = cli_error(capsys, ["--model", str(checkpoint("llama")), "--prompt", PROMPT])
    assert "GiB of host memory for" in msg and "0.0 GiB available" in msg


def test_cli_not_enough_pinned_host_memory(capsys, checkpoint, monkeypatch, no_loading):
    res = Resources("cuda", 300 * 2**20, gpu_total=8 * GiB, gpu_free=8 * GiB)
    monkeypatch.setattr(planner, "probe_resources", lambda device: res)
    path = checkpoint("llama", max_position_embeddings=2**20)  # --max-context may not exceed the model's
    msg = cli_error(capsys, ["--model", str(path), "--prompt", PROMPT, "--on-chip-layers", "0",
                             "--max-context", "1000000"])
    assert "GiB of pinned host memory for 1000000 tokens (2 offloaded layers), 0.3 GiB available; try --max-context" in msg


def test_cli_not_enough_gpu_memory(capsys, checkpoint, monkeypatch, no_loading):
    res = Resources("cuda", 64 * GiB, gpu_total=GiB, gpu_free=GiB // 2)
    monkeypatch.setattr(planner, "probe_resources", lambda device: res)
    msg = cli_error(capsys, ["--model", str(checkpoint("llama")), "--prompt", PROMPT])
    assert "GiB of GPU memory for" in msg and "0.5 GiB free" in msg


@pytest.mark.parametrize("flags,needle", [
    (["--on-chip-layers", "3"], "--on-chip-layers 3 must be between 0 and the model's 2 layers"),
    (["--on-chip-layers", "-1"], "--on-chip-layers must be a non-negative integer or auto, got -1"),
    (["--on-chip-layers", "some"], "--on-chip-layers must be a non-negative integer or auto, got some"),
    (["--max-context", "0"], "--max-context must be positive"),
    (["--max-context", "20"], "is longer than --max-context 20"),
    (["--offload", "off", "--on-chip-layers", "1"], "--on-chip-layers 1 offloads layers, but --offload is off"),
    (["--offload", "maybe"], "invalid choice"),
])
def test_cli_bad_offload_flags(capsys, checkpoint, no_loading, flags, needle):
    msg = cli_error(capsys, ["--model", str(checkpoint("llama")), "--prompt", PROMPT] + flags)
    assert needle in msg, msg


@pytest.mark.parametrize("mode", ["autoregressive", "triforce"])
def test_cli_offloaded_run_reports_transfers(capsys, checkpoint, mode):
    import json

    argv = ["--model", str(checkpoint("llama")), "--prompt", PROMPT * 3, "--mode", mode, "--max-new-tokens", "8",
            "--budget", "16", "--chunk-size", "4", "--json"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["stats"]["memory_plan"]["device"] == "cpu" and "offloaded_layers" not in plain["stats"]
    assert main(argv + ["--on-chip-layers", "1", "--max-context", "500"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == plain["token_ids"]
    s = out["stats"]
    assert s["offloaded_layers"] == 1 and s["on_chip_layers"] == 1 and s["cache_capacity_tokens"] == 500
    assert s["h2d_bytes"] > 0 and s["h2d_bytes_per_token"] > 0 and s["prefill_d2h_bytes"] > 0
    assert s["link_gbps"] is None  # no link on CPU


# -- the server's several contexts (--context-ram-gb): each counted with its own caches --------------

CTX_8K_KV = 32 * 8192 * 2 * 32 * 128 * 2  # Llama-2-7B's full cache at 8K tokens in fp16: 4 GiB


def plan_cpu_8k(host_gib: float, ram_gib: float):
    return plan_memory(LLAMA2_7B, torch.float16, 8192, Resources("cpu", int(host_gib * GiB)), new_tokens=256,
                       context_ram=int(ram_gib * GiB))


def test_each_context_counts_its_full_and_retrieval_caches():
    one, two = plan_cpu_8k(64, 0), plan_cpu_8k(64, 10)  # 10 GiB: two 4 GiB caches
    assert one.context_ram == CTX_8K_KV == 4 * GiB and (one.contexts, one.contexts_asked) == (1, 1)
    assert (two.contexts, two.contexts_asked) == (2, 2)
    assert two.host_needed - one.host_needed == 4 * GiB + one.retrieval  # the weights once
    assert plan_cpu_8k(64, 7.9) == one  # a budget below two contexts: one, as without the flag


def test_a_host_that_holds_fewer_contexts_gets_fewer():
    plan = plan_cpu_8k(40, 40)  # 10 asked; 38 GiB usable: weights and 4 x (4 GiB + retrieval)
    assert (plan.contexts, plan.contexts_asked) == (4, 10)
    assert plan.host_needed <= planner.host_usable(40 * GiB) < plan.host_needed + 4 * GiB + plan.retrieval


def test_a_pool_refused_when_two_contexts_do_not_fit_the_host():
    with pytest.raises(UserError) as err:
        plan_cpu_8k(20, 40)  # one context (19.0 GiB) fits, two (25.2 GiB) do not
    assert str(err.value) == ("--context-ram-gb 40 asks for 10 contexts of 4.0 GiB, but two need 25.2 GiB of host "
                              "memory for 8192 tokens each, 19.0 GiB available; serve one context (no --context-ram-gb) "
                              "or plan shorter ones (--max-context)")


def test_on_a_gpu_each_context_holds_its_on_chip_layers_slabs_and_retrieval_cache():
    res = Resources("cuda", 128 * GiB, **RTX_4090)
    kw = dict(new_tokens=256, draft_cfg=LLAMA_68M, offload="on")
    one = plan_memory(LLAMA2_7B, torch.float16, 32768, res, **kw)
    pool = plan_memory(LLAMA2_7B, torch.float16, 32768, res, **kw, context_ram=64 * GiB)
    assert one.on_chip_layers == 12 and one.context_ram == one.pinned_host == 20 * 32768 * 2 * 32 * 128 * 2
    # 6 asked (64 GiB of 10 GiB caches); a third context's slabs and 2.25 GiB retrieval cache overflow the card
    assert (pool.contexts, pool.contexts_asked, pool.on_chip_layers) == (2, 6, 2)
    assert pool.context_ram == pool.pinned_host == 30 * 32768 * 2 * 32 * 128 * 2  # 15 GiB each
    assert pool.host_needed == 2 * pool.pinned_host and pool.gpu_needed <= pool.gpu_free
    # a second context's retrieval and draft caches; 2 x (2 on-chip layers + 2 slabs) of 0.5 GiB, not 12 + 2
    draft_kv = StreamingCache.planned_bytes(LLAMA_68M, torch.float16, 256)
    assert pool.gpu_needed - one.gpu_needed == pool.retrieval + draft_kv + 8 * GiB // 2 - 14 * GiB // 2
    with pytest.raises(UserError, match=r"^--context-ram-gb 128 asks for 2 contexts of 62.0 GiB, but two need 27.7 GiB "
                                        r"of GPU memory for 131072 tokens each, 23.5 GiB free; serve one context"):
        plan_memory(LLAMA2_7B, torch.float16, CTX, res, **kw, context_ram=128 * GiB)  # two contexts' slabs: 8 GiB
    with pytest.raises(UserError, match=r"^--context-ram-gb keeps each context's full cache in host memory, but this "
                                        r"plan holds all 32 layers on the GPU \(--offload off or --on-chip-layers 32\)$"):
        plan_memory(LLAMA2_7B, torch.float16, 8192, res, new_tokens=256, on_chip_layers=32, context_ram=64 * GiB)


def test_on_a_gpu_a_pool_offloads_the_full_cache(checkpoint, monkeypatch):
    """--context-ram-gb on CUDA: --offload auto plans the contexts' full caches in host memory even when
    one would fit on the GPU (they are what the flag keeps in RAM); --offload off is refused."""
    from offload_runtime import launch, loading
    from offload_runtime.cli_args import parse_serve_args

    res = Resources("cuda", 64 * GiB, gpu_total=8 * GiB, gpu_free=8 * GiB)
    monkeypatch.setattr(planner, "probe_resources", lambda device: res)
    path = checkpoint("llama")
    hf = loading.load_hf_config(path)
    config = parse_serve_args(["--model", str(path)]).run
    cuda = torch.device("cuda")
    alone, offload = launch.plan_run(config, cuda, path, hf, 100)
    assert not offload and alone.offloaded_layers == 0
    pool, offload = launch.plan_run(config, cuda, path, hf, 100, context_ram=GiB)
    assert offload and pool.offloaded_layers > 0 and pool.contexts == pool.contexts_asked > 2
    off = parse_serve_args(["--model", str(path), "--offload", "off"]).run
    with pytest.raises(UserError, match="--context-ram-gb keeps each context's full cache in host memory"):
        launch.plan_run(off, cuda, path, hf, 100, context_ram=GiB)
