"""Calibration text: local .txt/.jsonl/.jsonl.gz files or a `datasets` dataset, cut into N x L token windows."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Iterator

import torch

from wina.errors import WinaError

DEFAULT_SOURCE = "allenai/c4:en@validation"
DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 512


def read_documents(src: str, seed: int) -> Iterator[str]:
    """Documents from `src`, in a seed-determined order.

    `src` is a local file (.txt: paragraphs separated by blank lines; .jsonl / .jsonl.gz: one `{"text": ...}` per
    line) or a dataset spec `NAME[:CONFIG][@SPLIT]` for `datasets.load_dataset` (streamed; a local dataset folder
    works too). Local files are shuffled with `seed`; streamed datasets through a seeded shuffle buffer.
    """
    path = Path(src)
    if path.is_file():
        yield from _shuffled(_read_file(path), seed)
    elif path.is_dir() or "/" in src or ":" in src or "@" in src:
        yield from _read_dataset(src, seed)
    else:
        raise WinaError(f"calibration data {src!r} is neither a file nor a dataset spec NAME[:CONFIG][@SPLIT]")


def _read_file(path: Path) -> list[str]:
    name = path.name.lower()
    try:
        if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                return [json.loads(line)["text"] for line in f if line.strip()]
        if name.endswith(".txt"):
            return [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    except (OSError, ValueError, KeyError) as e:
        raise WinaError(f"cannot read calibration file {path}: {type(e).__name__}: {e}") from None
    raise WinaError(f"calibration file {path} must be .txt, .jsonl or .jsonl.gz")


def _shuffled(docs: list[str], seed: int) -> list[str]:
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    return docs


def _read_dataset(spec: str, seed: int) -> Iterator[str]:
    import datasets

    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        ds = ds.shuffle(seed=seed, buffer_size=10_000)
        for row in ds:
            yield row["text"]
    except Exception as e:  # datasets raises many types (offline, missing, bad config)
        raise WinaError(f"cannot load calibration dataset {spec!r}: {type(e).__name__}: {e}".splitlines()[0]) from None


def calibration_tokens(tokenizer, src: str, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`samples` x `seq_len` token ids: documents joined by EOS into one stream, cut into consecutive windows."""
    if samples < 1 or seq_len < 2:
        raise WinaError(f"calibration needs samples >= 1 and seq_len >= 2, got {samples} x {seq_len}")
    need = samples * seq_len
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for doc in read_documents(src, seed):
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"] + sep)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise WinaError(
            f"calibration text too short: {src} gives {len(stream)} tokens, need {samples} x {seq_len} = {need}"
        )
    return torch.tensor(stream[:need], dtype=torch.long).view(samples, seq_len)
