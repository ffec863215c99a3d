"""The whole GPU suite in one process (one device call, < 10 minutes on an H200):

    pip install -q --no-deps --no-build-isolation -e . ; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py
    (without pip, as on the device machine: `. benchmarks/device_env.sh` first)

1. correctness: the two-phase "stream" kernel and the original kernel vs the fp32 reference on Llama-3-8B shapes
   (bf16, fp16; WINA and TEAL; bias; silu*mul in the kernel + residual epilogue; RMSNorm in the kernel; every row);
   the two-stage argmax; decode steps through the fast path (fused decode blocks, CUDA graph, PDL) vs the reference
   path on a small random Llama in fp32, dense and sparse (logits); dense logits of this repo's decoder vs
   transformers'; generate() vs transformers' greedy; the cost of one launch in a graph;
2. tuning (skipped with --no-tune, i.e. the defaults `wina bench` runs): per fused matrix (qkv, o, gate_up, down)
   at batch 1, s = 0.5, CUDA-graph time of the default config, its evict-first variant, short-slice split-K configs
   (`latency_grid`) and a random sample of split-K and stream configs;
   the same for q/k/v and gate/up with their RMSNorm inside, and for the dense o and down through the kernel; the
   fastest of each is registered (`set_tuned`);
3. `wina bench --synthetic llama3-8b` logic: per-matrix and per-layer sparse / dense / ideal at s in
   {0, .25, .4, .5, .65} and end-to-end decode tok/s (own dense, own sparse, transformers static dense);
4. acceptance lines; with --long-context the same decode after long prompts; with --profile the per-kernel profile
   of decode (gpu_profile.py); one JSON line (also written to $OUT/gpu_suite.json when OUT is set).
--tune-mlp times the sparse MLP alone in two launches (several `_mlp_kernel` shapes) and in three; --mlp-ab times
the decode loop again with the MLP in three launches and with its compaction in chunks of 4096 and 1024 channels
(same process); --ablate SETTING=VALUE times it again with a runtime setting changed (a `triton_kernels` name,
or module.NAME in wina.runtime, e.g. triton_decode.ATTN_SPLIT=64).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from wina.runtime import bench as wb  # noqa: E402
from wina.runtime import triton_kernels as tk  # noqa: E402
from wina.runtime.kernels import enable_fast_path, disable_fast_path  # noqa: E402

DEV = "cuda"
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# ----------------------------------------------------------------------------- 1. correctness
def check_kernels() -> int:
    bad = n = 0
    shapes = [(4096, 6144, (4096, 1024, 1024)), (14336, 4096, (4096,)), (4096, 28672, (14336, 14336)), (1000, 700, (700,)),
              (777, 400, (128, 208, 64))]
    cfgs = [None, dict(algo="stream", block_n=128, rows=32, split=8), dict(algo="stream", block_n=64, rows=16, split=1),
            dict(algo="stream", block_n=256, rows=32, split=32, compact_ch=512),
            dict(block_n=64, block_k=32, k_per_split=128, num_warps=1)]
    for K, N, seg in shapes:
        for dt in (torch.bfloat16, torch.float16):
            x = torch.randn(1, K, device=DEV, dtype=dt)
            w = torch.randn(K, N, device=DEV, dtype=dt) * 0.05
            sc = torch.rand(len(seg), K, device=DEV) + 0.5
            bias = torch.randn(N, device=DEV, dtype=dt)
            for teal in (False, True):
                s_ = None if teal else sc
                thr = torch.stack([torch.quantile((x.float().abs() * (1 if teal else sc[j])).flatten(), 0.5)
                                   for j in range(len(seg))]).float()
                ref = tk.reference_sparse_gemv_segments(x.float(), w.float(), thr, seg, s_, bias.float())
                ref_lp = tk.reference_sparse_gemv_segments(x, w, thr, seg, s_, bias)
                tol = 2 * (ref_lp.float() - ref).abs().max().item() + 1e-3 * ref.abs().max().item() + 1e-4
                for cfg in cfgs:
                    y = tk.sparse_gemv_segments(x, w, thr, seg, s_, bias, config=cfg)
                    y2 = tk.sparse_gemv_segments(x, w, thr, seg, s_, bias, config=cfg)
                    err = (y.float() - ref).abs().max().item()
                    n += 1
                    if not err <= tol or not (y2.float() - ref).abs().max().item() <= tol:  # split-K atomics: order varies
                        bad += 1
                        log(f"  MISMATCH K={K} N={N} {dt} teal={teal} cfg={cfg}: err {err:.3g} tol {tol:.3g}")
    # the decode step's fused variants: silu(gate)*up computed in the kernel, residual added in its epilogue
    for K, N in ((14336, 4096), (4096, 4096), (1000, 700)):
        for dt in (torch.bfloat16, torch.float16):
            gu = torch.randn(1, 2 * K, device=DEV, dtype=dt)
            h = torch.nn.functional.silu(gu[:, :K]) * gu[:, K:]
            w = torch.randn(K, N, device=DEV, dtype=dt) * 0.05
            sc = torch.rand(K, device=DEV) + 0.5
            res = torch.randn(1, N, device=DEV, dtype=dt)
            thr = torch.quantile((h.float().abs() * sc).flatten(), 0.5).reshape(1)
            ref = tk.reference_sparse_gemv(h.float(), w.float(), thr, sc) + res.float()
            ref_lp = tk.reference_sparse_gemv(h, w, thr, sc) + res
            tol = 2 * (ref_lp.float() - ref).abs().max().item() + 1e-3 * ref.abs().max().item() + 1e-3
            y = tk.sparse_gemv_segments(gu, w, thr, (N,), sc.reshape(1, -1), residual=res, glu=True)
            err = (y.float() - ref).abs().max().item()
            n += 1
            if not err <= tol:
                bad += 1
                log(f"  MISMATCH glu+residual K={K} N={N} {dt}: err {err:.3g} tol {tol:.3g}")
            # the dense decode step's o / down: the same kernel over every row
            ref = h.float() @ w.float() + res.float()
            tol_d = 2 * ((h @ w + res).float() - ref).abs().max().item() + 1e-3 * ref.abs().max().item() + 1e-3
            err = (tk.sparse_gemv_segments(gu, w, thr, (N,), residual=res, glu=True, all_rows=True).float()
                   - ref).abs().max().item()
            n += 1
            if not err <= tol_d:
                bad += 1
                log(f"  MISMATCH all_rows glu+residual K={K} N={N} {dt}: err {err:.3g} tol {tol_d:.3g}")
    # q/k/v and gate/up with their RMSNorm computed in the kernel (`norm=`: each split-K program, or the stream
    # kernel's compaction launch)
    for K, N, seg in ((4096, 6144, (4096, 1024, 1024)), (4096, 28672, (14336, 14336))):
        x = torch.randn(1, K, device=DEV, dtype=torch.bfloat16) * 3
        gain = (torch.rand(K, device=DEV) + 0.5).to(torch.bfloat16)
        w = torch.randn(K, N, device=DEV, dtype=torch.bfloat16) * 0.05
        sc = torch.rand(len(seg), K, device=DEV) + 0.5
        h = tk.rms_norm(x, gain, NORM_EPS)
        thr = torch.stack([torch.quantile((h.float().abs() * sc[j]).flatten(), 0.5) for j in range(len(seg))])
        ref = tk.reference_sparse_gemv_segments(h.float(), w.float(), thr, seg, sc)
        ref_lp = tk.reference_sparse_gemv_segments(h, w, thr, seg, sc)
        tol = 2 * (ref_lp.float() - ref).abs().max().item() + 1e-3 * ref.abs().max().item() + 1e-4
        for cfg in (None, dict(algo="stream", block_n=256, rows=8, split=32), dict(block_n=64, block_k=32,
                                                                                  k_per_split=128, num_warps=1)):
            y = tk.sparse_gemv_segments(x, w, thr, seg, sc, norm=(gain, NORM_EPS), config=cfg)
            err = (y.float() - ref).abs().max().item()
            n += 1
            if not err <= tol:
                bad += 1
                log(f"  MISMATCH norm K={K} N={N} cfg={cfg}: err {err:.3g} tol {tol:.3g}")
    # the sparse decode step's MLP (`sparse_mlp`): gate/up's last programs list down's active channels, down
    # streams them; twice (self-resetting pair counters)
    K, H = 4096, 14336
    for teal in (False, True):
        x = torch.randn(1, K, device=DEV, dtype=torch.bfloat16) * 3
        gain = (torch.rand(K, device=DEV) + 0.5).to(torch.bfloat16)
        w_gu = torch.randn(K, 2 * H, device=DEV, dtype=torch.bfloat16) * 0.02
        w_d = torch.randn(H, K, device=DEV, dtype=torch.bfloat16) * 0.02
        s_gu = None if teal else torch.rand(2, K, device=DEV) + 0.5
        s_d = None if teal else torch.rand(H, device=DEV) + 0.5
        res = torch.randn(1, K, device=DEV, dtype=torch.bfloat16)
        h = tk.rms_norm(x, gain, NORM_EPS)
        t_gu = torch.stack([torch.quantile((h.float().abs() * (1 if teal else s_gu[j])).flatten(), 0.5)
                            for j in range(2)])
        act, t_d = mlp_act(h, w_gu, t_gu, s_gu, s_d)
        ref = res.float() + tk.reference_sparse_gemv(act.float(), w_d.float(), t_d, s_d)
        ref_lp = res + tk.reference_sparse_gemv(act, w_d, t_d, s_d)
        tol = 2 * (ref_lp.float() - ref).abs().max().item() + 1e-3 * ref.abs().max().item() + 1e-3
        # the default (`MLP_FUSED`: compaction + one launch), three launches, and a fused config of other shape
        for cfg in (None, tk.pick_config(1, K, 2 * H, (H, H)),
                    dict(algo="fused", block_f=32, rows=128, rows_d=2, num_warps=8)):
            for _ in range(2):
                y = tk.sparse_mlp(x, w_gu, t_gu, (H, H), s_gu, None, (gain, NORM_EPS), w_d, t_d, s_d, res, config=cfg)
                err = float("inf") if y is None else (y.float() - ref).abs().max().item()
                n += 1
                if not err <= tol:
                    bad += 1
                    log(f"  MISMATCH sparse_mlp teal={teal} cfg={cfg}: err {err:.3g} tol {tol:.3g}")
        # o's partial sums handed to the MLP (`pending`): the MLP of x + those sums, which it leaves zeroed
        p = torch.randn(1, K, device=DEV) * 0.5
        x0 = (x.float() - p.to(torch.bfloat16).float()).to(torch.bfloat16)
        x1 = (p.to(torch.bfloat16).float() + x0.float()).to(torch.bfloat16)
        ref_p = tk.sparse_mlp(x1, w_gu, t_gu, (H, H), s_gu, None, (gain, NORM_EPS), w_d, t_d, s_d, x1).float()
        for _ in range(2):
            pend = p.clone()
            y = tk.sparse_mlp(x0, w_gu, t_gu, (H, H), s_gu, None, (gain, NORM_EPS), w_d, t_d, s_d, None,
                              pending=(pend, None))
            err = (y.float() - ref_p).abs().max().item()
            n += 1
            if not (err <= tol and not pend.any()):
                bad += 1
                log(f"  MISMATCH sparse_mlp pending teal={teal}: err {err:.3g} tol {tol:.3g}, sums left {pend.any()}")
    # the decode loop's greedy token (two-stage argmax over a Llama-3 vocabulary)
    from wina.runtime.decode import greedy_token

    for trial in range(3):
        lg = torch.randn(1, 128256, device=DEV, dtype=torch.bfloat16)
        if trial:
            lg[0, 1000 * trial] = lg[0, 127000] = 50.0  # a tie across slices: the first index wins
        n += 1
        if not torch.equal(greedy_token(lg), lg.argmax(-1, keepdim=True)):
            bad += 1
            log(f"  MISMATCH greedy_token trial {trial}")
    log(f"kernel checks: {n - bad}/{n} ok")
    return bad


def mlp_act(h: torch.Tensor, w_gu: torch.Tensor, t_gu: torch.Tensor, s_gu, s_d) -> tuple:
    """silu(gate) * up of the reference sparse gate/up on the normed row h, and down's threshold at s = 0.5 (the
    median of its scores; s_d: WINA column norms or None)."""
    H = w_gu.shape[1] // 2
    gu = tk.reference_sparse_gemv_segments(h, w_gu, t_gu, (H, H), s_gu)
    act = torch.nn.functional.silu(gu[:, :H]) * gu[:, H:]
    return act, torch.quantile((act.float().abs() * (1 if s_d is None else s_d)).flatten(), 0.5).reshape(1)


def check_model() -> int:
    from wina.runtime.decode import teacher_forced_logits

    bad = 0
    small = dict(wb.LLAMA3_8B, hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=2,
                 vocab_size=4096)
    hf = wb.synthetic_hf(small, DEV, torch.bfloat16, layers=2)
    dec = wb.decoder_from_hf(hf)
    ids = torch.randint(0, 4096, (1, 48), device=DEV)
    tables = wb.calibrate(dec, ids)
    wb.set_sparsity(dec, tables, 0.5)
    with torch.no_grad():
        ref_dense = hf(ids).logits.float()
        own_dense = dec(ids).float()
        e = (ref_dense - own_dense).abs().max().item()
        log(f"dense logits own vs transformers (bf16): max err {e:.3g} (scale {ref_dense.abs().max().item():.3g})")

    # decode steps, fast path (fused decode blocks, CUDA graph) vs the reference path, in fp32: in bf16 a channel
    # whose score sits at its threshold flips on last-bit differences of attention and the paths drift apart
    hf32 = wb.synthetic_hf(small, DEV, torch.float32, layers=2)
    dec = wb.decoder_from_hf(hf32)
    wb.set_sparsity(dec, wb.calibrate(dec, ids), 0.5)
    with torch.no_grad():
        for sparse in (True, None):
            outs = {}
            for fast in (False, True):
                summary = enable_fast_path(dec) if fast else disable_fast_path(dec)
                outs[fast] = teacher_forced_logits(dec, ids[:, :22], 16, sparse).float()
            err = (outs[True] - outs[False]).abs().max().item()
            scale = outs[False].abs().max().item()
            ok = err <= 1e-3 * scale
            kind = "sparse" if sparse else "dense"
            log(f"{kind} fp32 decode logits fast (graph; {summary['decode_steps']} fused decode blocks) vs reference "
                f"(graph): max err {err:.3g} (scale {scale:.3g}) {'ok' if ok else 'MISMATCH'}")
            bad += not ok
        disable_fast_path(dec)
    del hf, hf32, dec
    bad += check_generate()
    torch.cuda.empty_cache()
    return bad


class _Model:
    """What `runtime.generate.generate` reads of a WinaModel: the decoder, its device, no EOS, dense prefill."""

    def __init__(self, dec):
        self.decoder, self.device, self.generation_config = dec, dec.embed.weight.device, None

    def prefill_spec(self, ids):
        return None


def check_generate() -> int:
    """generate() greedy (the CUDA-graph DecodeRunner, fast path on, thresholds 0) == transformers' greedy, fp32."""
    from wina.runtime.generate import generate

    small = dict(wb.LLAMA3_8B, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=4096)
    hf = wb.synthetic_hf(small, DEV, torch.float32, layers=2)
    dec = wb.decoder_from_hf(hf)
    enable_fast_path(dec)
    prompt = torch.randint(0, 4096, (1, 12), device=DEV, generator=torch.Generator(DEV).manual_seed(3))
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate(_Model(dec), prompt, max_new_tokens=24, eos_token_id=None)
    ok = torch.equal(got, want)
    log(f"generate() greedy on CUDA (graph runner) vs transformers: {'ok' if ok else 'MISMATCH'}")
    disable_fast_path(dec)
    del hf, dec
    torch.cuda.empty_cache()
    return int(not ok)


# ----------------------------------------------------------------------------- 2. tuning
FUSED = {"qkv": (4096, 6144, (4096, 1024, 1024)), "o": (4096, 4096, (4096,)),
         "gate_up": (4096, 28672, (14336, 14336)), "down": (14336, 4096, (4096,))}


def tune_grid(K, N, seed: int = 0):
    """Candidate configs in random order: the one-launch split-K kernel (tile, split, warps, hand prefetch) and the
    two-phase stream kernel (wide column blocks, few rows: the region benchmarks/gpu_explore.py found best)."""
    import random

    out = latency_grid(seed)
    for bn in (64, 128):
        for bk in (16, 32, 64):
            for kps in (128, 256, 512, 1024):
                for nw in (1, 2, 4):
                    for pf in (False, True):
                        if kps >= bk:
                            out.append(dict(block_n=bn, block_k=bk, k_per_split=kps, num_warps=nw, num_stages=1,
                                            prefetch=pf))
    for bn in (512, 1024, 2048):  # wide column blocks, few rows per step: the stream kernel's shape, masked
        for bk in (2, 4, 8, 16):
            for kps in (64, 128, 256):
                for nw in (4, 8):
                    out.append(dict(block_n=bn, block_k=bk, k_per_split=kps, num_warps=nw, num_stages=1,
                                    prefetch=True))
    for bn in (512, 1024, 2048):
        for rows in (2, 4, 8, 16):
            nblk = -(-N // bn)
            for target in (264, 528, 1056):
                for nw in (4, 8):
                    out.append(dict(algo="stream", block_n=bn, rows=rows, split=max(1, target // nblk), num_warps=nw,
                                    num_stages=2, prefetch=True))
    random.Random(seed).shuffle(out)
    return out


def latency_grid(seed: int = 0) -> list[dict]:
    """Split-K configs aimed at the kernels' fixed cost (the x -> mask -> row-load chain): short K slices (down
    to one step per program), narrow tiles, and Triton's own software pipelining (num_stages > 1) with and without
    the hand prefetch; in random order, tried first."""
    import random

    out = [dict(block_n=bn, block_k=bk, k_per_split=kps, num_warps=1, num_stages=st, prefetch=pf)
           for bn in (32, 64) for bk in (16, 32) for kps in (32, 64, 128, 256) for st in (1, 3)
           for pf in (False, True) if kps >= bk]
    random.Random(seed).shuffle(out)
    return out


def with_evict(cfg: dict) -> list[dict]:
    """The split-K config with its weight loads marked evict-first (meant to keep activations, partial sums and
    counters in L2 while 14 GB of weights stream through it; session 5 measured no gain), as a candidate; [] for the
    stream kernel."""
    return [] if cfg.get("algo") == "stream" else [dict(cfg, evict=True)]


NORM_EPS = 1e-5


def problem(K: int, N: int, seg: tuple, norm: torch.Tensor | None = None):
    """A bf16 batch-1 problem at s = 0.5: input-major weight copies rotating over >= 400 MB (every call reads HBM),
    their WINA scales per segment, x, the per-segment median-score thresholds and an output buffer. With `norm` (an
    RMSNorm gain) the thresholds are those of rms_norm(x) (the input of a `norm=` call)."""
    ncopy = max(2, math.ceil(400e6 / (K * N * 2)))
    ws = [torch.randn(K, N, device=DEV, dtype=torch.bfloat16) * 0.02 for _ in range(ncopy)]
    sc = torch.stack([c.float().norm(dim=1) for c in ws[0].split(list(seg), 1)]).contiguous()
    x = torch.randn(1, K, device=DEV, dtype=torch.bfloat16)
    h = x if norm is None else tk.rms_norm(x, norm, NORM_EPS)
    thr = torch.stack([torch.quantile((h.float().abs() * sc[j]).flatten(), 0.5) for j in range(len(seg))]).float()
    return ws, sc, x, thr, torch.empty(1, N, device=DEV, dtype=torch.bfloat16)


def timed_sweep(cands: list[dict], timer, budget_s: float, label: str) -> list[tuple[float, dict]]:
    """(timer(cfg), cfg) for the candidates in order until `budget_s` is spent (at least one); a config whose timer
    raises (does not compile, or a wrong result) is logged and skipped."""
    t_end = time.time() + budget_s
    timings = []
    for cfg in cands:
        if timings and time.time() > t_end:
            break
        try:
            timings.append((timer(cfg), cfg))
        except Exception as e:  # noqa: BLE001
            log(f"  {label} {cfg} skipped: {type(e).__name__}: {str(e)[:100]}")
    return timings


def graph_timer(ws: list, call):
    """A `timed_sweep` timer: CUDA-graph us of call(w, cfg) cycling over the rotating weight copies."""
    return lambda cfg: wb._graph_time_us([lambda w=w: call(w, cfg) for w in ws], min_calls=128)


def cublas_us(ws: list, x: torch.Tensor, out: torch.Tensor, prep=None) -> float:
    """Dense cuBLAS GEMV (HF-layout copies of the rotating weights); `prep(x)` (e.g. a norm) runs inside each call."""
    wd = [w.t().contiguous() for w in ws]
    t = wb._graph_time_us([lambda w=w: torch.nn.functional.linear(x if prep is None else prep(x), w, out=out)
                           for w in wd], min_calls=128)
    del wd
    return t


def time_of(timings: list, cfg: dict) -> float:
    return next((t for t, c in timings if c is cfg), float("nan"))


def tune(budget_s: float) -> dict:
    results = {}
    for name, (K, N, seg) in FUSED.items():
        ws, sc, x, thr, out = problem(K, N, seg)
        dense = cublas_us(ws, x, out)
        default = dict(tk.pick_config(1, K, N, seg))
        cands = [default] + with_evict(default) + tune_grid(K, N)
        timings = timed_sweep(cands, graph_timer(ws, lambda w, c: tk.sparse_gemv_segments(
            x, w, thr, seg, sc, None, out=out, config=c)), budget_s / len(FUSED), name)
        base_t = time_of(timings, cands[0])
        timings.sort(key=lambda z: z[0])
        best_t, best = timings[0]
        tk.set_tuned(1, K, N, seg, best)
        results[name] = {"dense_us": dense, "ideal_us": 0.5 * dense, "orig_kernel_us": base_t, "best_us": best_t,
                         "best_cfg": best, "tried": len(timings),
                         "top3": [(round(t, 2), c) for t, c in timings[:3]]}
        fam = {}
        for t, c in timings:
            f = "stream" if c.get("algo") == "stream" else ("split-K wide" if c["block_n"] >= 512 else "split-K")
            fam.setdefault(f, (round(t, 2), c))
        results[name]["best_by_family"] = fam
        log(f"tune {name}: dense {dense:.1f} us, ideal {0.5 * dense:.1f}, original kernel {base_t:.1f}, "
            f"best {best_t:.1f} ({len(timings)} tried) {best}; by family {fam}")
        del ws
        torch.cuda.empty_cache()
    tot = {k: sum(r[k] for r in results.values()) for k in ("dense_us", "ideal_us", "orig_kernel_us", "best_us")}
    for name in ("qkv", "gate_up"):
        results[name + "+norm"] = tune_norm(name, budget_s / len(FUSED))
    for name in ("o", "down"):
        results[name + " dense"] = tune_dense(name, budget_s / len(FUSED) / 2)
    log(f"tune per-layer (isolated matrices): dense {tot['dense_us']:.1f} ideal {tot['ideal_us']:.1f} "
        f"original {tot['orig_kernel_us']:.1f} best {tot['best_us']:.1f} us")
    results["layer"] = tot
    return results


# `_mlp_kernel` configs timed by --tune-mlp: (channels per program, warps, list rows per gate/up step, down rows per
# step, stages of Triton's pipeliner for the gate/up and the down loop; 1 = not pipelined); registers per program
# under triton 3.6.0 (kernel_compile.py, WINA) and programs per SM in the comments. Session 7 swept channels / rows /
# down rows / warps with both loops pipelined by hand (docs/BENCHMARKS.md). Session 8 timed the first, third and
# fourth alone (run AN) and the second end to end only (run AP); session 9 timed all (run AQ: 55.5, 66.4, 54.8,
# 55.2, 59.2, 82.7, 55.4 us; the one-program-per-SM shapes also lost end to end).
MLP_FUSED_GRID = [(64, 8, 64, 4, 3, 3),  # 116 regs, 2/SM, the default until session 11
                  (64, 8, 64, 4, 1, 1),  # 102, 2/SM
                  (64, 8, 64, 4, 3, 2),  # 116, 2/SM
                  (64, 8, 64, 2, 3, 4),  # 112, 2/SM
                  (128, 16, 64, 4, 3, 3),  # 112, 1/SM (112 programs)
                  (128, 8, 32, 4, 3, 3),  # 116, 2/SM (112 programs)
                  (64, 4, 64, 4, 3, 3),  # 204, 2/SM, the default in session 11 (run BS)
                  (64, 4, 64, 2, 3, 4)]  # 204, 2/SM, the default (`MLP_FUSED`) since session 12 (runs CC, CD)


# The decode step's MLP at the Llama-3-8B shape: hidden size, intermediate size.
MLP_SHAPE = (4096, 14336)


def mlp_problem():
    """The sparse MLP (`sparse_mlp`) at `MLP_SHAPE`, s = 0.5, for timing: gate/up and down weight copies rotating over
    > 400 MB (every call reads HBM), WINA scales, x with its RMSNorm gain, thresholds at the median score (gate/up: of
    the normed x; down: of the reference activation) and a residual row. Returns (run(copy, config), copies)."""
    K, H = MLP_SHAPE
    gain = (torch.rand(K, device=DEV) + 0.5).to(torch.bfloat16)
    ws, sc, x, thr, _ = problem(K, 2 * H, (H, H), norm=gain)
    wd = [torch.randn(H, K, device=DEV, dtype=torch.bfloat16) * 0.02 for _ in ws]
    s_d = wd[0].float().norm(dim=1)
    _, t_d = mlp_act(tk.rms_norm(x, gain, NORM_EPS), ws[0], thr, sc, s_d)
    res = torch.randn(1, K, device=DEV, dtype=torch.bfloat16)

    def run(i: int, config: dict):
        return tk.sparse_mlp(x, ws[i], thr, (H, H), sc, None, (gain, NORM_EPS), wd[i], t_d, s_d, res, config=config)

    return run, len(ws)


def tune_mlp() -> dict:
    """The sparse decode step's MLP (`sparse_mlp`, 8B shapes, s = 0.5, CUDA graph over rotating weights): three
    launches (compaction, gate/up stream with down's list epilogue, down stream) against two (compaction, then
    `_mlp_kernel`) over `MLP_FUSED_GRID`. Reports only: isolated, the two paths tie within noise (runs X-AD,
    docs/BENCHMARKS.md), while decode measures the difference (`--mlp-ab`)."""
    K, H = MLP_SHAPE
    run, copies = mlp_problem()
    cands = [("three launches", tk.pick_config(1, K, 2 * H, (H, H)))] + [
        (f"two: {f} channels, {w} warps, rows {r}, down rows {rd}, gate/up loop in {st} stages, down loop in {ds}",
         dict(tk.MLP_FUSED or {}, algo="fused", block_f=f, num_warps=w, rows=r, rows_d=rd, gu_stages=st,
              d_stages=ds))
        for f, w, r, rd, st, ds in MLP_FUSED_GRID] + [
        ("two: the default with one compaction program per segment (4096 channels each)",
         dict(tk.MLP_FUSED or {}, algo="fused", compact_ch=4096))]
    rows = []
    for name, cfg in cands:
        calls = [lambda i=i, c=cfg: run(i, c) for i in range(copies)]
        try:
            rows.append((wb._graph_time_us(calls, min_calls=64), name))
        except Exception as e:  # noqa: BLE001
            log(f"  mlp {name} skipped: {type(e).__name__}: {str(e)[:100]}")
    for t, name in rows:
        log(f"  mlp {t:.1f} us: {name}")
    del run, calls
    torch.cuda.empty_cache()
    return {"us": [(round(t, 2), name) for t, name in rows]}


def tune_norm(name: str, budget_s: float) -> dict:
    """The decode step's q/k/v and gate/up take their block's RMSNorm with them (`norm=`): each split-K program, or
    the stream kernel's compaction launch, computes it. Times a norm launch + the tuned GEMV against the same config
    and the stream configs with the norm fused (CUDA graph), registers the fastest for `norm=` calls, and times the
    dense side both ways (norm + cuBLAS; the split-K kernel over every row with the norm inside)."""
    K, N, seg = FUSED[name]
    gain = (torch.rand(K, device=DEV) + 0.5).to(torch.bfloat16)
    ws, sc, x, thr, out = problem(K, N, seg, norm=gain)
    dense = cublas_us(ws, x, out, prep=lambda v: tk.rms_norm(v, gain, NORM_EPS))
    unfused_cfg = tk.TUNED.get((1, K, N, seg, "sparse")) or tk.pick_config(1, K, N, seg, x.device)
    unfused = graph_timer(ws, lambda w, c: tk.sparse_gemv_segments(tk.rms_norm(x, gain, NORM_EPS), w, thr, seg, sc,
                                                                   None, out=out, config=c))(unfused_cfg)
    # the unfused winner with the norm fused in (split-K: each program computes 1/rms; stream: the compaction
    # launch), then the stream configs
    cands = [dict(unfused_cfg)] + with_evict(unfused_cfg) + latency_grid(seed=1) + [
        c for c in tune_grid(K, N, seed=1) if c.get("algo") == "stream"]
    timings = timed_sweep(cands, graph_timer(ws, lambda w, c: tk.sparse_gemv_segments(
        x, w, thr, seg, sc, None, out=out, config=c, norm=(gain, NORM_EPS))), budget_s, name + "+norm")
    default_t = time_of(timings, cands[0])
    timings.sort(key=lambda z: z[0])
    best_t, best = timings[0]
    tk.set_tuned(1, K, N, seg, best, variant="norm")
    # a dense alternative: the split-K kernel over every row with the norm in it (the decode step's dense side
    # runs norm + cuBLAS)
    dense_kernel = graph_timer(ws, lambda w, c: tk.sparse_gemv_segments(x, w, thr, seg, out=out, all_rows=True,
                                                                        norm=(gain, NORM_EPS)))(None)
    log(f"tune {name}+norm: dense (norm + cuBLAS) {dense:.1f} us (split-K kernel, every row, norm fused "
        f"{dense_kernel:.1f}), sparse: norm launch + GEMV {unfused:.1f}, same config norm fused {default_t:.1f}, "
        f"best {best_t:.1f} ({len(timings)} tried) {best}")
    del ws
    torch.cuda.empty_cache()
    return {"dense_us": dense, "dense_kernel_us": dense_kernel, "unfused_us": unfused,
            "fused_same_cfg_us": default_t, "best_us": best_t,
            "best_cfg": best, "tried": len(timings), "top3": [(round(t, 2), c) for t, c in timings[:3]]}


def tune_dense(name: str, budget_s: float) -> dict:
    """The dense decode step runs o and down through the split-K kernel over every row (residual and, for down,
    silu·mul fused): time split-K configs for that against cuBLAS and register the fastest ("all_rows")."""
    K, N, seg = FUSED[name]
    ws, sc, x, thr, out = problem(K, N, seg)
    glu = name == "down"
    xin = torch.randn(1, 2 * K, device=DEV, dtype=torch.bfloat16) if glu else x
    res = torch.randn(1, N, device=DEV, dtype=torch.bfloat16)
    cublas = cublas_us(ws, x, out)
    cands = [tk.dense_config(1, K, N)] + with_evict(tk.dense_config(1, K, N)) + [c for c in tune_grid(K, N, seed=2)
                                            if c.get("algo") != "stream" and c["block_n"] < 512]
    timings = timed_sweep(cands, graph_timer(ws, lambda w, c: tk.sparse_gemv_segments(
        xin, w, thr, seg, out=out, config=c, residual=res, glu=glu, all_rows=True)), budget_s, name + " dense")
    default_t = time_of(timings, cands[0])
    timings.sort(key=lambda z: z[0])
    best_t, best = timings[0]
    tk.set_tuned(1, K, N, seg, best, variant="all_rows")
    log(f"tune {name} dense: cuBLAS {cublas:.1f} us (no residual{', no silu*mul' if glu else ''}), split-K kernel "
        f"every row + fused residual{' + silu*mul' if glu else ''}: default {default_t:.1f}, best {best_t:.1f} "
        f"({len(timings)} tried) {best}")
    del ws
    torch.cuda.empty_cache()
    return {"cublas_us": cublas, "kernel_default_us": default_t, "kernel_best_us": best_t, "best_cfg": best}


def launch_chain_us() -> dict:
    """What one dependent launch costs inside a CUDA graph: 256 back-to-back one-row RMSNorms (4096 wide), with
    programmatic dependent launch and without; and one torch add, for scale."""
    x = torch.randn(1, 4096, device=DEV, dtype=torch.bfloat16)
    g = torch.ones(4096, device=DEV, dtype=torch.bfloat16)
    res = {}
    for pdl in (True, False):
        tk.PDL = pdl
        res["rms_norm_pdl" if pdl else "rms_norm"] = wb._graph_time_us([lambda: tk.rms_norm(x, g, NORM_EPS)],
                                                                      min_calls=256)
    tk.PDL = True
    res["torch_add"] = wb._graph_time_us([lambda: x + x], min_calls=256)
    log("per launch in a graph (us): " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()))
    return res


def long_context(lengths: list[int], tokens: int) -> dict:
    """Own dense vs own sparse decode tok/s after long prompts (attention then reads the whole KV cache, split over
    the context in 128-position programs), on the same synthetic Llama-3-8B at s = 0.5; the cache stays within
    the fused decode step's limit (`FUSED_DECODE_MAX_CACHE`)."""
    from wina.runtime.kernels import FUSED_DECODE_MAX_CACHE

    hf = wb.synthetic_hf(wb.LLAMA3_8B, DEV, torch.bfloat16)
    dec = wb.decoder_from_hf(hf)
    del hf
    g = torch.Generator().manual_seed(1)
    wb.set_sparsity(dec, wb.calibrate(dec, torch.randint(0, 128256, (1, 64), generator=g).to(DEV)), 0.5)
    enable_fast_path(dec)
    out = {}
    for n in lengths:
        n = min(n, FUSED_DECODE_MAX_CACHE - tokens - 8)
        prompt = torch.randint(0, 128256, (1, n), generator=g).to(DEV)
        r = wb.e2e(dec, prompt, tokens, rounds=2)
        out[str(n)] = {k: r[k] for k in ("dense_tok_s", "sparse_tok_s", "sparse_over_dense")}
        log(f"context {n} + {tokens}: own dense {r['dense_tok_s']:.1f} tok/s, own sparse {r['sparse_tok_s']:.1f} "
            f"({r['sparse_over_dense']:.2f}x)")
    disable_fast_path(dec)
    del dec
    torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune-budget", type=float, default=150.0, help="seconds for the config sweep")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--hf-eager", action="store_true", help="transformers baseline without its torch.compile")
    ap.add_argument("--no-hf", action="store_true", help="no transformers baseline (saves its ~40 s compile)")
    ap.add_argument("--profile", action="store_true", help="then per-kernel profile of decode (gpu_profile.py)")
    ap.add_argument("--no-tune", action="store_true", help="skip the sweep: default configs, as `wina bench` runs")
    ap.add_argument("--tune-mlp", action="store_true", help="time the sparse MLP's variants (report only)")
    ap.add_argument("--mlp-ab", action="store_true",
                    help="then decode with the MLP in three launches and with other compaction chunks too")
    ap.add_argument("--long-context", default="", help="comma-separated prompt lengths: decode after long prompts")
    ap.add_argument("--ablate", action="append", default=[], metavar="SETTING=VALUE",
                    help="then decode with this runtime setting changed (same process; e.g. MLP_FUSED=None, "
                         "MLP_FUSED={...} (a Python literal) or triton_decode.ATTN_SPLIT=64; several joined by ';'); "
                         "repeatable")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
        f"{__import__('triton').__version__}")
    res = {}
    if not args.skip_checks:
        res["kernel_mismatches"] = check_kernels()
        res["model_mismatches"] = check_model()
    res["launch_us"] = launch_chain_us()
    if not args.no_tune:
        res["tune"] = tune(args.tune_budget)
    if args.tune_mlp:
        res["tune_mlp"] = tune_mlp()
    ablate = {"mlp in three launches": {"MLP_FUSED": None},
              "mlp in two, compaction chunks of 4096": {"MLP_FUSED": dict(tk.MLP_FUSED or {}, compact_ch=4096)},
              "mlp in two, compaction chunks of 1024": {"MLP_FUSED": dict(tk.MLP_FUSED or {}, compact_ch=1024)},
              } if args.mlp_ab else {}
    for a in args.ablate:
        ablate[a] = {key: ast.literal_eval(value) for key, _, value in (kv.partition("=") for kv in a.split(";"))}
    bench = wb.run_bench(synthetic="llama3-8b", device=DEV, dtype="bfloat16", sparsity=0.5, tokens=args.tokens,
                         hf_compile=not args.hf_eager, skip_hf=args.no_hf, log=log, ablate=ablate)
    res["bench"] = bench  # bench["no_pdl"]: decode and layer chain without programmatic dependent launch
    lay = bench["layer"]["0.5"]
    chain = bench.get("layer_chain") or {"sparse_over_ideal": float("nan")}
    acc = {
        "layer_sparse_le_1.15_ideal": lay["sparse_over_ideal"] <= 1.15,
        "layer_chain_sparse_le_1.15_ideal": chain["sparse_over_ideal"] <= 1.15,
        "e2e_sparse_ge_1.6_own_dense": bench["sparse_over_dense"] >= 1.6,
        "e2e_sparse_ge_2.5_hf_static": bench.get("sparse_over_hf", 0) >= 2.5,
        "correct": res.get("kernel_mismatches", 0) == 0 and res.get("model_mismatches", 0) == 0,
    }
    res["acceptance"] = acc
    log(f"ACCEPTANCE per-layer s=0.5: sparse {lay['sparse_us']:.1f} us vs ideal {lay['ideal_us']:.1f} "
        f"(x{lay['sparse_over_ideal']:.3f}, need <= 1.15): {acc['layer_sparse_le_1.15_ideal']} (matrices isolated); "
        f"x{chain['sparse_over_ideal']:.3f}: {acc['layer_chain_sparse_le_1.15_ideal']} (the decode step's layer)")
    log(f"ACCEPTANCE e2e: own sparse {bench['sparse_tok_s']:.1f} tok/s, own dense {bench['dense_tok_s']:.1f} "
        f"({bench['sparse_over_dense']:.2f}x, need 1.6), HF static {bench.get('hf_static_tok_s', float('nan')):.1f} "
        f"({bench.get('sparse_over_hf', float('nan')):.2f}x, need 2.5)")
    if args.long_context:
        res["long_context"] = long_context([int(n) for n in args.long_context.split(",")], args.tokens)
    if args.profile:
        import gpu_profile

        res["profile"] = gpu_profile.run(layers=32, steps=4)  # prints the in-context per-layer reading too
    res["elapsed_s"] = time.time() - T0
    emit(res, "gpu_suite.json")


def emit(res: dict, filename: str) -> None:
    """Print the results as one JSON line; also write them to $OUT/filename when OUT is set (the device machine)."""
    line = json.dumps(res, default=str)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], filename), "w") as f:
            f.write(line)
    print(line)


if __name__ == "__main__":
    main()
