"""Compile every Triton kernel for NVIDIA GPUs without one (Triton ships ptxas): catches what
the interpreter cannot (type errors in loops and branches, dot shapes, dtype rules).

    python -m bench.kernels_compile_check [--quick]

Runs the full compiler pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) for sm_80, sm_89
(RTX 4090) and sm_90 (H100) over the dtype / constexpr combinations the dispatch can
launch; --quick compiles one decode configuration per kernel for sm_89. Must run in a
process where TRITON_INTERPRET is unset (interpreted kernels cannot be compiled).
Exit status 1 if any compilation fails.
"""
from __future__ import annotations

import argparse
import os
import time

_STRIDES_ATTENTION = [
    "stride_qh", "stride_qt", "stride_qd", "stride_kh", "stride_kl", "stride_kd", "stride_vh", "stride_vl",
    "stride_vd", "stride_qp", "stride_kph", "stride_kpl", "stride_os", "stride_oh", "stride_ot", "stride_od",
    "stride_ls", "stride_lh", "stride_lt", "n_queries", "n_keys", "head_dim", "split_len",
]
_STRIDES_MERGE = ["stride_ps", "stride_ph", "stride_pt", "stride_pd", "stride_ls", "stride_lh", "stride_lt",
                  "stride_oh", "stride_ot", "stride_od", "stride_eh", "stride_et", "n_splits", "head_dim"]
_STRIDES_CHUNKS = ["stride_ch", "stride_cn", "stride_cd", "stride_qh", "stride_qd", "stride_oh", "stride_on",
                   "n_chunks", "head_dim"]


def jobs(quick: bool) -> list[tuple[str, dict, dict]]:
    """(kernel name, signature, constexprs) for each compilation."""
    out = []
    dtypes = ["fp16"] if quick else ["fp16", "bf16", "fp32"]
    configs = [(4, True, True, False, 16, 128), (1, True, False, True, 64, 128)] if quick else [
        (4, False, False, False, 16, 128), (8, True, True, False, 64, 128), (1, False, True, True, 64, 64),
        (2, True, False, True, 32, 16), (4, True, True, True, 64, 128)]
    for dt in dtypes:
        for groups, window, lse, skip, block_m, block_d in configs:
            for out_dt in sorted({dt, "fp32"}):
                sig = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "QPOS": "*i64", "KPOS": "*i64",
                       "OUT": f"*{out_dt}", "LSE": "*fp32", **{n: "i32" for n in _STRIDES_ATTENTION},
                       "scale_log2": "fp32", "window": "i32"}
                cx = dict(GROUPS=groups, HAS_WINDOW=window, UPCAST=dt == "fp32", WRITE_LSE=lse, SKIP_TILES=skip,
                          BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=block_d)
                out.append(("_attention_kernel", sig, cx))
    for out_dt in (["fp16"] if quick else ["fp32", "fp16", "bf16"]):
        sig = {"PART": "*fp32", "PLSE": "*fp32", "OUT": f"*{out_dt}", "LSE": "*fp32",
               **{n: "i32" for n in _STRIDES_MERGE}}
        out.append(("_merge_kernel", sig, dict(BLOCK_S=16, BLOCK_D=128)))
    for dt in (["bf16"] if quick else ["fp32", "fp16", "bf16"]):
        sig = {"CK": "*fp32", "Q": f"*{dt}", "OUT": "*fp32", **{n: "i32" for n in _STRIDES_CHUNKS}}
        out.append(("_chunk_scores_kernel", sig, dict(GROUPS=4, BLOCK_N=32, BLOCK_D=128)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one configuration per kernel, sm_89 only")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from offload_runtime.kernels import triton_kernels as tk

    archs = [89] if args.quick else [80, 89, 90]
    failed = 0
    for arch in archs:
        for name, sig, cx in jobs(args.quick):
            t0 = time.perf_counter()
            try:
                triton.compile(ASTSource(getattr(tk, name), {**sig, **{k: "constexpr" for k in cx}}, cx),
                               target=GPUTarget("cuda", arch, 32))
                print(f"ok   sm_{arch} {name} {sig.get('Q', sig.get('PART'))}->{sig['OUT']} {cx} "
                      f"{time.perf_counter() - t0:.1f}s", flush=True)
            except Exception as e:  # report every failure, then fail
                failed += 1
                print(f"FAIL sm_{arch} {name} {sig} {cx}: {e!r}", flush=True)
    print("all kernels compiled" if not failed else f"{failed} compilations failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
