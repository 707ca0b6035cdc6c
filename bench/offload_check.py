"""GPU check for the host-resident cache: link bandwidth, achieved H2D GB/s of the L3 pass and
the fraction of it the compute stream spent waiting on copies; then an end-to-end decode.

    python bench/offload_check.py [--out results.json] [--layers 32 --context 16384]

Part 1 streams Llama-2-7B-shaped layers (32 KV heads x 128, fp16) through the scheduler with
the L3 pass's per-layer compute (attention of gamma+1 queries over the slab + the layer's
matmuls). Part 2 runs a synthetic random model (7B-shaped layers, fewer of them) with the
full cache on the GPU and offloaded, and reports tokens/s, bytes/token, GB/s and waits.
Without CUDA it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload_runtime.config import ModelConfig  # noqa: E402
from offload_runtime.cuda_streams import LayerPipeline, link_bandwidth, make_backend  # noqa: E402
from offload_runtime.generate import generate_autoregressive  # noqa: E402
from offload_runtime.kernels import attention  # noqa: E402
from offload_runtime.launch import offloaded_cache  # noqa: E402
from offload_runtime.model import CausalLM  # noqa: E402
from offload_runtime.sampling import SamplingParams  # noqa: E402
from offload_runtime.synthetic import hf_config  # noqa: E402

HEADS, HEAD_DIM, HIDDEN, INTER = 32, 128, 4096, 11008


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def l3_pass_bench(layers: int, context: int, passes: int, gamma: int, dev: torch.device = torch.device("cuda"),
                  dtype: torch.dtype = torch.float16) -> dict:
    """Stream `layers` 7B-shaped layers of `context` rows per pass, with the pass's compute per layer."""
    backend = make_backend(dev)
    t = time.perf_counter()
    pipe = LayerPipeline(backend, layers, (2, HEADS, HEAD_DIM), context + 64, dtype)
    alloc_s = time.perf_counter() - t
    pipe.host.fill_(0.01)
    w = torch.randn(HIDDEN, 3 * INTER + 4 * HIDDEN, device=dev, dtype=dtype) * 0.01
    x = torch.randn(gamma + 1, HIDDEN, device=dev, dtype=dtype)
    q = torch.randn(HEADS, gamma + 1, HEAD_DIM, device=dev, dtype=dtype)
    pos = torch.arange(context + gamma + 1, device=dev)

    def one_pass() -> None:
        pipe.begin_pass(context)
        for i in range(layers):
            slab = pipe.acquire(i)
            slab[context:context + gamma + 1] = 0.5
            kv = slab[: context + gamma + 1]
            attention(q, kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1), pos[context:], pos)
            x @ w  # the layer's weight traffic (q/k/v/o + MLP), roughly
            pipe.release(i, context, context + gamma + 1)

    one_pass()  # warm-up
    sync(dev)
    before = backend.collect()
    t = time.perf_counter()
    for _ in range(passes):
        one_pass()
    sync(dev)
    wall = (time.perf_counter() - t) / passes
    s = backend.collect().minus(before)
    # the same copies alone, for the copy-bound floor
    t = time.perf_counter()
    for i in range(layers):
        pipe.slabs[i % len(pipe.slabs)][:context].copy_(pipe.host[i, :context], non_blocking=True)
    sync(dev)
    copy_only = time.perf_counter() - t
    return {
        "layers": layers, "context": context, "gamma": gamma, "passes": passes,
        "pinned_alloc_s": alloc_s,
        "bytes_per_pass": s.h2d_bytes / passes,
        "pass_s": wall,
        "copies_alone_s": copy_only,
        "achieved_h2d_gbps": s.h2d_gbps,
        "pass_gbps": s.h2d_bytes / passes / wall / 1e9,
        "wait_fraction_of_pass": s.wait_s / passes / wall,
        "writeback_bytes_per_pass": s.d2h_bytes / passes,
    }


def end_to_end(layers: int, prompt: int, new_tokens: int, dev: torch.device = torch.device("cuda"),
               dtype: torch.dtype = torch.float16) -> dict:
    cfg = ModelConfig.from_hf(hf_config("llama", 32000, num_hidden_layers=layers, hidden_size=HIDDEN,
                                        intermediate_size=INTER, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                                        max_position_embeddings=prompt + new_tokens + 64))
    with torch.device(dev):
        model = CausalLM(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.02 * torch.randn_like(p))
    model.rope.to(dev)
    model.eval().requires_grad_(False)
    ids = torch.randint(0, 32000, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams()
    out = {}
    on_gpu = generate_autoregressive(model, ids, new_tokens, params, [])
    out["on_gpu"] = {k: on_gpu.stats[k] for k in ("prefill_s", "decode_tokens_per_s")}
    for on_chip in (0, layers // 2):
        cache = offloaded_cache(cfg, dev, dtype, prompt + new_tokens, on_chip)  # the device's link, measured once
        r = generate_autoregressive(model, ids, new_tokens, params, [], cache=cache)
        out[f"offloaded_on_chip_{on_chip}"] = {
            k: r.stats[k] for k in ("prefill_s", "decode_tokens_per_s", "h2d_bytes_per_token", "h2d_gbps",
                                    "copy_wait_fraction_of_l3", "link_fraction", "prefill_d2h_bytes")}
        out[f"offloaded_on_chip_{on_chip}"]["same_tokens_as_on_gpu"] = r.token_ids == on_gpu.token_ids
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--gamma", type=int, default=6)
    ap.add_argument("--e2e-layers", type=int, default=8)
    ap.add_argument("--e2e-prompt", type=int, default=8192)
    ap.add_argument("--e2e-new", type=int, default=16)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("offload_check: no CUDA device, skipped")
        return 0
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "link_h2d_gbps": link_bandwidth("cuda", refresh=True)}
    print(f"link: {result['link_h2d_gbps']:.1f} GB/s pinned H2D on {result['device']}", flush=True)
    result["l3_pass"] = l3_pass_bench(args.layers, args.context, args.passes, args.gamma)
    p = result["l3_pass"]
    print(f"L3 pass: {p['bytes_per_pass'] / 2**30:.2f} GiB in {p['pass_s'] * 1e3:.1f} ms "
          f"(copies alone {p['copies_alone_s'] * 1e3:.1f} ms): copy engine {p['achieved_h2d_gbps']:.1f} GB/s, "
          f"pass {p['pass_gbps']:.1f} GB/s = {p['pass_gbps'] / result['link_h2d_gbps']:.0%} of link; "
          f"compute waited on copies {p['wait_fraction_of_pass']:.0%} of the pass", flush=True)
    torch.cuda.empty_cache()
    result["end_to_end"] = end_to_end(args.e2e_layers, args.e2e_prompt, args.e2e_new)
    print(json.dumps(result["end_to_end"], indent=1), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
