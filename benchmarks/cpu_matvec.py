"""CPU sparse matvec alternatives side by side, on SmolLM2's shapes (fp32, one token, s = 0.5):

    python benchmarks/cpu_matvec.py [--threads 2] [--copies 30]

Each call cycles over `copies` random weight matrices so the weights come from memory, not cache, as in decoding
(SmolLM2's 30 layers). Prints µs per call and the ratio to the dense `F.linear`.
"""

from __future__ import annotations

import time

import click
import torch
import torch.nn.functional as F

from wina.runtime import cpu_kernels

SHAPES = [(576, 1536), (1536, 576), (576, 576), (576, 192)]  # (in, out): gate/up, down, q/o, k/v


def _best(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@click.command()
@click.option("--threads", type=int, default=2)
@click.option("--copies", type=int, default=30)
def main(threads: int, copies: int) -> None:
    torch.set_num_threads(threads)
    assert cpu_kernels.load() is not None, cpu_kernels.failure()
    click.echo(f"threads {threads}, {copies} weight copies per shape, s = 0.5; µs per call (ratio to dense)")
    click.echo("| in x out | dense | C++ sparse_matvec | embedding_bag | index_select + mm | COO sparse.mm |")
    click.echo("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for k, n in SHAPES:
        ws = [torch.randn(n, k, generator=g) for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]
        x = torch.randn(k, generator=g)
        scale = torch.rand(k, generator=g) + 0.5
        t = float((x.abs() * scale).median())
        idx = torch.nonzero(x.abs() * scale >= t).view(-1)
        xs = x[idx]
        coo = torch.sparse_coo_tensor(torch.stack([torch.zeros_like(idx), idx]), xs, (1, k))
        runs = {
            "dense": lambda: [F.linear(x[None], w) for w in ws],
            "cpp": lambda: [cpu_kernels.sparse_matvec(x, wt, scale, t, None) for wt in wts],
            "embag": lambda: [F.embedding_bag(idx[None], wt, per_sample_weights=xs[None], mode="sum") for wt in wts],
            "gather": lambda: [xs[None] @ wt.index_select(0, idx) for wt in wts],
            "coo": lambda: [torch.sparse.mm(coo, wt) for wt in wts],
        }
        us = {name: _best(fn) / copies * 1e6 for name, fn in runs.items()}
        cells = " | ".join(f"{us[n_]:.0f} ({us[n_] / us['dense']:.2f})" for n_ in ("cpp", "embag", "gather", "coo"))
        click.echo(f"| {k} x {n} | {us['dense']:.0f} | {cells} |")


if __name__ == "__main__":
    main()
