"""Names and constants of the annotated checkpoint (docs/FORMAT.md is the prose version of this file).

The converter writes and the runtime reads these keys; nothing else couples the two.
"""

from __future__ import annotations

FORMAT_VERSION = 1
CONFIG_SECTION = "wina"
METHODS: tuple[str, ...] = ("wina", "teal")
TRANSFORMS: tuple[str, ...] = ("none",)
ALLOCATIONS: tuple[str, ...] = ("uniform",)
MAX_SPARSITY = 0.95

# The sparsity grid on which every score-quantile table is tabulated: 0.000, 0.001, ..., 0.999.
N_LEVELS = 1000
LEVELS_KEY = "wina.sparsity_levels"

# Safetensors header metadata (string -> string) stamped on every shard.
SAFETENSORS_METADATA = {"format": "pt", "wina_format_version": str(FORMAT_VERSION)}


def col_norm_key(linear: str) -> str:
    """fp32 [in_features]: ||W[:, i]||_2 of the stored weight `linear + '.weight'`."""
    return f"{linear}.col_norm"


def quantiles_key(linear: str, method: str) -> str:
    """fp32 [N_LEVELS]: score value below which that fraction of calibration scores fall."""
    return f"{linear}.{method}_quantiles"


def check_sparsity(s: float) -> float:
    from .errors import WinaError

    if not (0.0 <= s <= MAX_SPARSITY):
        raise WinaError(f"sparsity {s} is out of range: choose a value in [0, {MAX_SPARSITY}]")
    return float(s)
