"""Calibration: run text through the dense model, tabulate input-score quantiles, map sparsity to thresholds."""

from .data import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, DEFAULT_SOURCE, calibration_tokens
from .stats import column_norms, score_quantiles, sparsity_levels
from .thresholds import threshold_at, threshold_for

__all__ = [
    "DEFAULT_SAMPLES",
    "DEFAULT_SEQ_LEN",
    "DEFAULT_SOURCE",
    "calibration_tokens",
    "column_norms",
    "score_quantiles",
    "sparsity_levels",
    "threshold_at",
    "threshold_for",
]
