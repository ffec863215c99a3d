"""Fast sparse paths behind the `SparseLinear` boundary: input-major weights, fused q/k/v and gate/up.

`enable_fast_path(decoder)` (per device):
- stores every sparse linear's weights input-channel-major (`w_t = W.T`, [in, out]) so the weights of one input
  channel are one contiguous row, and installs a `kernel` that reads only the rows of active channels;
- on CUDA, swaps in `FusedSparseLinear` modules for q/k/v and gate/up (one Triton launch for the projections that
  share an input; dense calls of the plain block path keep using the original Hugging Face-layout linears, which
  stay in place);
- on CPU, uses a small C++ op (cpu_kernels.py: threshold test + accumulation of the active rows, threads over the
  output) or, where it cannot be built, `embedding_bag(idx, w_t, per_sample_weights=x[idx], mode='sum')`, with a
  per-shape dense fallback where a quick timing says sparse loses;
- for Llama-like blocks, installs a whole-block decode step (`FusedDecodeStep` on CUDA, `CpuDecodeStep` on CPU)
  that runs a decode token's block in a few fused kernels, dense or sparse.

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

# Largest number of token rows the fast GPU path takes; larger batches run the reference (masked dense matmul), i.e.
# dense. The kernel itself handles B > 1 (it reads the union of the rows' active channels; tested), but with
# independent masks at s = 0.5 that union is ~75 % of the rows at B = 2 and ~94 % at B = 4, and on an H200 the
# kernel then loses to cuBLAS: per Llama-3-8B layer 145.5 vs 119.7 us at B = 2, 144.6 vs 123.7 at B = 4
# (benchmarks/gpu_kernels.py, docs/BENCHMARKS.md, session 5).
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

    def __call__(self, lin: SparseLinear, x: torch.Tensor, sparse: SparseSpec):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] > GPU_MAX_ROWS or not _all_sparse(sparse) or x.dtype != self.w_t.dtype:
            return None
        return self.run(lin, x2).view(*x.shape[:-1], -1)

    def run(self, lin: SparseLinear, x2: torch.Tensor, residual: torch.Tensor | None = None,
            glu: bool = False, dense: bool = False, partial: torch.Tensor | None = None,
            clear: torch.Tensor | None = None) -> torch.Tensor:
        """The sparse GEMV of [1, K] x (or [1, 2K] gate|up with `glu`), optionally plus a residual [1, N];
        `dense`: every channel (the same kernel as the dense side of the decode step). `partial` / `clear`: see
        `sparse_gemv_segments` (the bias is then the reader's to add)."""
        from . import triton_kernels as tk

        scale = lin.col_norm.reshape(1, -1) if lin.use_col_norm else None
        return tk.sparse_gemv_segments(x2, self.w_t, self.thr.get(), (self.w_t.shape[1],), scale,
                                       lin.bias if partial is None else None, residual=residual, glu=glu,
                                       all_rows=dense, partial=partial, clear=clear)


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

    def joint(self, x2: torch.Tensor, sparse: SparseSpec, norm: nn.Module | None = None) -> torch.Tensor:
        """All parts' outputs side by side, [1, sum(sizes)], for a decode row x2 [1, K]: one sparse kernel, or
        (dense) one GEMV over the concatenated input-major weights. With `norm` (an RMSNorm) the input is
        norm(x2): the sparse kernel computes it itself; the dense path runs it first, then cuBLAS (the split-K kernel
        over every row with the norm inside lost in the decode step: q/k/v 17.6 vs 16.9 us per layer on an H200)."""
        y = self._fast(x2, sparse, norm)
        if y is not None:
            return y
        if norm is not None:
            x2 = norm(x2)
        if sparse and any(p.active for p in self._parts):  # sparse, but the kernel declined: the reference parts
            return torch.cat([p(x2, sparse) for p in self._parts], -1)
        if self.bias is None:
            return x2 @ self.w_t
        return torch.addmm(self.bias, x2, self.w_t)

    def takes(self, x: torch.Tensor, sparse: SparseSpec) -> bool:
        """Whether the sparse kernel answers this call (else the parts run it)."""
        from . import triton_kernels as tk

        if sparse is None or sparse is False or not any(p.active for p in self._parts):
            return False
        if any(p.meter is not None for p in self._parts) or self._scales is False:
            return False
        rows = x.numel() // x.shape[-1]
        return (rows <= GPU_MAX_ROWS and _all_sparse(sparse) and x.dtype == self.w_t.dtype
                and (x.is_cuda or tk._interpreting()))

    def _fast(self, x: torch.Tensor, sparse: SparseSpec, norm: nn.Module | None = None,
              partial: torch.Tensor | None = None) -> torch.Tensor | None:
        from . import triton_kernels as tk

        if not self.takes(x, sparse):
            return None
        y = tk.sparse_gemv_segments(x.reshape(-1, x.shape[-1]), self.w_t, self.thr.get(), self.sizes, self._scales,
                                    self.bias if partial is None else None,
                                    norm=None if norm is None else (norm.weight, norm.eps), partial=partial)
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


# Longest KV cache the fused GPU decode step takes (its attention splits the context into programs of up to 128
# positions and combines their partials; timed only at ~100 positions so far); longer caches keep SDPA.
FUSED_DECODE_MAX_CACHE = 4096


class _DecodeStep:
    """A whole decoder block for one decode token (batch 1, static KV cache), installed as `Block.decode_step` by
    `enable_fast_path`. It answers None for any other call (prefill, batches, paper-mode masks, metered runs), which
    then takes the block's plain path."""

    def __init__(self, blk: nn.Module) -> None:
        self.blk = blk
        self.linears = tuple(blk.linears().values())

    @staticmethod
    def supports(blk: nn.Module) -> bool:
        """Llama-like blocks: no q/k norms, no residual shortcut rotations, k/v read the whole hidden state."""
        a = blk.attn
        return (a.q_norm is None and blk.attn_shortcut is None and blk.mlp_shortcut is None
                and a.k.weight.shape[1] == a.q.weight.shape[1] == a.v.weight.shape[1])

    def accepts(self, x: torch.Tensor, pos: torch.Tensor, sparse: SparseSpec) -> bool:
        a = self.blk.attn
        return (x.shape[0] == 1 and x.shape[1] == 1 and a.cache is not None and pos.numel() == 1
                and (sparse is None or isinstance(sparse, bool))
                and all(lin.meter is None for lin in self.linears))


class FusedDecodeStep(_DecodeStep):
    """CUDA: the block in five launches when sparse: q/k/v GEMV (its RMSNorm computed in every split-K program), rope +
    cache write + attention, o GEMV + residual, RMSNorm + threshold test + compaction of gate/up's active channels,
    and the rest of the MLP in one (`sparse_mlp`: gate/up over exactly those rows, silu·mul, down over exactly its
    active rows + residual; six launches with `triton_kernels.MLP_FUSED = None`). Dense (seven): RMSNorm + cuBLAS for
    q/k/v and for gate/up, the same attention, o + residual and silu·mul + down + residual through the split-K
    kernel over every row. With `triton_kernels.HAND_OVER`, split-K GEMVs leave their fp32 partial sums to the next
    kernel, which finishes them (`_hands_over`; 1.3-1.5 us less per GEMV, run AT in docs/BENCHMARKS.md)."""

    @staticmethod
    def supports(blk: nn.Module) -> bool:
        hd = blk.attn.head_dim
        return (_DecodeStep.supports(blk) and blk.attn.qkv is not None and blk.mlp.gate_up is not None
                and hd & (hd - 1) == 0)

    def __call__(self, x, cos, sin, pos, sparse: SparseSpec) -> torch.Tensor | None:
        from . import triton_kernels as tk

        blk = self.blk
        a, m = blk.attn, blk.mlp
        if (not self.accepts(x, pos, sparse) or not (x.is_cuda or tk._interpreting())
                or a.cache.k.shape[2] > FUSED_DECODE_MAX_CACHE):
            return None
        sparse = sparse or None
        x1 = x.reshape(1, -1)
        dev, n = x1.device, x1.shape[1]
        hand = tk.HAND_OVER and self._hands_over(x1, sparse)
        if hand:
            p_o = tk.partial_buffer(dev, "o", n)
            p_qkv = tk.partial_buffer(dev, "qkv", sum(a.qkv.sizes)) if sparse else None
        if hand and sparse:  # q/k/v's partial sums, finished by the attention
            q, k, v = a.qkv._fast(x1, sparse, blk.attn_norm, partial=p_qkv).split(a.qkv.sizes, -1)
            bias = None if a.qkv.bias is None else a.qkv.bias.split(a.qkv.sizes)
            y = self.attention(q, k, v, cos, sin, pos, partial=True, bias=bias)
        else:
            q, k, v = a.qkv.joint(x1, sparse, norm=blk.attn_norm).split(a.qkv.sizes, -1)
            y = self.attention(q, k, v, cos, sin, pos)
        y = y.view(1, -1)
        if hand:  # o's partial sums, finished by the MLP's compaction launch (sparse) or the RMSNorm (dense)
            o = a.o
            if sparse:
                o.kernel.run(o, y, partial=p_o, clear=p_qkv)
                return _sparse_mlp(m, blk.mlp_norm, x1, sparse, pending=(p_o, o.bias)).view(x.shape)
            o.kernel.run(o, y, dense=True, partial=p_o)
            x1, h = tk.rms_norm(x1, blk.mlp_norm.weight, blk.mlp_norm.eps, pending=(p_o, o.bias))
            return _linear_residual(m.down, m.gate_up.joint(h, None), x1, sparse, glu=True).view(x.shape)
        x1 = _linear_residual(a.o, y, x1, sparse)
        out = _sparse_mlp(m, blk.mlp_norm, x1, sparse)
        if out is None:
            gu = m.gate_up.joint(x1, sparse, norm=blk.mlp_norm)
            out = _linear_residual(m.down, gu, x1, sparse, glu=True)
        return out.view(x.shape)

    def attention(self, q, k, v, cos, sin, pos, **kw) -> torch.Tensor:
        """Rope, cache write and attention of one decode row (`triton_decode.rope_attention`; `partial=True`: q/k/v
        arrive as split-K partial sums). A method, so that `bench.layer_chain` can time the step without it."""
        from . import triton_decode as td

        a = self.blk.attn
        return td.rope_attention(q, k, v, cos, sin, pos, a.cache.k, a.cache.v, a.window, **kw)

    def _hands_over(self, x1: torch.Tensor, sparse: SparseSpec) -> bool:
        """Whether this step's split-K GEMVs hand their fp32 partial sums to the next kernel (`partial=`) instead of
        finishing them: o on the split-K kernel; sparse, also q/k/v on split-K (not the stream kernel) and the MLP in
        two launches (the GPU's defaults). Then sparse, q/k/v's sums go to the attention and o's to the MLP's
        compaction launch; dense, o's to the RMSNorm before gate/up."""
        from . import triton_kernels as tk

        a, m = self.blk.attn, self.blk.mlp
        if not isinstance(a.o.kernel, _GpuKernel):
            return False
        if not sparse:
            return True
        n = x1.shape[1]
        return (a.o.active and a.qkv.takes(x1, sparse)
                and tk.gemv_config(1, n, sum(a.qkv.sizes), a.qkv.sizes, "norm", x1.device).get("algo") != "stream"
                and _mlp_takes(m, x1, sparse)
                and tk.fused_mlp_config(x1, m.gate_up.w_t, m.gate_up.sizes, m.down.kernel.w_t) is not None)


def _mlp_takes(m: nn.Module, x1: torch.Tensor, sparse: SparseSpec) -> bool:
    """Whether `sparse_mlp` may run this MLP: gate/up and down both on sparse GPU kernels, down without bias
    (metered runs never reach a decode step: `accepts`)."""
    down = m.down
    return (down.active and isinstance(down.kernel, _GpuKernel) and down.bias is None
            and m.gate_up.takes(x1, sparse))


def _sparse_mlp(m: nn.Module, norm: nn.Module, x1: torch.Tensor, sparse: SparseSpec,
                pending: tuple | None = None) -> torch.Tensor | None:
    """x1 + down(silu(gate) * up) (norm(x1) in) with gate/up and down both sparse through `sparse_mlp`: down
    streams exactly its active rows, listed by the programs that computed them, instead of testing its channels.
    None where that path does not apply. `pending` = (o's partial sums, o's bias): x1 is then x1 + o's output (two
    launches only)."""
    from . import triton_kernels as tk

    if not _mlp_takes(m, x1, sparse):
        return None
    gu, down = m.gate_up, m.down
    scale = down.col_norm.reshape(-1) if down.use_col_norm else None
    return tk.sparse_mlp(x1, gu.w_t, gu.thr.get(), gu.sizes, gu._scales, gu.bias, (norm.weight, norm.eps),
                         down.kernel.w_t, down.kernel.thr.get(), scale, None if pending else x1, pending=pending)


class CpuDecodeStep(_DecodeStep):
    """CPU, float32: RMSNorm, rope + cache write + attention and silu·mul as one C++ op each (cpu_kernels.py), the
    seven linears through their `SparseLinear` (the C++ sparse matvec when sparse, MKL when dense): about 13 calls
    per block instead of ~40 torch ops (counted from the code), whose dispatch cost dense and sparse runs share."""

    def __init__(self, blk: nn.Module, ops) -> None:
        super().__init__(blk)
        self.ops = ops

    def __call__(self, x, cos, sin, pos, sparse: SparseSpec) -> torch.Tensor | None:
        blk = self.blk
        a, m = blk.attn, blk.mlp
        if not self.accepts(x, pos, sparse) or x.dtype != torch.float32 or x.is_cuda:
            return None
        sparse = sparse or None
        ops = self.ops
        x1 = x.reshape(-1)
        h = ops.rms_norm(x1, blk.attn_norm.weight, blk.attn_norm.eps)
        y = ops.rope_attention(a.q(h, sparse), a.k(h, sparse), a.v(h, sparse), cos, sin, pos, a.cache.k,
                               a.cache.v, a.window or 0)
        x1 = x1 + a.o(y, sparse)
        h = ops.rms_norm(x1, blk.mlp_norm.weight, blk.mlp_norm.eps)
        x1 = x1 + m.down(ops.glu(m.gate(h, sparse), m.up(h, sparse)), sparse)
        return x1.view(x.shape)


def _linear_residual(lin: SparseLinear, x2: torch.Tensor, residual: torch.Tensor, sparse: SparseSpec,
                     glu: bool = False) -> torch.Tensor:
    """residual + lin(x2) for one decode row (x2 = [gate | up] with `glu`): the Triton split-K kernel with both
    fused, sparse or (dense) over every row; cuBLAS where there is no kernel. (cuBLAS addmm costs a copy of the
    residual and a split-K reduction launch, and silu·mul a launch of its own: 3.4 + 4.2 + 2.2 us per layer at the
    8B shape on an H200, benchmarks/gpu_profile.py, 2026-11-29.)"""
    if isinstance(lin.kernel, _GpuKernel):
        return lin.kernel.run(lin, x2, residual=residual, glu=glu, dense=not (sparse and lin.active))
    if glu:
        from . import triton_decode as td

        x2 = td.glu(x2).view(1, -1)
    if sparse and lin.active:  # no kernel for this one: the reference path
        return residual + lin(x2, sparse)
    if lin.bias is not None:
        return residual + F.linear(x2, lin.weight, lin.bias)
    return torch.addmm(residual, x2, lin.weight.t())


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
    kern.use_sparse = True
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
                     backend: str | None = None, decode_step: bool = True) -> dict:
    """Install the fast sparse paths on `decoder` (a `runtime.model.Decoder`, or anything with `.blocks`).

    `backend`: 'triton' (default on CUDA; on CPU only under TRITON_INTERPRET=1, for tests) or 'cpu' (default on CPU).
    `decode_step`: also run whole blocks of decode steps through `FusedDecodeStep` (CUDA) or `CpuDecodeStep` (CPU,
    float32), for Llama-like blocks.
    Returns a summary {'device', 'fused', 'sparse_kernels', 'dense_fallback', 'decode_steps', 'cpu_choice'}. After
    `set_sparsity`, `refresh_fast_path` updates what depends on thresholds and method; call this again after moving
    the model to another device.
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
    summary["decode_steps"] = 0
    for blk in decoder.blocks:
        a, m = blk.attn, blk.mlp
        if fuse and a.k.weight.shape[1] == a.q.weight.shape[1] == a.v.weight.shape[1]:
            a.qkv = FusedSparseLinear([a.q, a.k, a.v])
            m.gate_up = FusedSparseLinear([m.gate, m.up])
            summary["fused"] += 2
            singles = [a.o, m.down]
            if cuda and decode_step and FusedDecodeStep.supports(blk):
                blk.decode_step = FusedDecodeStep(blk)
                summary["decode_steps"] += 1
        else:
            singles = [a.q, a.k, a.v, a.o, m.gate, m.up, m.down]
            cpu_ops = cpu_kernels.load() if not cuda and decode_step else None
            if cpu_ops is not None and blk.attn.q.weight.dtype == torch.float32 and CpuDecodeStep.supports(blk):
                blk.decode_step = CpuDecodeStep(blk, cpu_ops)
                summary["decode_steps"] += 1
        for lin in singles:
            if cuda:
                lin.kernel = _GpuKernel(lin)
                summary["sparse_kernels"] += 1
                continue
            lin.kernel = _CpuKernel(lin)
            if cpu_autotune:
                _choose_cpu_path(lin, shape_choice)
            summary["sparse_kernels" if lin.kernel.use_sparse else "dense_fallback"] += 1
    summary["cpu_choice"] = {f"{k[0]}x{k[1]}": ("sparse" if v else "dense") for k, v in shape_choice.items()}
    return summary


def _choose_cpu_path(lin: SparseLinear, shape_choice: dict[tuple, bool]) -> None:
    """Sparse op or masked dense for this linear's CPU kernel, timed once per shape at the current thresholds."""
    if not lin.active:
        return
    key = (lin.in_features, lin.out_features, lin.weight.dtype)
    if key not in shape_choice:
        shape_choice[key] = _cpu_prefers_sparse(lin, lin.kernel)
    lin.kernel.use_sparse = shape_choice[key]


def refresh_fast_path(decoder: nn.Module, cpu_autotune: bool = True) -> None:
    """After `set_sparsity`: recompute what depends on the thresholds and the method — the fused kernels' per-part
    WINA scales (None for TEAL) and the CPU per-shape sparse-or-dense choice — keeping the input-major weights
    (rebuilding those would copy every weight again). Thresholds themselves are read live."""
    shape_choice: dict[tuple, bool] = {}
    for blk in decoder.blocks:
        for fused in (blk.attn.qkv, blk.mlp.gate_up):
            if isinstance(fused, FusedSparseLinear):
                fused._scales = _scales(list(fused.parts))
        for lin in blk.linears().values():
            if isinstance(lin.kernel, _CpuKernel) and cpu_autotune:
                _choose_cpu_path(lin, shape_choice)


def disable_fast_path(decoder: nn.Module) -> None:
    for owner, attr in _norm_owners(decoder):
        norm = getattr(owner, attr)
        if isinstance(norm, FastRMSNorm):
            setattr(owner, attr, norm._orig[0])
    for blk in decoder.blocks:
        blk.attn.qkv = None
        blk.mlp.gate_up = None
        blk.decode_step = None
        for lin in blk.linears().values():
            lin.kernel = None
