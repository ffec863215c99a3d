"""Compile the GPU decode kernels for an H200 (sm_90) on any machine, no GPU needed.

The host code of the Llama-3-8B-shaped decode step (q/k/v, attention, o, the MLP both ways, the dense side, argmax)
runs on CPU tensors while every Triton launch is recorded instead of run; each recorded variant (same configs and
constexprs as on the H200, programmatic dependent launch on) is then compiled by Triton's own toolchain (its wheel
carries ptxas). Prints registers, spills, shared memory and the programs resident per SM (computed from those, for an
H200's 132 SMs: how many waves the grid takes) per variant and a hash of its machine code (SASS
instructions): `--against REV` builds REV's kernels the same way and names the variants whose code differs (or only
their registers), so a refactor meant to leave the kernels alone can be checked without a GPU (the answer carries
over to the device when the Triton versions match, both using the ptxas in Triton's wheel: `pip install --no-deps
--target DIR triton==X` and put DIR first on PYTHONPATH). Different machine code is not slower code: only the GPU can
say that.

    python benchmarks/kernel_compile.py [--json] [--against REV] [--arch 90]

tests/test_kernel_compile.py runs it: kernels must compile for the GPU, not only in the CPU interpreter.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "int32": "i32", "int64": "i64", "bool": "i1"}


@contextmanager
def recording(records: list, step: list):
    """Record (step label, kernel, bound arguments, launch options) for every Triton launch instead of running it."""
    from triton.runtime.jit import JITFunction

    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        params = self.signature.parameters
        bound = self.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in params})
        bound.apply_defaults()
        opts = {k: v for k, v in kwargs.items() if k not in params}
        records.append((step[0], self, dict(bound.arguments), dict(opts, grid=tuple(grid))))

    from wina.runtime import triton_decode as td
    from wina.runtime import triton_kernels as tk

    pdl = tk.pdl_args
    # the launch kwargs an H200 gets (CPU tensors get none); trees before session 13 (`--against`) lack the split
    as_on_h200 = (lambda device, role="": tk.pdl_role_args(role)) if hasattr(tk, "pdl_role_args") else pdl
    JITFunction.run = record
    tk.pdl_args = td.pdl_args = as_on_h200
    try:
        yield
    finally:
        JITFunction.run = run
        tk.pdl_args = td.pdl_args = pdl


def drive(step: list) -> None:
    """The H200 decode step's kernel launches at the Llama-3-8B shape (bf16, batch 1), WINA and TEAL."""
    import torch

    from wina.runtime import triton_decode as td
    from wina.runtime import triton_kernels as tk

    bf = torch.bfloat16
    K, F, V, HD, NQ, NKV, L = 4096, 14336, 128256, 128, 32, 8, 192
    qkv_seg, gu_seg = (4096, 1024, 1024), (F, F)
    e = lambda *s, dt=bf: torch.empty(*s, dtype=dt)  # noqa: E731  (never read: nothing runs)
    x, gain, eps = e(1, K), e(K), 1e-5
    w_qkv, w_o, w_gu, w_d = e(K, sum(qkv_seg)), e(K, K), e(K, 2 * F), e(F, K)
    f32 = torch.float32
    for method, sc3, sc_o, sc_gu, sc_d in (("wina", e(3, K, dt=f32), e(1, K, dt=f32), e(2, K, dt=f32), e(F, dt=f32)),
                                           ("teal", None, None, None, None)):
        step[0] = f"qkv {method}"
        tk.sparse_gemv_segments(x, w_qkv, e(3, dt=f32), qkv_seg, sc3, norm=(gain, eps))
        step[0] = f"o {method}"
        tk.sparse_gemv_segments(x, w_o, e(1, dt=f32), (K,), sc_o, residual=x)
        step[0] = f"mlp {method}"
        tk.sparse_mlp(x, w_gu, e(2, dt=f32), gu_seg, sc_gu, None, (gain, eps), w_d, e(1, dt=f32), sc_d, x,
                      config=tk.pick_config(1, K, 2 * F, gu_seg))
        step[0] = f"mlp fused {method}"  # compaction, then gate/up and down in one launch
        tk.sparse_mlp(x, w_gu, e(2, dt=f32), gu_seg, sc_gu, None, (gain, eps), w_d, e(1, dt=f32), sc_d, x,
                      config=tk.MLP_FUSED)
        if method == "wina":  # the diagnostic variant (gpu_profile.py --mlp-timeline) must compile too
            step[0] = "mlp fused trace"
            tk.MLP_TRACE = e(F // tk.MLP_FUSED["block_f"], tk.MLP_TRACE_SLOTS, dt=torch.int64)
            try:
                tk.sparse_mlp(x, w_gu, e(2, dt=f32), gu_seg, sc_gu, None, (gain, eps), w_d, e(1, dt=f32), sc_d, x,
                              config=tk.MLP_FUSED)
            finally:
                tk.MLP_TRACE = None
        # the decode step handing partial sums over (`HAND_OVER`): q/k/v's to the attention, o's (clearing
        # q/k/v's) to the compaction, whose MLP kernel clears o's
        step[0] = f"hand-over {method}"
        p_qkv, p_o = e(1, sum(qkv_seg), dt=f32), e(1, K, dt=f32)
        tk.sparse_gemv_segments(x, w_qkv, e(3, dt=f32), qkv_seg, sc3, norm=(gain, eps), partial=p_qkv)
        tk.sparse_gemv_segments(x, w_o, e(1, dt=f32), (K,), sc_o, partial=p_o, clear=p_qkv)
        tk.sparse_mlp(x, w_gu, e(2, dt=f32), gu_seg, sc_gu, None, (gain, eps), w_d, e(1, dt=f32), sc_d, None,
                      config=tk.MLP_FUSED, pending=(p_o, None))
        step[0] = f"down split-K {method}"  # the decode step's down when gate/up runs split-K
        tk.sparse_gemv_segments(e(1, 2 * F), w_d, e(1, dt=f32), (K,), None if sc_d is None else sc_d.reshape(1, -1),
                                residual=x, glu=True)
    step[0] = "dense"
    tk.rms_norm(x, gain, eps)
    tk.sparse_gemv_segments(x, w_o, e(1, dt=f32), (K,), residual=x, all_rows=True)
    tk.sparse_gemv_segments(e(1, 2 * F), w_d, e(1, dt=f32), (K,), residual=x, glu=True, all_rows=True)
    step[0] = "dense hand-over"  # o's partial sums to the RMSNorm before gate/up
    p_o = e(1, K, dt=f32)
    tk.sparse_gemv_segments(x, w_o, e(1, dt=f32), (K,), all_rows=True, partial=p_o)
    tk.rms_norm(x, gain, eps, pending=(p_o, None))
    step[0] = "attention"
    pos = torch.zeros(1, dtype=torch.int64)
    td.rope_attention(e(NQ * HD), e(NKV * HD), e(NKV * HD), e(1, HD), e(1, HD), pos, e(1, NKV, L, HD),
                      e(1, NKV, L, HD))
    step[0] = "attention hand-over"  # q/k/v as partial sums, with a q/k/v bias (Qwen2-like)
    td.rope_attention(e(NQ * HD, dt=f32), e(NKV * HD, dt=f32), e(NKV * HD, dt=f32), e(1, HD), e(1, HD), pos,
                      e(1, NKV, L, HD), e(1, NKV, L, HD), partial=True, bias=(e(NQ * HD), e(NKV * HD), e(NKV * HD)))
    step[0] = "argmax"
    td.argmax_two_stage(e(1, V))
    step[0] = "glu"
    td.glu(e(2 * F))


def _specialize(v, specialize: bool) -> tuple:
    """(Triton type, whether it is known divisible by 16) of a launch argument, as `JITFunction.run` derives them."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:  # another Triton: types only
        return _type(v), False
    kind, attr = native_specialize_impl(BaseBackend, v, False, specialize, True)[:2]
    return kind, attr == "D"


def _type(v) -> str:
    import torch

    if isinstance(v, torch.Tensor):
        return "*" + DTYPES[str(v.dtype).removeprefix("torch.")]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(v).__name__}")


def compile_all(arch: int) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    records, step = [], ["?"]
    with recording(records, step):
        drive(step)
    out, seen = [], {}
    for label, fn, args, opts in records:
        sig, const, attrs = {}, {}, {}
        for i, p in enumerate(fn.params):
            v = args[p.name]
            if p.name == "USE_PDL":
                v = True  # as launched on the H200 (pdl_args)
            if p.is_constexpr or v is None:
                sig[p.name], const[p.name] = "constexpr", v
                continue
            # as the JIT specializes a launch: ints equal to 1 become constants; pointers and ints divisible by 16
            # carry that fact (vectorised loads need it)
            kind, attr = _specialize(v, not p.do_not_specialize)
            if kind == "constexpr":
                sig[p.name], const[p.name] = kind, v
            else:
                sig[p.name] = kind
                if attr:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        options = {k: opts[k] for k in ("num_warps", "num_stages") if k in opts}
        key = json.dumps([fn.__name__, sig, {k: repr(v) for k, v in const.items()}, options], sort_keys=True)
        n = seen[label] = seen.get(label, 0) + 1
        t0 = time.perf_counter()
        k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32), options=options)
        regs, local = _resources(k.asm["cubin"])
        code = _sass(k.asm["cubin"])
        shared = getattr(k.metadata, "shared", 0) or 0
        per_sm = programs_per_sm(regs or 255, k.metadata.num_warps, shared)
        programs = math.prod(opts["grid"])
        out.append({"variant": f"{label} #{n}", "kernel": fn.__name__, "regs": regs, "local": local,
                    "shared": shared, "per_sm": per_sm, "programs": programs,
                    "waves": -(-programs // (per_sm * SM90["sms"])) if per_sm else None,
                    "sass_lines": code.count("\n"), "sass_sha": hashlib.sha1(code.encode()).hexdigest()[:12],
                    "canonical_sha": hashlib.sha1(_canonical(code).encode()).hexdigest()[:12],
                    "key_sha": hashlib.sha1(key.encode()).hexdigest()[:12], "compile_s": time.perf_counter() - t0})
    return out


# Per-SM limits of sm_90 (H100 / H200; the H200 has 132 SMs) for the resident-programs estimate.
SM90 = {"regs": 65536, "warps": 64, "programs": 32, "shared": 233472, "shared_reserved": 1024, "sms": 132}


def programs_per_sm(regs: int, warps: int, shared: int) -> int:
    """Programs of a kernel resident at once on one sm_90 SM (computed, not measured): registers are allocated per
    warp in units of 256, each program also holds 1 KB of shared memory reserved by the runtime. A grid larger than
    this times the SM count runs in more than one wave."""
    per_warp = -(-regs * 32 // 256) * 256
    return max(0, min(SM90["regs"] // (per_warp * warps), SM90["warps"] // warps, SM90["programs"],
                      SM90["shared"] // (shared + SM90["shared_reserved"])))


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout


def _sass(cubin: bytes) -> str:
    """The machine code as it runs: instructions only (no addresses, encodings or comments)."""
    import re

    ins = (re.sub(r"/\*[^*]*\*/", "", ln).strip() for ln in _cuobjdump(cubin, "-sass").splitlines()
           if re.match(r"\s*/\*[0-9a-f]{4,}\*/", ln))
    return "\n".join(i for i in ins if i)


def _canonical(sass: str) -> str:
    """SASS without register numbers (and reuse-cache hints): the same opcodes, operand kinds and immediates in
    the same order."""
    import re

    return re.sub(r"\b(UR|UP|R|P)(?!Z\b|T\b)\d+\b", r"\1", sass.replace(".reuse", ""))


def _resources(cubin: bytes) -> tuple:
    """(registers, local memory bytes: spills) from the cubin, via the cuobjdump Triton ships (the compiled
    kernel's n_regs needs a driver)."""
    import re

    txt = _cuobjdump(cubin, "--dump-resource-usage")
    regs = re.search(r"REG:(\d+)", txt)
    local = re.search(r"LOCAL:(\d+)", txt)
    return (int(regs.group(1)) if regs else None, int(local.group(1)) if local else None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON list as the last line")
    ap.add_argument("--against", default="", help="a git revision: name the variants whose code differs there")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200)")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernel_compile: unset TRITON_INTERPRET (the interpreter has no compiler)", file=sys.stderr)
        return 2
    import triton

    rows = compile_all(args.arch)
    if not args.json:
        print(f"triton {triton.__version__}, sm_{args.arch}: {len(rows)} kernel variants")
        for r in rows:
            print(f"  {r['variant']:22s} {r['kernel']:24s} regs {r['regs']!s:>4} local {r['local']!s:>4} "
                  f"shared {r['shared']!s:>6}  {r['programs']:5d} programs, {r['per_sm']:2d}/SM, {r['waves']} wave(s)"
                  f"  sass {r['sass_lines']:5d} lines  {r['sass_sha']}")
    if args.against:
        with tempfile.TemporaryDirectory() as tmp:
            wt = Path(tmp) / "rev"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(wt), args.against],
                           check=True, capture_output=True)
            try:
                env = dict(os.environ, PYTHONPATH=_package_path(wt, Path(tmp)) + os.pathsep
                           + os.environ.get("PYTHONPATH", ""))
                res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--json", "--arch",
                                      str(args.arch)], env=env, capture_output=True, text=True, cwd=tmp)
                if res.returncode:
                    print(res.stderr[-2000:], file=sys.stderr)
                    return 1
                theirs = {r["variant"]: r for r in json.loads(res.stdout.strip().splitlines()[-1])}
            finally:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)], check=False)
        verdict = {}
        for r in rows:
            o = theirs.get(r["variant"], {})
            verdict[r["variant"]] = r["against"] = (
                "identical" if o.get("sass_sha") == r["sass_sha"] else
                "same instructions, other registers" if o.get("canonical_sha") == r["canonical_sha"] else "differs")
        if not args.json:
            for v in ("same instructions, other registers", "differs"):
                names = [k for k, x in verdict.items() if x == v]
                if names:
                    print(f"against {args.against}, {v}: {', '.join(names)}")
            if all(x == "identical" for x in verdict.values()):
                print(f"against {args.against}: identical machine code")
    if args.json:
        print(json.dumps(rows))
    return 0


def _package_path(root: Path, tmp: Path) -> str:
    """A directory where `import wina` resolves to the checkout at `root` (the package layout of pyproject.toml:
    wina/ plus runtime/, calibration/, convert/ as its subpackages), as benchmarks/device_env.sh builds it."""
    pkg = tmp / "path" / "wina"
    pkg.mkdir(parents=True)
    for f in (root / "wina").iterdir():
        (pkg / f.name).symlink_to(f)
    for d in ("runtime", "calibration", "convert"):
        (pkg / d).symlink_to(root / d)
    return str(tmp / "path")


if __name__ == "__main__":
    sys.exit(main())
