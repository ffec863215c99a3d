"""Plot the greedy per-matrix sparsities across layers, read from one or more checkpoints' allocation tables.

    python benchmarks/plot_allocation.py out/smollm2-wina-greedy out/smollm2-teal-greedy --sparsity 0.5 \
        --out docs/allocation.png
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from wina.archs import LINEARS
from wina.calibration.allocation import matrix_sparsities
from wina.format import ALLOCATION_LEVELS_KEY, allocation_key
from wina.runtime.checkpoint import open_checkpoint


def layer_allocations(ckpt: str, sparsity: float) -> tuple[str, list[dict[str, float]]]:
    c = open_checkpoint(ckpt)
    methods = c.wina.get("allocation_methods") or []
    if not methods:
        raise click.ClickException(f"{ckpt} has no greedy allocation")
    method = methods[0]
    state = c.tensors()
    n = json.loads((Path(c.path) / "config.json").read_text())["num_hidden_layers"]
    grid = state[ALLOCATION_LEVELS_KEY]
    return method, [matrix_sparsities(state[allocation_key(f"model.layers.{i}.", method)], grid, sparsity)
                    for i in range(n)]


@click.command()
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--sparsity", type=float, default=0.5)
@click.option("--out", default="docs/allocation.png")
def main(checkpoints, sparsity, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(checkpoints), figsize=(5.2 * len(checkpoints), 3.4), sharey=True, squeeze=False)
    for ax, ckpt in zip(axes[0], checkpoints):
        method, rows = layer_allocations(ckpt, sparsity)
        layers = list(range(len(rows)))
        for short in LINEARS:
            ax.plot(layers, [r[short] for r in rows], marker=".", lw=1.2, label=short)
        ax.axhline(sparsity, color="k", lw=0.8, ls="--")
        ax.set_title(f"{method.upper()} greedy, every layer at {sparsity:.0%}", fontsize=10)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("matrix sparsity")
    axes[0][-1].legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    click.echo(f"wrote {out}: {Path(out).stat().st_size / 1024:.0f} KiB")
    # The numbers behind the plot, as a compact markdown table (mean over layers, min-max).
    for ckpt in checkpoints:
        method, rows = layer_allocations(ckpt, sparsity)
        cells = " | ".join(
            f"{sum(r[s] for r in rows) / len(rows):.2f} ({min(r[s] for r in rows):.2f}-{max(r[s] for r in rows):.2f})"
            for s in LINEARS)
        click.echo(f"| {method} | {cells} |")


if __name__ == "__main__":
    main()
