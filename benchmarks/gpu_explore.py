"""Exploration sweep for the batch-1 sparse GEMV (one device call): where does the time of each fused matrix go?

    . benchmarks/device_env.sh; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_explore.py --budget 240

Prints, per fused Llama-3-8B matrix at s = 0.5 (bf16, weights rotated over >= 400 MB so every call reads HBM):
dense (cuBLAS, HF layout; for qkv/gate_up also one fused cuBLAS GEMV), the original kernel, and a random sample of
two-phase "stream" configs (wide column blocks and few rows included, hand prefetch on/off), each also timed
without its compaction launch (phase 2 alone). Also the device-to-device copy bandwidth, and, with --hf, the
decode tok/s of transformers' static cache *with* its torch.compile (and how long compiling took).
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from gpu_suite import DEV, FUSED, cublas_us, emit, graph_timer, log, problem, timed_sweep

from wina.runtime import bench as wb
from wina.runtime import triton_kernels as tk


def old_stream_config(K: int, N: int) -> dict:
    """The stream kernel's first default config (before this sweep), for the "old stream default" column."""
    block_n = 256 if N >= 8192 else 128
    nblk = -(-N // block_n)
    split = max(1, min(max(1, K // 64), 1024 // nblk))
    return dict(algo="stream", block_n=block_n, rows=32, split=split, num_warps=4, num_stages=2)


def copy_bw() -> float:
    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    t = wb._graph_time_us([lambda: b.copy_(a)], min_calls=8)
    return 2 * a.numel() / (t * 1e-6) / 1e12


def candidates(K: int, N: int, rng: random.Random) -> list[dict]:
    out = []
    for bn in (128, 256, 512, 1024, 2048):
        for rows in (2, 4, 8, 16, 32, 64):
            el = bn * rows
            if not 2048 <= el <= 32768:
                continue
            for nw in (4, 8):
                if el // (32 * nw) < 8:
                    continue
                nblk = -(-N // bn)
                for target in (132, 264, 528, 1056, 2112):
                    split = max(1, min(K // (2 * rows), max(1, target // nblk)))
                    for st in (1, 2, 3):
                        for pf in (False, True):
                            out.append(dict(algo="stream", block_n=bn, rows=rows, split=split, num_warps=nw,
                                            num_stages=st, prefetch=pf))
    seen, uniq = set(), []
    for c in out:
        k = tuple(sorted(c.items()))
        if k not in seen:
            seen.add(k)
            uniq.append(c)
    rng.shuffle(uniq)
    return uniq


def sweep(name: str, K: int, N: int, seg: tuple, budget: float, rng: random.Random) -> dict:
    ws, sc, x, thr, out = problem(K, N, seg)
    res = {"dense_us": cublas_us(ws, x, out)}
    if len(seg) > 1:  # the same GEMV as separate cuBLAS calls (what the own dense decode runs)
        parts = [[p.contiguous() for p in w.t().split(list(seg), 0)] for w in ws]
        res["dense_separate_us"] = wb._graph_time_us(
            [lambda ps=ps: [torch.nn.functional.linear(x, p) for p in ps] for ps in parts], min_calls=128)
        del parts
    ref = tk.reference_sparse_gemv_segments(x.float(), ws[0].float(), thr, seg, sc)
    timed = graph_timer(ws, lambda w, c: tk.sparse_gemv_segments(x, w, thr, seg, sc, None, out=out, config=c))

    def t_cfg(cfg):
        y = tk.sparse_gemv_segments(x, ws[0], thr, seg, sc, None, config=cfg)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            raise ValueError(f"WRONG rel err {err:.3g}")
        return timed(cfg)

    res["orig_us"] = t_cfg(tk.split_k_config(1, K, N))
    res["old_stream_us"] = t_cfg(old_stream_config(K, N))
    tuned = timed_sweep(candidates(K, N, rng), t_cfg, budget, name)
    tuned.sort(key=lambda z: z[0])
    for t, cfg in tuned[:5]:
        tk.sparse_gemv_segments(x, ws[0], thr, seg, sc, None, config=cfg)  # lists for phase 2
        t2 = timed(dict(cfg, skip_compact=True))
        log(f"  {name} {t:.2f} us (phase 2 alone {t2:.2f}) {cfg}")
    res["tried"] = len(tuned)
    res["top"] = [(round(t, 2), c) for t, c in tuned[:10]]
    res["best_us"] = tuned[0][0] if tuned else float("nan")
    mb = (K * N * 2) * 0.5 / 1e6
    log(f"{name}: dense {res['dense_us']:.1f} (separate {res.get('dense_separate_us', float('nan')):.1f}) "
        f"ideal {res['dense_us'] / 2:.1f} orig {res['orig_us']:.1f} old stream {res['old_stream_us']:.1f} "
        f"best {res['best_us']:.1f} us = {mb / res['best_us']:.2f} TB/s on the active rows; {len(tuned)} tried")
    del ws
    torch.cuda.empty_cache()
    return res


def hf_compiled(tokens: int) -> dict:
    hf = wb.synthetic_hf(wb.LLAMA3_8B, DEV, torch.bfloat16)
    prompt = torch.randint(0, 128256, (1, 32), device=DEV)
    t0 = time.time()
    tok_s = wb.hf_static_tok_s(hf, prompt, tokens, compile=True, log=log)
    log(f"transformers static cache compiled: {tok_s:.1f} tok/s decode ({tokens} tokens)")
    return {"tok_s": tok_s, "total_s": time.time() - t0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=240.0, help="seconds of config sweep, split over the matrices")
    ap.add_argument("--hf", action="store_true")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    rng = random.Random(0)
    res = {"copy_tb_s": copy_bw()}
    log(f"device {torch.cuda.get_device_name()}; copy bandwidth (read + write) {res['copy_tb_s']:.2f} TB/s")
    names = [n for n in FUSED if not args.only or n in args.only.split(",")]
    weights = {"qkv": 1, "o": 1, "gate_up": 1.5, "down": 1.5}
    tot = sum(weights[n] for n in names)
    for n in names:
        res[n] = sweep(n, *FUSED[n], args.budget * weights[n] / tot, rng)
    if args.hf:
        try:
            res["hf_compiled"] = hf_compiled(64)
        except Exception as e:  # noqa: BLE001
            log(f"transformers compiled failed: {type(e).__name__}: {str(e)[:300]}")
    emit(res, "gpu_explore.json")


if __name__ == "__main__":
    main()
