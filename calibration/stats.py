"""Score statistics of linear-layer inputs: the quantile tables that make a checkpoint sparsity-ready."""

from __future__ import annotations

import numpy as np
import torch

from wina.format import N_LEVELS

# Scores kept per matrix for the quantile estimate. A uniform sample of 2^20 scores pins each quantile to about
# +-0.0005 in sparsity (binomial standard error), far inside the +-1.5 point budget, and keeps sorting cheap.
MAX_SCORES = 1 << 20


def sparsity_levels() -> torch.Tensor:
    """The tabulation grid 0.000 ... 0.999 (fp64 arithmetic, stored fp32)."""
    return (torch.arange(N_LEVELS, dtype=torch.float64) / N_LEVELS).float()


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W[:, i]||_2 for W [out, in], accumulated in float64."""
    return weight.double().norm(dim=0).float()


def score_quantiles(
    x: torch.Tensor, scale: torch.Tensor | None, generator: torch.Generator, max_scores: int = MAX_SCORES
) -> torch.Tensor:
    """Quantiles at `sparsity_levels()` of score = |x| * scale over all tokens and channels of `x` [tokens, in]."""
    flat = x.reshape(-1)
    if flat.numel() > max_scores:
        # Sample (token, channel) cells first, then score only those: no full-size score tensor.
        idx = torch.randint(flat.numel(), (max_scores,), generator=generator)
        scores = flat[idx.to(flat.device)].float().abs()
        if scale is not None:
            scores = scores * scale[idx.to(scale.device) % x.shape[-1]]
    else:
        scores = flat.float().abs()
        if scale is not None:
            scores = (scores.view(-1, x.shape[-1]) * scale).reshape(-1)
    # A sorted array is unique, so where it is sorted does not change the table: on the GPU torch sorts fastest,
    # on the CPU numpy's vectorised sort is >10x faster than torch's at this size.
    if scores.is_cuda:
        ordered = torch.sort(scores).values.cpu().double()
    else:
        ordered = torch.from_numpy(np.sort(scores.numpy())).double()
    pos = torch.arange(N_LEVELS, dtype=torch.float64) * (ordered.numel() - 1) / N_LEVELS
    lo = pos.floor().long()
    hi = torch.clamp(lo + 1, max=ordered.numel() - 1)
    frac = pos - lo
    return (ordered[lo] * (1 - frac) + ordered[hi] * frac).float()
