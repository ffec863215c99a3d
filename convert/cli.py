"""`wina-convert MODEL --out DIR`: calibrate and write an annotated, sparsity-ready checkpoint."""

from __future__ import annotations

import signal
import sys
import threading

import click

from wina.calibration import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, DEFAULT_SOURCE
from wina.errors import one_line_errors
from wina.format import ALLOCATIONS, METHODS, TRANSFORMS

from .converter import DTYPES, ConvertOptions, convert


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output checkpoint directory.")
@click.option("--method", type=click.Choice(METHODS), default="wina", show_default=True, help="Default scoring rule.")
@click.option("--sparsity", type=float, default=0.5, show_default=True, help="Default sparsity in [0, 0.95].")
@click.option(
    "--calibration-data",
    default=DEFAULT_SOURCE,
    show_default=True,
    help="Local .txt/.jsonl/.jsonl.gz file, or a datasets spec NAME[:CONFIG][@SPLIT].",
)
@click.option("--calibration-samples", type=int, default=DEFAULT_SAMPLES, show_default=True, help="Sequences N.")
@click.option("--calibration-seq-len", type=int, default=DEFAULT_SEQ_LEN, show_default=True, help="Tokens L each.")
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True, help="Weight dtype.")
@click.option("--seed", type=int, default=0, show_default=True, help="Calibration sampling seed.")
@click.option(
    "--transform",
    type=click.Choice(TRANSFORMS),
    default="none",
    show_default=True,
    help="Orthogonal transform: svd (the paper's, per-layer, adds shortcut rotations) or shared (one rotation, no "
    "run-time cost).",
)
@click.option(
    "--allocation",
    type=click.Choice(ALLOCATIONS),
    default="uniform",
    show_default=True,
    help="How a model sparsity becomes per-matrix sparsities: uniform, or greedy (per-layer error-minimising search "
    "for --method on the calibration data, stored in the checkpoint).",
)
@click.option(
    "--allocation-step", type=float, default=0.01, show_default=True, help="Greedy: layer sparsity added per step."
)
@click.option("--device", default="cpu", show_default=True, help="Where calibration runs (cpu, cuda, ...).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@one_line_errors
def main(model: str, out: str, overwrite: bool, **options) -> None:
    """Convert MODEL (Hub id, local Hugging Face directory, or .gguf file) into a wina checkpoint at --out."""
    # A terminated conversion must unwind like an interrupted one, so the staging directory is removed.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    path = convert(model, out, ConvertOptions(**options), overwrite=overwrite)
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
