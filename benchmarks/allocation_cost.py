"""Cost of the greedy allocation search on one block of a given shape (random weights, random hidden states).

    OMP_NUM_THREADS=1 python benchmarks/allocation_cost.py --shape smollm2 --samples 4 --seq-len 128 --layers 2
    OMP_NUM_THREADS=1 python benchmarks/allocation_cost.py --shape 8b --samples 1 --seq-len 32 --layers 2

Prints per layer: steps, candidate forwards, linear FLOPs actually recomputed, seconds, and the achieved CPU
GFLOP/s. The search's work is dominated by the linears, so its cost at another token count or on another
device is FLOPs / throughput (a linear extrapolation, not a measurement).
"""

from __future__ import annotations

import time

import click
import torch
from transformers import LlamaConfig

from wina.calibration import column_norms, score_quantiles, sparsity_levels
from wina.calibration.allocation import greedy_allocation
from wina.runtime.config import DecoderConfig
from wina.runtime.model import Block, Rotary

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
}


@click.command()
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default="smollm2")
@click.option("--samples", type=int, default=4)
@click.option("--seq-len", type=int, default=128)
@click.option("--layers", type=int, default=2)
@click.option("--step", type=float, default=0.01)
@click.option("--method", type=click.Choice(["wina", "teal"]), default="wina")
@click.option("--exact", is_flag=True, help="Re-evaluate every candidate at every step (no lazy greedy).")
@click.option("--device", default="cpu", help="cpu or cuda: where the block and the search run.")
def main(shape, samples, seq_len, layers, step, method, exact, device) -> None:
    torch.manual_seed(0)
    dev = torch.device(device)
    hf = LlamaConfig(vocab_size=32, num_hidden_layers=layers, rms_norm_eps=1e-5, **SHAPES[shape])
    cfg = DecoderConfig.from_hf(hf)
    bias = {s: False for s in ("q", "k", "v", "o", "gate", "up", "down")}
    cos, sin = Rotary(cfg).to(dev)(torch.arange(seq_len, device=dev), torch.float32)
    levels = sparsity_levels()
    x = torch.randn(samples, seq_len, cfg.hidden_size, device=dev)
    totals = [0.0, 0.0]
    for i in range(layers):
        block = Block(cfg, i, bias).to(dev)
        for p in block.parameters():
            p.data = torch.randn_like(p) * (p.shape[-1] ** -0.5) if p.dim() == 2 else torch.ones_like(p)
        caps: dict[str, torch.Tensor] = {}
        hooks = [lin.register_forward_pre_hook(lambda m, a, s=s: caps.__setitem__(s, a[0].reshape(-1, a[0].shape[-1])))
                 for s, lin in block.linears().items()]
        with torch.no_grad():
            block(x, cos, sin, torch.arange(seq_len, device=dev), None, None)
        for h in hooks:
            h.remove()
        gen = torch.Generator().manual_seed(i)
        norms = {s: column_norms(lin.weight) for s, lin in block.linears().items()}
        tables = {s: score_quantiles(caps[s], norms[s] if method == "wina" else None, gen) for s in caps}
        t, c = time.perf_counter(), time.process_time()
        table, st = greedy_allocation(block, x, cos, sin, tables, levels, method, norms, step=step, lazy=not exact,
                                  progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt, dc = time.perf_counter() - t, time.process_time() - c
        at50 = [round(v, 3) for v in table[int(round(0.5 / 0.005))].tolist()]
        click.echo(f"layer {i}: matrix sparsities at 50 %: {at50}")
        totals[0] += st.linear_flops
        totals[1] += dc
        click.echo(f"layer {i}: {st.steps} steps, {st.evaluations} forwards, {st.linear_flops / 1e9:.1f} GFLOP "
                   f"in linears, {dt:.1f} s wall, {dc:.1f} s CPU ({st.linear_flops / dc / 1e9:.1f} GFLOP per CPU s), "
                   f"{st.linear_flops / (samples * seq_len) / 1e9:.3f} GFLOP per token")
    click.echo(f"shape={shape} tokens={samples}x{seq_len} step={step}: {totals[1] / layers:.1f} CPU s/layer, "
               f"{totals[0] / layers / (samples * seq_len) / 1e9:.3f} GFLOP per token per layer")


if __name__ == "__main__":
    main()
