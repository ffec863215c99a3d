"""Perplexity and measured sparsity of one checkpoint over methods x sparsities, as a markdown table.

    python benchmarks/perplexity_table.py CKPT --data ../shared/data/wikitext-2-raw/wikitext-2-raw-v1.test.jsonl \
        --max-windows 16 --methods wina,teal --sparsities 0,0.25,0.4,0.5,0.65 [--mode paper] [--json-out F]

The model is loaded once; each row re-thresholds it (the checkpoint is sparsity-ready).
"""

from __future__ import annotations

import json
import time

import click

import wina
from wina.runtime.evaluate import perplexity, read_text


@click.command()
@click.argument("checkpoint")
@click.option("--data", required=True)
@click.option("--seq-len", type=int, default=2048)
@click.option("--max-windows", type=int, default=16)
@click.option("--methods", default="wina,teal")
@click.option("--sparsities", default="0,0.25,0.4,0.5,0.65")
@click.option("--mode", type=click.Choice(["paper", "decode"]), default="paper")
@click.option("--json-out", default=None, help="Append one JSON line per row to this file.")
def main(checkpoint, data, seq_len, max_windows, methods, sparsities, mode, json_out) -> None:
    model = wina.load(checkpoint, mode=mode)
    text = read_text(data)
    click.echo(f"{checkpoint}: {model.wina_config.get('transform')} transform, "
               f"{model.wina_config.get('allocation')} allocation, {mode} mode, "
               f"{max_windows} windows x {seq_len}")
    click.echo("| method | target | perplexity | measured | q | k | v | o | gate | up | down |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|---|")
    for method in methods.split(","):
        for s in (float(x) for x in sparsities.split(",")):
            if s == 0 and method != methods.split(",")[0]:
                continue  # dense is the same for every method
            model.set_sparsity(s, method)
            t = time.time()
            r = perplexity(model, text, seq_len=seq_len, max_windows=max_windows, progress=False)
            by = r["sparsity_by_matrix"]
            cells = " | ".join(f"{by.get(k, 0.0):.3f}" for k in ("q", "k", "v", "o", "gate", "up", "down"))
            name = "dense" if s == 0 else method
            click.echo(f"| {name} | {s:.2f} | {r['perplexity']:.3f} | {r['sparsity']:.3f} | {cells} |"
                       f"  <!-- {time.time() - t:.0f} s -->")
            if json_out:
                with open(json_out, "a") as f:
                    f.write(json.dumps({"checkpoint": str(checkpoint), **r}) + "\n")


if __name__ == "__main__":
    main()
