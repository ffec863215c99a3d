"""Target sparsity -> per-matrix thresholds, read off the calibration quantile tables."""

from __future__ import annotations

import torch


def threshold_at(levels: torch.Tensor, quantiles: torch.Tensor, sparsity: float) -> float:
    """The score below which a `sparsity` fraction of calibration scores fell (linear interpolation).

    Sparsity 0 maps to threshold 0, which the runtime treats as dense.
    """
    if sparsity <= 0:
        return 0.0
    lv, q = levels.double(), quantiles.double()
    i = int(torch.searchsorted(lv, torch.tensor([sparsity], dtype=torch.float64), right=True)[0]) - 1
    i = max(0, min(i, lv.numel() - 2))
    frac = (sparsity - lv[i]) / (lv[i + 1] - lv[i])
    return float(q[i] + (q[i + 1] - q[i]) * min(max(float(frac), 0.0), 1.0))
