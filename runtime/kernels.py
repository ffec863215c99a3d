"""Fast sparse paths behind the `SparseLinear` boundary: input-major weights, fused q/k/v and gate/up.

`enable_fast_path(decoder)` (per device):
- stores every sparse linear's weights input-channel-major (`w_t = W.T`, [in, out]) so the weights of one input
  channel are one contiguous row, and installs a `kernel` that reads only the rows of active channels;
- on CUDA, swaps in `FusedSparseLinear` modules for q/k/v and gate/up (one Triton launch for the projections that
  share an input; dense runs keep using the original Hugging Face-layout linears, which stay in place);
- on CPU, uses a small C++ op (cpu_kernels.py: threshold test + accumulation of the active rows, threads over the
  output) or, where it cannot be built, `embedding_bag(idx, w_t, per_sample_weights=x[idx], mode='sum')`, with a
  per-shape dense fallback where a quick timing says sparse loses.

Every fast path computes what `reference_sparse_linear` specifies (same mask: fp32 score >= threshold); it only
answers for decode-shaped calls (one or a few token rows, all sparse) and returns None otherwise, so the reference
path runs. `disable_fast_path` undoes everything.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .cpu_kernels import NONE
from .sparse import SparseLinear, SparseSpec

# Largest number of token rows the GPU kernel takes; above it the union of active rows nears dense (see
# docs/BENCHMARKS.md: batch 2/4 sparse loses to dense), so the reference (masked dense matmul) runs.
GPU_MAX_ROWS = 1


def _all_sparse(sparse: SparseSpec) -> bool:
    if sparse is True:
        return True
    if isinstance(sparse, torch.Tensor):
        return bool(sparse.all())  # paper mode only; decode passes True
    return False


class _Thresholds:
    """fp32 device tensor of the thresholds of several linears, refreshed when their Python values change."""

    def __init__(self, parts: list[SparseLinear], device) -> None:
        self.parts = parts
        self.key: tuple | None = None
        self.t = torch.zeros(len(parts), dtype=torch.float32, device=device)

    def get(self) -> torch.Tensor:
        key = tuple(max(p.threshold_value, 0.0) for p in self.parts)
        if key != self.key:
            self.t.copy_(torch.tensor(key, dtype=torch.float32))
            self.key = key
        return self.t


def _scales(parts: list[SparseLinear]) -> torch.Tensor | None | bool:
    """[nseg, K] fp32 WINA scales, None for TEAL, False when the parts disagree."""
    modes = {p.use_col_norm for p in parts}
    if len(modes) > 1:
        return False
    if not modes.pop():
        return None
    return torch.stack([p.col_norm.float() for p in parts]).contiguous()


class _GpuKernel:
    """`SparseLinear.kernel` on CUDA: Triton threshold-sparse GEMV over input-major weights."""

    def __init__(self, lin: SparseLinear) -> None:
        self.w_t = lin.weight.detach().t().contiguous()
        self.thr = _Thresholds([lin], lin.weight.device)
        self.scale_cache: tuple | None = None

    def __call__(self, lin: SparseLinear, x: torch.Tensor, sparse: SparseSpec):
        from . import triton_kernels as tk

        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] > GPU_MAX_ROWS or not _all_sparse(sparse) or x.dtype != self.w_t.dtype:
            return None
        scale = lin.col_norm.reshape(1, -1) if lin.use_col_norm else None
        y = tk.sparse_gemv_segments(x2, self.w_t, self.thr.get(), (self.w_t.shape[1],), scale, lin.bias)
        return y.view(*x.shape[:-1], -1)


class _CpuKernel:
    """`SparseLinear.kernel` on CPU for one token: the C++ `sparse_matvec` (cpu_kernels.py) over input-major weights,
    or, where it cannot be built or for fp16/bf16, embedding_bag over the active rows."""

    def __init__(self, lin: SparseLinear, use_sparse: bool = True) -> None:
        self.w_t = lin.weight.detach().t().contiguous()
        self.use_sparse = use_sparse
        self.native = cpu_kernels.load() if lin.weight.dtype == torch.float32 else None

    def __call__(self, lin: SparseLinear, x: torch.Tensor, sparse: SparseSpec):
        if not self.use_sparse or x.numel() != x.shape[-1] or not _all_sparse(sparse):
            return None
        xf = x.reshape(-1)
        if self.native is not None and xf.is_contiguous():
            scale = lin.col_norm if lin.use_col_norm else NONE
            bias = NONE if lin.bias is None else lin.bias
            return self.native.sparse_matvec(xf, self.w_t, scale, lin.threshold_value, bias).view(*x.shape[:-1], -1)
        score = xf.float().abs()
        if lin.use_col_norm:
            score = score * lin.col_norm
        idx = torch.nonzero(score >= lin.threshold_value).view(1, -1)
        y = F.embedding_bag(idx, self.w_t, per_sample_weights=xf[idx.view(-1)].view(1, -1), mode="sum")
        if lin.bias is not None:
            y = y + lin.bias
        return y.view(*x.shape[:-1], -1)


class FusedSparseLinear(nn.Module):
    """Sparse linears that read the same input (q/k/v, gate/up) as one input-major matrix and one kernel launch.

    `forward(x, sparse)` returns one output per part. Dense calls, calls the kernel declines and metered calls run
    the parts themselves (the original `SparseLinear`s, kept unchanged), so results never depend on the swap.
    """

    def __init__(self, parts: list[SparseLinear]) -> None:
        super().__init__()
        self._parts = tuple(parts)  # plain tuple: not registered twice as submodules
        w = parts[0].weight
        self.sizes = tuple(p.out_features for p in parts)
        self.register_buffer("w_t", torch.cat([p.weight.detach().t() for p in parts], 1).contiguous(), persistent=False)
        has_bias = [p.bias is not None for p in parts]
        bias = None
        if any(has_bias):
            bias = torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features, dtype=w.dtype, device=w.device)
                              for p in parts])
        self.register_buffer("bias", bias, persistent=False)
        self.thr = _Thresholds(list(parts), w.device)
        self._scales = _scales(list(parts))

    @property
    def parts(self) -> tuple[SparseLinear, ...]:
        return self._parts

    def forward(self, x: torch.Tensor, sparse: SparseSpec = None) -> tuple[torch.Tensor, ...]:
        y = self._fast(x, sparse)
        if y is None:
            return tuple(p(x, sparse) for p in self._parts)
        return y.split(self.sizes, -1)

    def _fast(self, x: torch.Tensor, sparse: SparseSpec) -> torch.Tensor | None:
        from . import triton_kernels as tk

        if sparse is None or sparse is False or not any(p.active for p in self._parts):
            return None
        if any(p.meter is not None for p in self._parts) or self._scales is False:
            return None
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] > GPU_MAX_ROWS or not _all_sparse(sparse) or x.dtype != self.w_t.dtype or not (x.is_cuda or tk._interpreting()):
            return None
        y = tk.sparse_gemv_segments(x2, self.w_t, self.thr.get(), self.sizes, self._scales, self.bias)
        return y.view(*x.shape[:-1], -1)


class FastRMSNorm(nn.Module):
    """`RMSNorm` in one Triton launch (same numerics); swapped in on CUDA to cut per-token kernel count."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps
        self._orig = (norm,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import triton_kernels as tk

        return tk.rms_norm(x, self.weight, self.eps)


def _norm_owners(decoder: nn.Module):
    for blk in decoder.blocks:
        yield blk, "attn_norm"
        yield blk, "mlp_norm"
    yield decoder, "norm"


def _time(fn, reps: int = 15) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / reps


def _cpu_prefers_sparse(lin: SparseLinear, kern: _CpuKernel) -> bool:
    """Time one token through the sparse path and the reference (masked dense) path; keep the faster."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, lin.in_features, generator=g).to(lin.weight.dtype)
    if lin.use_col_norm:  # put the activations where the threshold keeps about the calibrated fraction
        x = x / lin.col_norm.clamp_min(1e-6) * max(lin.threshold_value, 1e-6) * 1.5
    saved, lin.kernel = lin.kernel, kern
    try:
        with torch.no_grad():
            ts = _time(lambda: lin(x, True))
            lin.kernel = None
            td = _time(lambda: lin(x, True))
            lin.kernel = kern
            ts = min(ts, _time(lambda: lin(x, True)))
    finally:
        lin.kernel = saved
    return ts < td


def enable_fast_path(decoder: nn.Module, fuse: bool | None = None, cpu_autotune: bool = True,
                     backend: str | None = None) -> dict:
    """Install the fast sparse paths on `decoder` (a `runtime.model.Decoder`, or anything with `.blocks`).

    `backend`: 'triton' (default on CUDA; on CPU only under TRITON_INTERPRET=1, for tests) or 'cpu' (default on CPU).
    Returns a summary {'device', 'fused', 'sparse_kernels', 'dense_fallback'}. Safe to call again after
    `set_sparsity` (thresholds are read live); call again after moving the model to another device.
    """
    disable_fast_path(decoder)
    dev = next(decoder.parameters()).device
    cuda = (dev.type == "cuda") if backend is None else backend == "triton"
    fuse = cuda if fuse is None else fuse
    summary = {"device": str(dev), "fused": 0, "sparse_kernels": 0, "dense_fallback": 0}
    if cuda:
        from . import triton_kernels as tk

        if not tk.HAVE_TRITON:
            return summary
    shape_choice: dict[tuple, bool] = {}
    if cuda and fuse:
        for owner, attr in _norm_owners(decoder):
            setattr(owner, attr, FastRMSNorm(getattr(owner, attr)))
    for blk in decoder.blocks:
        a, m = blk.attn, blk.mlp
        if fuse and a.k.weight.shape[1] == a.q.weight.shape[1] == a.v.weight.shape[1]:
            a.qkv = FusedSparseLinear([a.q, a.k, a.v])
            m.gate_up = FusedSparseLinear([m.gate, m.up])
            summary["fused"] += 2
            singles = [a.o, m.down]
        else:
            singles = [a.q, a.k, a.v, a.o, m.gate, m.up, m.down]
        for lin in singles:
            if cuda:
                lin.kernel = _GpuKernel(lin)
                summary["sparse_kernels"] += 1
                continue
            kern = _CpuKernel(lin)
            key = (lin.in_features, lin.out_features, lin.weight.dtype)
            if cpu_autotune and lin.active:
                if key not in shape_choice:
                    shape_choice[key] = _cpu_prefers_sparse(lin, kern)
                kern.use_sparse = shape_choice[key]
            lin.kernel = kern
            summary["sparse_kernels" if kern.use_sparse else "dense_fallback"] += 1
    summary["cpu_choice"] = {f"{k[0]}x{k[1]}": ("sparse" if v else "dense") for k, v in shape_choice.items()}
    return summary


def disable_fast_path(decoder: nn.Module) -> None:
    for owner, attr in _norm_owners(decoder):
        norm = getattr(owner, attr)
        if isinstance(norm, FastRMSNorm):
            setattr(owner, attr, norm._orig[0])
    for blk in decoder.blocks:
        blk.attn.qkv = None
        blk.mlp.gate_up = None
        for lin in blk.linears().values():
            lin.kernel = None
