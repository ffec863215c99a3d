"""Where a decode token's time goes on the GPU: every kernel of CUDA-graph decode steps, dense and sparse.

    . benchmarks/device_env.sh; python3 benchmarks/gpu_profile.py [--layers 32] [--steps 4]

Builds the synthetic Llama-3-8B-shaped model of `wina bench` (bf16, s = 0.5, fast path on), captures the decode
step of `runtime.decode.DecodeRunner`, replays it under torch.profiler and reads the kernel records of the
replays from the Chrome trace. Kernels of a graph with programmatic dependent launch overlap (the next one is
resident and waiting before the previous ends), so a kernel's "effective" time is its end minus the previous
kernel's end: what it adds to the token. Prints, per kernel name, calls per token and effective us per token, and
the per-layer reading of sparse over (1 - s) x dense linear time in context (`layer_reading`).

    . benchmarks/device_env.sh; cd benchmarks; python3 gpu_profile.py --mlp-timeline

looks inside the sparse MLP kernel instead (`mlp_timeline`): per program, its SM and when it finishes each phase.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import torch

from wina.runtime import bench as wb
from wina.runtime.decode import DecodeRunner
from wina.runtime.kernels import enable_fast_path


def kernel_records(trace_path: str) -> list[tuple[str, float, float]]:
    with open(trace_path) as f:
        ev = json.load(f)["traceEvents"]
    ks = [(e["name"], float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in ev
          if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return sorted(ks, key=lambda k: k[1])


def short(name: str) -> str:
    return name.split("(")[0].split("<")[0][-60:]


@torch.no_grad()
def profile_decode(dec, prompt, sparse, steps: int) -> dict:
    r = DecodeRunner(dec, 1, prompt.shape[1] + steps + 8, sparse=sparse)
    r.prefill(prompt)
    r.capture()
    for _ in range(3):
        r.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            r.step()
        torch.cuda.synchronize()
    r.close()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        ks = kernel_records(path)
    eff = collections.defaultdict(float)
    dur = collections.defaultdict(float)
    calls = collections.Counter()
    prev_end = None
    for name, t0, t1 in ks:
        n = short(name)
        eff[n] += max(t1 - (t0 if prev_end is None else prev_end), 0.0)  # idle gaps count as this kernel's
        dur[n] += t1 - t0
        calls[n] += 1
        prev_end = t1 if prev_end is None else max(prev_end, t1)
    total = (ks[-1][2] - ks[0][1]) if ks else 0.0
    rows = sorted(eff, key=lambda n: -eff[n])
    return {"us_per_token": total / steps,
            "kernels": [{"name": n, "calls_per_token": calls[n] / steps, "effective_us_per_token": eff[n] / steps,
                         "duration_us_per_token": dur[n] / steps} for n in rows]}


def layer_linears_us(p: dict, layers: int) -> dict:
    """A decoder layer's linear time read in context from one profile (`profile_decode`): the effective us per layer
    of the kernels that run in every layer (calls per token >= layers), the attention excepted; "us" leaves the
    RMSNorm kernels out (dense runs its norms as kernels of their own, sparse inside q/k/v and the compaction; dense's
    count also holds the final norm, 1 of its 65 calls)."""
    every = [k for k in p["kernels"] if k["calls_per_token"] >= layers and "attention" not in k["name"]]
    total = sum(k["effective_us_per_token"] for k in every) / layers
    norms = sum(k["effective_us_per_token"] for k in every if "rmsnorm" in k["name"]) / layers
    return {"us": total - norms, "with_norms_us": total}


def layer_reading(dense: dict, sparse: dict, layers: int, s: float = 0.5) -> dict:
    """Sparse over (1 - s) x dense per layer, in context (`layer_linears_us`), without and with the dense norms."""
    d, sp = layer_linears_us(dense, layers), layer_linears_us(sparse, layers)
    return {"dense_us": d["us"], "dense_with_norms_us": d["with_norms_us"], "sparse_us": sp["with_norms_us"],
            "sparse_over_ideal": sp["with_norms_us"] / ((1 - s) * d["us"]),
            "sparse_over_ideal_with_norms": sp["with_norms_us"] / ((1 - s) * d["with_norms_us"])}


def run(layers: int = 32, steps: int = 4) -> dict:
    """Profile dense, dense with cuBLAS o/down, and sparse decode; print the tables; return them."""
    dev = torch.device("cuda")
    hf = wb.synthetic_hf(wb.LLAMA3_8B, dev, torch.bfloat16, layers=layers)
    dec = wb.decoder_from_hf(hf)
    calib = torch.randint(0, hf.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1)).to(dev)
    wb.set_sparsity(dec, wb.calibrate(dec, calib), 0.5)
    del hf
    enable_fast_path(dec)
    prompt = torch.randint(0, dec.embed.weight.shape[0], (1, 32), generator=torch.Generator().manual_seed(2)).to(dev)
    res = {}
    for label, sparse in (("dense", None), ("dense, cuBLAS o/down", None), ("sparse", True)):
        plain = label.endswith("o/down")
        if plain:  # the decode step's fallback: cuBLAS addmm for o and down, a silu*mul launch
            saved = [(lin, lin.kernel) for b in dec.blocks for lin in (b.attn.o, b.mlp.down)]
            for lin, _ in saved:
                lin.kernel = None
        res[label] = p = profile_decode(dec, prompt, sparse, steps)
        if plain:
            for lin, kern in saved:
                lin.kernel = kern
        print(f"\n{label}: {p['us_per_token']:.0f} us per token in the trace ({layers} layers)")
        print(f"  {'kernel':60s} {'calls':>6s} {'eff us':>8s} {'per layer':>9s} {'dur us':>8s}")
        for k in p["kernels"]:
            print(f"  {k['name']:60s} {k['calls_per_token']:6.1f} {k['effective_us_per_token']:8.1f} "
                  f"{k['effective_us_per_token'] / layers:9.2f} {k['duration_us_per_token']:8.1f}")
    res["layer_in_context"] = r = layer_reading(res["dense"], res["sparse"], layers)
    print(f"\nper layer in context (kernels of every layer, attention excepted): sparse {r['sparse_us']:.2f} us, "
          f"dense {r['dense_us']:.2f} ({r['dense_with_norms_us']:.2f} with its RMSNorms): sparse / (0.5 x dense) "
          f"{r['sparse_over_ideal']:.3f} ({r['sparse_over_ideal_with_norms']:.3f} with the norms)")
    del dec
    torch.cuda.empty_cache()
    return res


def _stats(v: torch.Tensor) -> str:
    v = v.double()
    return f"{v.min():7.2f} {v.median():7.2f} {v.mean():7.2f} {v.max():7.2f}"


def timeline_row(b: torch.Tensor) -> dict:
    """One call's trace rows ([programs, MLP_TRACE_SLOTS] int64, `_mlp_kernel`'s TRACE layout) as phase statistics."""
    t = (b[:, 1:7] - b[:, 2].min()).double() / 1e3  # launch, wait, gate/up done, listed, down done, arrived
    sm, n_g, n_u, n_d, last = b[:, 0], b[:, 7], b[:, 8], b[:, 9], b[:, 10]
    per_sm = torch.bincount(sm, minlength=132)
    shared = per_sm[sm] > 1
    gu = t[:, 2] - t[:, 1]
    down = t[:, 4] - t[:, 3]

    def median(v: torch.Tensor):
        return round(float(v.median()), 2) if v.numel() else None

    slow = gu.argsort(descending=True)[:6].tolist()  # which programs gate/up keeps longest, and where
    return {"span_us": float(t[:, 5].max()), "gate_up_us": _stats(gu), "down_us": _stats(down),
            "n_d": _stats(n_d.float()), "end_us": _stats(t[:, 5]),
            "wait_us": _stats(t[:, 1]), "listed_us": _stats(t[:, 3] - t[:, 2]), "add_us": _stats(t[:, 5] - t[:, 4]),
            "gate_up_alone_vs_shared_us": (median(gu[~shared]), median(gu[shared])),
            "down_us_per_row": float((down / n_d.clamp_min(1)).median()),
            "corr_end_rows": float(torch.corrcoef(torch.stack([t[:, 5], n_d.double()]))[0, 1]),
            "sms_used": int((per_sm > 0).sum()), "n_g": int(n_g[0]), "n_u": int(n_u[0]),
            "last_program_end_us": float(t[last.bool(), 5].max()),
            "slowest_gate_up": [(p, int(sm[p]), int(per_sm[sm[p]]), round(float(gu[p]), 2)) for p in slow]}


@torch.no_grad()
def mlp_timeline(calls: int = 4, config: dict | None = None) -> dict:
    """Inside `_mlp_kernel` (8B shapes, s = 0.5, random weights rotating over > 400 MB): each program's SM and the
    global timer at its phases (`triton_kernels.MLP_TRACE`), per call: when programs pass their PDL wait, finish
    gate/up, list down's channels, finish down, add their partial and arrive; µs from the first program's wait.
    Shows where the kernel's time goes: the phases' spread over programs, and what the last program waits for."""
    import gpu_suite as gs
    from wina.runtime import triton_kernels as tk

    run, copies = gs.mlp_problem()
    cfg = dict(tk.MLP_FUSED, **(config or {}))
    nprog = gs.MLP_SHAPE[1] // cfg["block_f"]
    bufs = [torch.zeros(nprog, tk.MLP_TRACE_SLOTS, dtype=torch.int64, device="cuda") for _ in range(calls)]
    try:
        for i in range(calls + 2):  # two warm-up calls (compile), then the traced ones back to back
            tk.MLP_TRACE = bufs[max(i - 2, 0)]
            run(i % copies, cfg)
            if i < 2:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
    finally:
        tk.MLP_TRACE = None
    print(f"\n_mlp_kernel timeline, {cfg} (us from the first program's PDL wait; min median mean max over programs)")
    out = []
    for c, b in enumerate(bufs):
        row = timeline_row(b.cpu())
        out.append(row)
        print(f"call {c}: span {row['span_us']:.2f} us on {row['sms_used']} SMs, lists {row['n_g']}+{row['n_u']} rows")
        print(f"  wait passed   {row['wait_us']}")
        print(f"  gate/up       {row['gate_up_us']}  (median alone on its SM / sharing: "
              f"{row['gate_up_alone_vs_shared_us']})")
        print(f"  listed        {row['listed_us']}")
        print(f"  down rows     {row['n_d']}")
        print(f"  down          {row['down_us']}  ({row['down_us_per_row']:.3f} us per row)")
        print(f"  added         {row['add_us']}")
        print(f"  arrived       {row['end_us']}  (corr with down rows {row['corr_end_rows']:.2f}; "
              f"last program done {row['last_program_end_us']:.2f})")
        print("  slowest gate/up (program, SM, programs on that SM, us): "
              + ", ".join(f"{p} {s_} {n} {g}" for p, s_, n, g in row["slowest_gate_up"]))
    del run
    torch.cuda.empty_cache()
    return {"calls": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--mlp-timeline", action="store_true", help="only the trace inside _mlp_kernel")
    ap.add_argument("--mlp-config", default="{}", help="with --mlp-timeline: JSON overrides of MLP_FUSED, e.g. "
                                                      "'{\"block_f\": 128, \"num_warps\": 16}'")
    args = ap.parse_args()
    if args.mlp_timeline:
        print(json.dumps(mlp_timeline(config=json.loads(args.mlp_config))))
        return
    print(json.dumps(run(args.layers, args.steps)))


if __name__ == "__main__":
    main()
