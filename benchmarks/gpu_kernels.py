"""GPU check + benchmark of the threshold-sparse GEMV kernels (runtime/triton_kernels.py).

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_kernels.py            # check + full table
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_kernels.py --tune     # block-size sweep
    ... --quick  (fewer sparsities / batches)

Timing method: CUDA-graph replay. One graph holds many back-to-back calls that cycle
through enough copies of the weights (>= ~400 MB) that every call reads its weights from
HBM, not L2 (the H200's L2 is 50 MB). Time per call = replay time / calls (median of
several replays), so launch gaps inside a graph are included, as in graph-captured
decode. The naive gather baseline (nonzero + index_select + matmul) syncs with the host
and cannot be captured: it is timed with CUDA events around a plain loop over the copies.

Sparsity: x ~ N(0, 1) [B, K] bf16, scale = per-input-channel column norm of W (WINA), and
the threshold is the s-quantile of |x| * scale over all B*K entries, so a fraction s of
the (row, channel) pairs is skipped. For B > 1 a weight row is read when any row needs it
("union" column shows the fraction of rows read).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _load_kernels():
    path = os.path.join(ROOT, "runtime", "triton_kernels.py")
    spec = importlib.util.spec_from_file_location("wina_triton_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


tk = _load_kernels()

# name -> (K, N, seg_sizes)
SHAPES = {
    "q": (4096, 4096, None),
    "k": (4096, 1024, None),
    "v": (4096, 1024, None),
    "o": (4096, 4096, None),
    "gate": (4096, 14336, None),
    "up": (4096, 14336, None),
    "down": (14336, 4096, None),
    "qkv": (4096, 6144, (4096, 1024, 1024)),
    "gate_up": (4096, 28672, (14336, 14336)),
}
UNFUSED = ["q", "k", "v", "o", "gate", "up", "down"]
FUSED = ["qkv", "o", "gate_up", "down"]
ROTATE_BYTES = 400e6
DEV = "cuda"
TUNED = {}  # (B, K, N) -> best config found by --tune in this run (used by the table)
DT = torch.bfloat16


class Problem:
    """Weights (rotating copies) for one shape."""

    def __init__(self, K, N, seg_sizes):
        self.K, self.N, self.seg = K, N, seg_sizes or (N,)
        nbytes = K * N * 2
        self.ncopy = max(2, math.ceil(ROTATE_BYTES / nbytes))
        g = torch.Generator(device=DEV).manual_seed(K * 7 + N)
        self.w_t = [torch.randn(K, N, device=DEV, dtype=DT, generator=g) * 0.02 for _ in range(self.ncopy)]
        self.w = [torch.randn(N, K, device=DEV, dtype=DT, generator=g) * 0.02 for _ in range(self.ncopy)]
        # WINA scale: column norms of W (= row norms of w_t) per segment
        w0 = self.w_t[0].float()
        self.scales = torch.stack([c.norm(dim=1) for c in w0.split(list(self.seg), dim=1)]).contiguous()
        self.bias = torch.randn(N, device=DEV, dtype=DT) * 0.1

    def inputs(self, B, s, seed=0):
        g = torch.Generator(device=DEV).manual_seed(seed + 1000 * B)
        x = torch.randn(B, self.K, device=DEV, dtype=DT, generator=g)
        thr = []
        for j in range(len(self.seg)):
            v = (x.float().abs() * self.scales[j]).flatten()
            thr.append(torch.quantile(v, s) if s > 0 else torch.zeros((), device=DEV))
        thr = torch.stack(thr).float()
        act = x.float().abs()[None] * self.scales[:, None, :] >= thr[:, None, None]  # [nseg, B, K]
        union = act.any(dim=1).float().mean().item()
        per_row = act.float().mean().item()
        return x, thr, union, per_row


def graph_time_us(fns, min_calls=240, reps=7):
    """fns: list of zero-arg callables (one per weight copy). Returns us per call."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    nround = max(1, math.ceil(min_calls / len(fns)))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(nround):
            for f in fns:
                f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / (nround * len(fns)))
    del graph
    times.sort()
    return times[len(times) // 2]


def loop_time_us(fns, reps=3):
    for f in fns:
        f()
    torch.cuda.synchronize()
    a = torch.cuda.Event(enable_timing=True)
    b = torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        for f in fns:
            f()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / (reps * len(fns))


def sparse_fn(p, x, thr, w_t, out, cfg=None, bias=None, teal=False):
    scales = None if teal else p.scales
    return lambda: tk.sparse_gemv_segments(x, w_t, thr, p.seg, scales, bias, out=out, config=cfg)


def gather_fn(p, x, thr, w_t):
    sc = p.scales[0]

    def f():
        keep = (x.float().abs() * sc >= thr[0]).any(0)
        idx = keep.nonzero().squeeze(1)
        return x.index_select(1, idx) @ w_t.index_select(0, idx)

    return f


# ----------------------------------------------------------------------------- checks
def check_all():
    torch.manual_seed(0)
    bad = 0
    n = 0
    for B in (1, 3, 8):
        for name, (K, N, seg) in [("k", SHAPES["k"]), ("down", SHAPES["down"]), ("qkv", SHAPES["qkv"]),
                                  ("odd", (1000, 700, None)), ("odd_seg", (777, 400, (128, 208, 64)))]:
            seg = seg or (N,)
            for dt in ((torch.bfloat16, torch.float16, torch.float32) if B != 8 else (torch.bfloat16,)):
                x = torch.randn(B, K, device=DEV, dtype=dt)
                w_t = torch.randn(K, N, device=DEV, dtype=dt) * 0.05
                scales = torch.rand(len(seg), K, device=DEV) + 0.5
                bias = torch.randn(N, device=DEV, dtype=dt)
                for s in (0.0, 0.5, 0.9):
                    for teal in (False, True):
                        if dt != torch.bfloat16 and s != 0.5:
                            continue
                        sc = None if teal else scales
                        thr = torch.stack([
                            torch.quantile((x.float().abs() * (1 if teal else scales[j])).flatten(), s)
                            for j in range(len(seg))]).float()
                        for bb in ((None, bias) if dt == torch.bfloat16 else ((None,) if teal else (bias,))):
                            y = tk.sparse_gemv_segments(x, w_t, thr, seg, sc, bb)
                            ref = tk.reference_sparse_gemv_segments(x.float(), w_t.float(), thr, seg, sc,
                                                                    None if bb is None else bb.float())
                            ref_lp = tk.reference_sparse_gemv_segments(x, w_t, thr, seg, sc, bb)
                            err = (y.float() - ref).abs().max().item()
                            err_lp = (ref_lp.float() - ref).abs().max().item()
                            tol = 2 * err_lp + 1e-3 * ref.abs().max().item() + 1e-4
                            n += 1
                            if not (err <= tol) or not torch.isfinite(y).all():
                                bad += 1
                                print(f"  MISMATCH B={B} {name} {dt} s={s} teal={teal} bias={bb is not None}: "
                                      f"err={err:.3g} torch-lowp err={err_lp:.3g}")
                # single-segment API, 0-dim threshold
                if len(seg) == 1:
                    t0 = torch.quantile((x.float().abs() * scales[0]).flatten(), 0.5)
                    y = tk.sparse_gemv(x, w_t, t0, scales[0], bias)
                    ref = tk.reference_sparse_gemv(x.float(), w_t.float(), t0, scales[0], bias.float())
                    ref_lp = tk.reference_sparse_gemv(x, w_t, t0, scales[0], bias)
                    err = (y.float() - ref).abs().max().item()
                    tol = 2 * (ref_lp.float() - ref).abs().max().item() + 1e-3 * ref.abs().max().item() + 1e-4
                    n += 1
                    if not err <= tol:
                        bad += 1
                        print(f"  MISMATCH sparse_gemv B={B} {name} {dt}: err={err:.3g}")
    # repeated launches (workspace reset) + graph replay consistency
    x = torch.randn(1, 4096, device=DEV, dtype=DT)
    w_t = torch.randn(4096, 4096, device=DEV, dtype=DT) * 0.02
    t0 = torch.quantile(x.float().abs().flatten(), 0.5)
    y0 = tk.sparse_gemv(x, w_t, t0).clone()
    for _ in range(5):
        y1 = tk.sparse_gemv(x, w_t, t0)
    n += 1
    if (y1.float() - y0.float()).abs().max().item() > 1e-2:
        bad += 1
        print("  MISMATCH on repeated launch")
    print(f"correctness: {n - bad}/{n} cases OK")
    return bad == 0


# ----------------------------------------------------------------------------- tuning
def tune_configs(B):
    cfgs = []

    def add(bn, bk, kps, nw, st=1, **kw):
        cfgs.append(dict(block_n=bn, block_k=bk, k_per_split=kps, num_warps=nw, num_stages=st, **kw))

    if B == 1 and os.environ.get("TUNE_SMALL"):
        for kps in (256, 512):
            for bn, bk, nw in ((64, 32, 1), (64, 16, 1), (128, 16, 2), (64, 32, 2)):
                add(bn, bk, kps, nw, prefetch=True)
            add(64, 32, kps, 1, evict=True)
            add(64, 32, kps, 1, 3)
    elif B == 1:
        for nw in (1, 2):
            for bn in (64, 128, 256):
                for bk in (16, 32, 64):
                    if 16 <= bk * bn / (32 * nw) <= 128:
                        for kps in (64, 128, 256, 512):
                            if kps >= bk:
                                add(bn, bk, kps, nw)
        for kps in (128, 512):
            add(128, 32, kps, 2, 3)
            add(128, 32, kps, 2, evict=True)
            add(256, 16, kps, 2, evict=True)
            add(128, 32, kps, 4, prefetch=True)
    else:
        for st in (1, 3):
            add(128, 32, 256, 4, st, use_dot=True)
            add(128, 32, 512, 4, st, use_dot=True)
        for bn in (64, 128):
            for bk in (16, 32):
                for kps in (256, 512):
                    add(bn, bk, kps, 4, use_dot=False)
    return cfgs


def cfg_str(c):
    return (f"bn{c['block_n']}/bk{c['block_k']}/kps{c['k_per_split']}/w{c['num_warps']}/st{c['num_stages']}"
            + ("/pf" if c.get("prefetch") else "") + ("" if c.get("use_dot", True) else "/nodot"))


def tune(batches=(1, 2, 4), s=0.5, shapes=("k", "q", "gate", "down", "qkv", "gate_up"), top=5):
    probs = {nm: Problem(*SHAPES[nm]) for nm in shapes}
    for B in batches:
        cfgs = tune_configs(B)
        print(f"\n=== tune B={B} s={s}: {len(cfgs)} configs ===")
        results = {nm: [] for nm in shapes}
        t_start = time.time()
        for nm in shapes:
            p = probs[nm]
            x, thr, union, _ = p.inputs(B, s)
            out = torch.empty(B, p.N, device=DEV, dtype=DT)
            dense = graph_time_us([(lambda w=w: F.linear(x, w)) for w in p.w])
            ref = tk.reference_sparse_gemv_segments(x.float(), p.w_t[0].float(), thr, p.seg, p.scales)
            for c in cfgs:
                try:
                    y = tk.sparse_gemv_segments(x, p.w_t[0], thr, p.seg, p.scales, config=c)
                    err = (y.float() - ref).abs().max().item()
                    if not err <= 0.02 * ref.abs().max().item():
                        print("  WRONG", nm, cfg_str(c), err)
                    t = graph_time_us([sparse_fn(p, x, thr, w, out, c) for w in p.w_t], min_calls=120, reps=3)
                except Exception as e:  # noqa: BLE001
                    print("  fail", cfg_str(c), type(e).__name__, str(e)[:100])
                    t = float("inf")
                results[nm].append((t, c))
            results[nm].sort(key=lambda r: r[0])
            line = ", ".join(f"{cfg_str(c)}={t:.2f}" for t, c in results[nm][:top])
            print(f"{nm:8s} K={p.K:5d} N={p.N:5d} dense={dense:6.2f}us target={1.15 * (1 - s) * dense:6.2f} "
                  f"union={union:.2f} | {line}")
        # config that is best in geomean over shapes
        geo = []
        for i, c in enumerate(cfgs):
            ts = [next(t for t, cc in results[nm] if cc is c) for nm in shapes]
            geo.append((math.exp(sum(math.log(t) for t in ts) / len(ts)), c))
        geo.sort(key=lambda r: r[0])
        for nm in shapes:
            TUNED[(B,) + SHAPES[nm][:2]] = results[nm][0][1]
        print("best geomean:", ", ".join(f"{cfg_str(c)}={t:.2f}" for t, c in geo[:top]))
        print(f"(tune B={B} took {time.time() - t_start:.0f}s)")


# ----------------------------------------------------------------------------- bench
def bench(batches=(1, 2, 4), sparsities=(0.0, 0.25, 0.4, 0.5, 0.65), gather=True):
    probs = {nm: Problem(*SHAPES[nm]) for nm in SHAPES}
    rows = {}
    hdr = (f"{'B':>2} {'s':>5} {'mat':8s} {'K':>5} {'N':>5} {'read':>5} {'dense':>7} {'sparse':>7} "
           f"{'ideal':>7} {'sp/ideal':>8} {'sp/dense':>8} {'dGB/s':>6} {'sGB/s':>6} {'gather':>7}")
    print("\nper matrix (us per call; CUDA-graph replay, weights rotated through >=400MB; "
          "ideal=(1-s)*dense; read=fraction of weight rows read)")
    print(hdr)
    for B in batches:
        for s in sparsities:
            for nm, p in probs.items():
                x, thr, union, per_row = p.inputs(B, s)
                out = torch.empty(B, p.N, device=DEV, dtype=DT)
                dense = graph_time_us([(lambda w=w: F.linear(x, w)) for w in p.w])
                cfg = TUNED.get((B, p.K, p.N))
                sp = graph_time_us([sparse_fn(p, x, thr, w, out, cfg) for w in p.w_t])
                g = float("nan")
                if gather and nm not in ("qkv", "gate_up") and B == 1 and s in (0.5,):
                    g = loop_time_us([gather_fn(p, x, thr, w) for w in p.w_t])
                ideal = (1 - s) * dense
                wbytes = p.K * p.N * 2
                dgbs = wbytes / dense / 1e3
                sgbs = union * wbytes / sp / 1e3
                rows[(B, s, nm)] = (dense, sp, ideal)
                gs = f"{g:7.2f}" if g == g else f"{'-':>7}"
                print(f"{B:2d} {s:5.2f} {nm:8s} {p.K:5d} {p.N:5d} {union:5.2f} {dense:7.2f} {sp:7.2f} {ideal:7.2f} "
                      f"{sp / ideal if ideal > 0 else float('nan'):8.2f} {sp / dense:8.2f} {dgbs:6.0f} {sgbs:6.0f} {gs}")
    print("\nper decoder layer (sum of q,k,v,o,gate,up,down; fused = qkv+o+gate_up+down sparse kernels); "
          "target = 1.15*(1-s)*dense(unfused)")
    print(f"{'B':>2} {'s':>5} {'dense':>8} {'dense_f':>8} {'sparse':>8} {'sparse_f':>8} {'target':>8} "
          f"{'sp/tgt':>7} {'spf/tgt':>7} {'met?':>5}")
    for B in batches:
        for s in sparsities:
            d = sum(rows[(B, s, nm)][0] for nm in UNFUSED)
            df = sum(rows[(B, s, nm)][0] for nm in FUSED)
            sp = sum(rows[(B, s, nm)][1] for nm in UNFUSED)
            spf = sum(rows[(B, s, nm)][1] for nm in FUSED)
            tgt = 1.15 * (1 - s) * d
            met = "yes" if min(sp, spf) <= tgt else "no"
            print(f"{B:2d} {s:5.2f} {d:8.1f} {df:8.1f} {sp:8.1f} {spf:8.1f} {tgt:8.1f} {sp / tgt:7.2f} "
                  f"{spf / tgt:7.2f} {met:>5}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--tune-batches", default="1,2,4")
    ap.add_argument("--bench-tuned", action="store_true", help="table uses the configs --tune found, not pick_config")
    ap.add_argument("--batches", default="", help="table for these batch sizes only (e.g. 1,2,4,8)")
    ap.add_argument("--sparsities", default="", help="table at these sparsities only (e.g. 0.5)")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    import triton

    print(f"torch {torch.__version__}  triton {triton.__version__}  {torch.cuda.get_device_name()}")
    t0 = time.time()
    ok = True
    if not args.no_check:
        ok = check_all()
        print(f"(check took {time.time() - t0:.0f}s)")
    if args.tune:
        tune(batches=tuple(int(b) for b in args.tune_batches.split(",")))
    if not args.bench_tuned:
        TUNED.clear()
    else:
        print("table below uses the per-shape configs found by --tune in this run:")
        for k, c in sorted(TUNED.items()):
            print(f"  B={k[0]} K={k[1]} N={k[2]}: {cfg_str(c)}")
    if not args.no_bench:
        kw = dict(batches=(1,), sparsities=(0.0, 0.5)) if args.quick else {}
        if args.batches:
            kw["batches"] = tuple(int(b) for b in args.batches.split(","))
        if args.sparsities:
            kw["sparsities"] = tuple(float(v) for v in args.sparsities.split(","))
        bench(**kw)
    print(f"total {time.time() - t0:.0f}s; correctness {'OK' if ok else 'FAILED'}")


if __name__ == "__main__":
    main()
