"""The GPU decode kernels compile for an H200 (sm_90), not only run in the CPU interpreter.

The interpreter executes kernel bodies as Python: code that only the compiler rejects (a pointer argument that is
None in a branch the interpreter never takes, a dynamic `if` on a value the compiler needs constant) passes there and
fails on the GPU. benchmarks/kernel_compile.py records every launch of the 8B-shaped decode step and compiles each
variant with Triton's own toolchain (ptxas ships in its wheel), in a process without TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # this process's other tests need it before triton is imported
from wina.runtime import triton_kernels as tk  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_compile.py"


@pytest.mark.skipif(not tk.HAVE_TRITON, reason="triton is not installed")
def test_decode_kernels_compile_for_h200_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(SCRIPT), "--json"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    kernels = {r["kernel"] for r in rows}
    assert {"_sparse_gemv_kernel", "_compact_kernel", "_stream_kernel", "_rmsnorm_kernel", "_rope_attention_kernel",
            "_argmax_part_kernel", "_argmax_last_kernel", "_glu_kernel", "_mlp_kernel"} <= kernels, kernels
    steps = {r["variant"].rsplit(" #", 1)[0] for r in rows}
    assert {"qkv wina", "o teal", "mlp wina", "mlp teal", "dense", "attention", "hand-over wina", "hand-over teal",
            "dense hand-over", "attention hand-over"} <= steps, steps
    # the MLP's three launches: compaction (norm fused), gate/up stream with down's list epilogue, down stream
    assert [r["kernel"] for r in rows if r["variant"].startswith("mlp wina")] == [
        "_compact_kernel", "_stream_kernel", "_stream_kernel"]
    # or two: compaction, then gate/up and down in one launch (`MLP_FUSED`)
    assert [r["kernel"] for r in rows if r["variant"].startswith("mlp fused wina")] == [
        "_compact_kernel", "_mlp_kernel"]
    for r in rows:  # registers within the limit, nothing spilled to local memory
        assert r["regs"] is not None and r["regs"] <= 255 and r["local"] == 0, r
    # the MLP kernel's programs are all resident at once (two per SM): at 8 list chunks it needed 160 registers, one
    # program per SM and two waves, and decoded 20 % slower on the H200 (docs/BENCHMARKS.md, session 7)
    for r in rows:
        if r["kernel"] == "_mlp_kernel":
            assert r["per_sm"] >= 2 and r["waves"] == 1, r
