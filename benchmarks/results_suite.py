"""Every perplexity table of docs/RESULTS.md in one run (sized for one GPU call; runs on the CPU too, slowly).

    python benchmarks/results_suite.py MODEL --calibration C4.jsonl.gz --data WIKITEXT.jsonl --out DIR \
        [--device cuda] [--max-windows 0]

Converts MODEL four times (transform none with the greedy allocation for WINA and for TEAL, svd, shared), then
measures WikiText-2 perplexity and sparsity: dense; WINA and TEAL uniform at 25/40/50/65 % for every transform
(paper mode); greedy at the same levels; production decode mode at 50 %. Appends to DIR/results.jsonl and prints
the markdown tables (also DIR/results.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

import wina
from wina.convert.converter import ConvertOptions, convert
from wina.runtime.evaluate import read_text

from perplexity_table import HEADER, table_rows

LEVELS = [0.25, 0.4, 0.5, 0.65]
# (checkpoint name, converter options, [(mode, methods, sparsities, allocation)])
PLAN = [
    ("none-wina-greedy", dict(transform="none", allocation="greedy", method="wina"), [
        ("paper", ["wina", "teal"], [0.0, *LEVELS], "uniform"),
        ("paper", ["wina"], LEVELS, "greedy"),
        ("decode", ["wina", "teal"], [0.0, 0.5], "uniform"),
    ]),
    ("none-teal-greedy", dict(transform="none", allocation="greedy", method="teal"), [
        ("paper", ["teal"], LEVELS, "greedy"),
    ]),
    ("svd", dict(transform="svd"), [("paper", ["wina", "teal"], [0.0, *LEVELS], "uniform")]),
    ("shared", dict(transform="shared"), [("paper", ["wina", "teal"], [0.0, *LEVELS], "uniform")]),
]


@click.command()
@click.argument("model")
@click.option("--calibration", required=True, help="Calibration text (C4 sample).")
@click.option("--data", required=True, help="Evaluation text (WikiText-2 test).")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--device", default="cpu")
@click.option("--seq-len", type=int, default=2048)
@click.option("--max-windows", type=int, default=0, help="0: the whole text.")
@click.option("--only", default=None, help="Comma-separated checkpoint names of the plan to run.")
def main(model, calibration, data, out, device, seq_len, max_windows, only) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = read_text(data)
    lines = []
    for name, options, runs in PLAN:
        if only and name not in only.split(","):
            continue
        t = time.time()
        ckpt = convert(model, out / name, ConvertOptions(calibration_data=calibration, device=device, **options),
                       overwrite=True)
        lines += [f"\n{name}: converted in {time.time() - t:.0f} s on {device}; "
                  f"{max_windows or 'all'} windows x {seq_len}", HEADER]
        click.echo("\n".join(lines[-2:]))
        m = wina.load(ckpt, device=device)
        for mode, methods, sparsities, allocation in runs:
            m.set_mode(mode)
            for row, record in table_rows(m, text, methods, sparsities, allocation, seq_len, max_windows or None):
                click.echo(row)
                lines.append(row)
                with open(out / "results.jsonl", "a") as f:
                    f.write(json.dumps({"checkpoint": name, "device": device, **record}) + "\n")
        del m
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
