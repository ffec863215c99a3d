"""Perplexity and measured sparsity of one checkpoint over methods x sparsities, as a markdown table.

    python benchmarks/perplexity_table.py CKPT --data ../shared/data/wikitext-2-raw/wikitext-2-raw-v1.test.jsonl \
        --max-windows 16 --methods wina,teal --sparsities 0,0.25,0.4,0.5,0.65 [--mode paper] [--json-out F]

The model is loaded once; each row re-thresholds it (the checkpoint is sparsity-ready).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import click

import wina
from wina.runtime.evaluate import perplexity, read_text
from wina.runtime.wina_model import WinaModel

MATRICES = ("q", "k", "v", "o", "gate", "up", "down")
HEADER = ("| method | allocation | mode | target | perplexity | measured | " + " | ".join(MATRICES) + " |\n"
          "|---|---|---|---|---|---|" + "---|" * len(MATRICES))


def table_rows(model: WinaModel, text: str, methods: list[str], sparsities: list[float], allocation: str | None,
               seq_len: int, max_windows: int | None) -> Iterator[tuple[str, dict]]:
    """(markdown row, JSON record) per (method, sparsity); dense (s = 0) once, under the first method."""
    for method in methods:
        for s in sparsities:
            if s == 0 and method != methods[0]:
                continue  # dense is the same for every method
            model.set_sparsity(s, method, allocation)
            t = time.time()
            r = perplexity(model, text, seq_len=seq_len, max_windows=max_windows, progress=False)
            by = r["sparsity_by_matrix"]
            cells = " | ".join(f"{by.get(k, 0.0):.3f}" for k in MATRICES)
            name = "dense" if s == 0 else method
            row = (f"| {name} | {model.allocation} | {model.mode} | {s:.2f} | {r['perplexity']:.3f} | "
                   f"{r['sparsity']:.3f} | {cells} |  <!-- {time.time() - t:.0f} s -->")
            yield row, {"method": name, "allocation": model.allocation, "mode": model.mode, "target": s,
                        "seq_len": seq_len, "max_windows": max_windows, **r}


@click.command()
@click.argument("checkpoint")
@click.option("--data", required=True)
@click.option("--seq-len", type=int, default=2048)
@click.option("--max-windows", type=int, default=16, help="0: the whole text.")
@click.option("--methods", default="wina,teal")
@click.option("--sparsities", default="0,0.25,0.4,0.5,0.65")
@click.option("--allocation", type=click.Choice(["uniform", "greedy"]), default=None,
              help="Default: greedy where the checkpoint has a table for the method.")
@click.option("--mode", type=click.Choice(["paper", "decode"]), default="paper")
@click.option("--device", default="cpu")
@click.option("--json-out", default=None, help="Append one JSON line per row to this file.")
def main(checkpoint, data, seq_len, max_windows, methods, sparsities, allocation, mode, device, json_out) -> None:
    model = wina.load(checkpoint, mode=mode, device=device)
    click.echo(f"{checkpoint}: {model.wina_config.get('transform')} transform, "
               f"{max_windows or 'all'} windows x {seq_len}")
    click.echo(HEADER)
    rows = table_rows(model, read_text(data), methods.split(","), [float(x) for x in sparsities.split(",")],
                      allocation, seq_len, max_windows or None)
    for row, record in rows:
        click.echo(row)
        if json_out:
            with open(json_out, "a") as f:
                f.write(json.dumps({"checkpoint": str(checkpoint), **record}) + "\n")


if __name__ == "__main__":
    main()
