"""The sparse linear op: the single module boundary where WINA/TEAL sparsity is applied and kernels plug in.

`SparseLinear.forward(x, sparse)` computes `W x + b` where, on the tokens selected by `sparse`, every input channel
whose score falls below the layer's threshold is dropped. Score = |x_i| * scale_i with scale = column norm
||W[:, i]||_2 (WINA) or None (TEAL). The reference path below is the specification; fast paths (GPU Triton, CPU)
register themselves as `kernel` and must match it.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

# None: dense. True: every token sparse. Bool tensor [batch, seq]: those tokens sparse.
SparseSpec = Union[None, bool, torch.Tensor]
# A fast path: (module, x, sparse) -> y, or None to fall back to the reference.
Kernel = Callable[["SparseLinear", torch.Tensor, SparseSpec], "torch.Tensor | None"]


def keep_mask(x: torch.Tensor, threshold: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Channels that survive: score >= threshold, computed in fp32 whatever the activation dtype."""
    score = x.float().abs()
    if scale is not None:
        score = score * scale
    return score >= threshold


def reference_sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: torch.Tensor,
    scale: torch.Tensor | None,
    sparse: SparseSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification: zero the dropped inputs of the sparse tokens, then a dense matmul. Returns (y, keep)."""
    keep = keep_mask(x, threshold, scale)
    if isinstance(sparse, torch.Tensor):
        keep = keep | ~sparse[..., None]
    return F.linear(x * keep.to(x.dtype), weight, bias), keep


class SparsityMeter:
    """Counts dropped and total input channels per linear over sparse tokens (measured, not assumed, sparsity)."""

    def __init__(self) -> None:
        self.dropped: dict[str, torch.Tensor] = {}
        self.total: dict[str, int] = {}
        self.params: dict[str, int] = {}

    def add(self, name: str, keep: torch.Tensor, sparse: SparseSpec, n_params: int) -> None:
        if isinstance(sparse, torch.Tensor):
            rows = sparse.reshape(-1)
            kept = keep.reshape(-1, keep.shape[-1])[rows]
        else:
            kept = keep.reshape(-1, keep.shape[-1])
        dropped = kept.numel() - kept.sum()
        self.dropped[name] = self.dropped.get(name, 0) + dropped
        self.total[name] = self.total.get(name, 0) + kept.numel()
        self.params[name] = n_params

    def by_matrix(self) -> dict[str, float]:
        return {n: float(self.dropped[n]) / self.total[n] for n in self.total if self.total[n]}


class SparseLinear(nn.Module):
    """A linear layer with calibrated activation sparsity. Weights in Hugging Face layout [out, in]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, name: str = "") -> None:
        super().__init__()
        self.in_features, self.out_features, self.name = in_features, out_features, name
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        # ||W[:, i]||_2 in fp32, from the checkpoint (computed in float64 by the converter).
        self.register_buffer("col_norm", torch.ones(in_features), persistent=False)
        # Current threshold on the score; <= 0 means dense. Set by the model from the calibration tables.
        self.register_buffer("threshold", torch.zeros(()), persistent=False)
        self.threshold_value = 0.0  # the same, as a Python float: no device sync on the hot path
        self.use_col_norm = True  # WINA scores |x|*||W[:,i]||; TEAL scores |x|.
        self.kernel: Kernel | None = None
        self.meter: SparsityMeter | None = None

    @property
    def score_scale(self) -> torch.Tensor | None:
        return self.col_norm if self.use_col_norm else None

    @property
    def active(self) -> bool:
        return self.threshold_value > 0

    def set_threshold(self, value: float, use_col_norm: bool) -> None:
        self.threshold_value = float(value)
        self.threshold.fill_(self.threshold_value)
        self.use_col_norm = use_col_norm

    def forward(self, x: torch.Tensor, sparse: SparseSpec = None) -> torch.Tensor:
        if sparse is None or sparse is False or not self.active:
            return F.linear(x, self.weight, self.bias)
        if self.kernel is not None and self.meter is None:
            y = self.kernel(self, x, sparse)
            if y is not None:
                return y
        y, keep = reference_sparse_linear(x, self.weight, self.bias, self.threshold, self.score_scale, sparse)
        if self.meter is not None:
            self.meter.add(self.name, keep, sparse, self.weight.numel())
        return y

    def extra_repr(self) -> str:
        return f"{self.name}: in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"
