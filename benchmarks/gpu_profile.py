"""Where a decode token's time goes on the GPU: every kernel of CUDA-graph decode steps, dense and sparse.

    . benchmarks/device_env.sh; python3 benchmarks/gpu_profile.py [--layers 32] [--steps 4]

Builds the synthetic Llama-3-8B-shaped model of `wina bench` (bf16, s = 0.5, fast path on), captures the decode
step of `runtime.decode.DecodeRunner`, replays it under torch.profiler and reads the kernel records of the
replays from the Chrome trace. Kernels of a graph with programmatic dependent launch overlap (the next one is
resident and waiting before the previous ends), so a kernel's "effective" time is its end minus the previous
kernel's end: what it adds to the token. Prints, per kernel name, calls per token and effective us per token.
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
    del dec
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    print(json.dumps(run(args.layers, args.steps)))


if __name__ == "__main__":
    main()
