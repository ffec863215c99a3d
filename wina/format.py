"""Names and constants of the annotated checkpoint (docs/FORMAT.md is the prose version of this file).

The converter writes and the runtime reads these keys; nothing else couples the two.
"""

from __future__ import annotations

FORMAT_VERSION = 1
CONFIG_SECTION = "wina"
METHODS: tuple[str, ...] = ("wina", "teal")
TRANSFORMS: tuple[str, ...] = ("none", "svd", "shared")
ALLOCATIONS: tuple[str, ...] = ("uniform", "greedy")
MAX_SPARSITY = 0.95

# The sparsity grid on which every score-quantile table is tabulated: 0.000, 0.001, ..., 0.999.
N_LEVELS = 1000
LEVELS_KEY = "wina.sparsity_levels"

# Sparse-aware calibration: beside each dense quantile table, tables measured while the whole model ran at these
# uniform sparsities (the inputs of later matrices drift as earlier ones sparsify). Stored under SPARSE_LEVELS_KEY.
SPARSE_CALIBRATION_LEVELS: tuple[float, ...] = (0.25, 0.5, 0.75)
SPARSE_LEVELS_KEY = "wina.calibration_sparsities"

# Greedy allocation tables are tabulated at block sparsities 0, 0.005, ..., MAX_SPARSITY (stored under this key).
ALLOCATION_GRID_STEP = 0.005
ALLOCATION_LEVELS_KEY = "wina.allocation_levels"

# Safetensors header metadata (string -> string) stamped on every shard.
SAFETENSORS_METADATA = {"format": "pt", "wina_format_version": str(FORMAT_VERSION)}


def col_norm_key(linear: str) -> str:
    """fp32 [in_features]: ||W[:, i]||_2 of the stored weight `linear + '.weight'`."""
    return f"{linear}.col_norm"


def shortcut_key(layer_prefix: str, kind: str) -> str:
    """[hidden, hidden] residual shortcut rotation of a layer (`svd` transform): x <- x @ S before the sublayer's
    output is added. `kind` is "attn" (S = Q_attnᵀ Q_mlp) or "mlp" (S = Q_mlpᵀ Q_attn of the next layer)."""
    return f"{layer_prefix}{kind}_shortcut.weight"


def quantiles_key(linear: str, method: str) -> str:
    """fp32 [N_LEVELS]: score value below which that fraction of calibration scores fall."""
    return f"{linear}.{method}_quantiles"


def sparse_quantiles_key(linear: str, method: str) -> str:
    """fp32 [len(SPARSE_CALIBRATION_LEVELS), N_LEVELS]: the quantile table re-measured with the model sparse."""
    return f"{linear}.{method}_quantiles_sparse"


def check_sparsity(s: float) -> float:
    from .errors import WinaError

    if not (0.0 <= s <= MAX_SPARSITY):
        raise WinaError(f"sparsity {s} is out of range: choose a value in [0, {MAX_SPARSITY}]")
    return float(s)


def allocation_key(layer_prefix: str, method: str) -> str:
    """fp32 [len(allocation levels), 7]: greedy per-matrix sparsities (q, k, v, o, gate, up, down) of a layer, one
    row per block sparsity of `wina.allocation_levels`, for scoring rule `method`."""
    return f"{layer_prefix}{method}_allocation"
