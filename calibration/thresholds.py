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


def threshold_for(
    levels: torch.Tensor,
    tables: list[torch.Tensor],
    table_sparsities: list[float],
    model_sparsity: float,
    matrix_sparsity: float,
) -> float:
    """Threshold for one matrix from quantile tables calibrated with the model running at several sparsities.

    `tables[j]` was measured while every matrix ran at `table_sparsities[j]` (0: the dense table). A matrix's input
    drifts as the layers before it sparsify, so the tables bracketing `model_sparsity` are read at
    `matrix_sparsity` and interpolated linearly; above the last calibrated sparsity the last table is used.
    """
    if matrix_sparsity <= 0:
        return 0.0
    points = [threshold_at(levels, t, matrix_sparsity) for t in tables]
    if model_sparsity >= table_sparsities[-1]:
        return points[-1]
    for j in range(len(tables) - 1):
        lo, hi = table_sparsities[j], table_sparsities[j + 1]
        if lo <= model_sparsity <= hi:
            w = (model_sparsity - lo) / (hi - lo)
            return points[j] * (1 - w) + points[j + 1] * w
    return points[0]
