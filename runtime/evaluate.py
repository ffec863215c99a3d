"""Perplexity and measured sparsity, under the papers' protocol (`paper`) or production decoding (`decode`).

Conventions (shared/data/README): the evaluation text is tokenized once without BOS and scored in
non-overlapping windows. In `paper` mode every prediction of a window counts and all but the first 1 % of its
tokens run sparse. In `decode` mode the first half of each window is a dense prefill and only the predictions made
by the sparse (decoded) tokens count — the number a production deployment would see.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from wina.archs import LINEARS
from wina.errors import WinaError

from .sparse import SparsityMeter
from .wina_model import WinaModel, paper_mask


def read_text(path: str | Path) -> str:
    """A .txt file as is; .jsonl(.gz) rows' `text` joined by blank lines (the WikiText-2 convention)."""
    p = Path(path)
    if not p.is_file():
        raise WinaError(f"evaluation data not found: {p}")
    if p.name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if p.name.endswith(".gz") else open
        with opener(p, "rt", encoding="utf-8") as f:
            return "\n\n".join(json.loads(line)["text"] for line in f if line.strip())
    return p.read_text(encoding="utf-8")


def summarize_sparsity(meter: SparsityMeter) -> tuple[float, dict[str, float]]:
    """(parameter-weighted overall sparsity, sparsity per matrix type aggregated over layers)."""
    by_kind: dict[str, list[float]] = {k: [0.0, 0.0] for k in LINEARS}
    weighted = params = 0.0
    for name, frac in meter.by_matrix().items():
        kind = name.split(".")[1]
        by_kind[kind][0] += float(meter.dropped[name])
        by_kind[kind][1] += meter.total[name]
        weighted += frac * meter.params[name]
        params += meter.params[name]
    overall = weighted / params if params else 0.0
    return overall, {k: d / t for k, (d, t) in by_kind.items() if t}


@torch.no_grad()
def perplexity(
    model: WinaModel,
    text: str,
    seq_len: int = 2048,
    max_windows: int | None = None,
    progress: bool = True,
    spread: bool = False,
) -> dict:
    """Perplexity of `text` under the model's current mode, method and sparsity, with measured sparsity.

    `max_windows` scores the first N windows, or with `spread` N windows evenly spaced over the text (a slice
    that samples every part of it: the first windows of WikiText-2 are one article).
    """
    ids = model.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    total = ids.numel() // seq_len
    n_windows = total if max_windows is None else min(total, max_windows)
    if n_windows < 1:
        raise WinaError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    starts = [(w * total // n_windows if spread else w) * seq_len for w in range(n_windows)]
    nll, scored = 0.0, 0
    prompt = seq_len // 2
    with model.measure_sparsity() as meter:
        for start in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
            x = ids[start : start + seq_len][None].to(model.device)
            if model.mode == "paper":
                sparse, first = paper_mask(1, seq_len, x.device), 0
            else:
                sparse = (torch.arange(seq_len, device=x.device) >= prompt)[None]
                first = prompt
            logits = model.decoder(x, sparse=sparse)
            pred, target = logits[0, first:-1].float(), x[0, first + 1 :]
            nll += F.cross_entropy(pred, target, reduction="sum").item()
            scored += target.numel()
    overall, by_matrix = summarize_sparsity(meter)
    return {
        "perplexity": math.exp(nll / scored),
        "nll_per_token": nll / scored,
        "tokens_scored": scored,
        "windows": n_windows,
        "spread": spread,
        "seq_len": seq_len,
        "mode": model.mode,
        "method": model.method,
        "target_sparsity": model.sparsity,
        "sparsity": overall,
        "sparsity_by_matrix": by_matrix,
    }
