"""The Triton kernels compile for an NVIDIA GPU (sm_89) on a machine without one.

The interpreter runs the kernels' Python but not Triton's compiler, so type and shape rules
of the compiled path would otherwise only fail on a GPU. Runs in a subprocess: this test
session imported the kernels in interpreter mode (tests/conftest.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm89(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    proc = subprocess.run([sys.executable, "-m", "bench.kernels_compile_check", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if "ptxas" in proc.stdout + proc.stderr and "not found" in proc.stdout + proc.stderr:
        pytest.skip("this triton install has no ptxas")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "all kernels compiled" in proc.stdout
