"""Triton kernels for threshold-sparse GEMV (WINA / TEAL activation sparsity).

Math (per batch row b, per output column n)::

    keep[b, i] = |x[b, i]| * scale[i] >= threshold        (scale == 1 for TEAL)
    y[b, n]    = sum_i keep[b, i] * x[b, i] * W_t[i, n]  (+ bias[n])

which is exactly ``torch.where(x.abs() * scale >= t, x, 0) @ w_t (+ bias)``, including
torch's type-promotion rules for the comparison (with ``scale`` the test runs in fp32;
without it, the threshold is rounded to ``x.dtype`` first, as torch does).

Weights are stored input-channel-major (``w_t = W.T.contiguous()``, shape ``[K, N]``), so
the weights of one input channel are one contiguous row of ``N`` elements. Each program
of the kernel owns a tile of ``BLOCK_N`` output columns and a slice of ``K`` (split-K); it
evaluates the threshold test for its input channels and issues the load of a weight row
only when the channel is active (for B > 1: active in any batch row), so inactive rows
cost no memory traffic. A warp reads ``BLOCK_N`` contiguous elements of an active row
(coalesced, 16-byte vectors). Accumulation is fp32. The split-K partial sums are reduced
in one launch: every program atomically adds its partial into an fp32 workspace, bumps a
per-column-block counter, and the last program of a column block reads the workspace
(atomically, from L2), zeroes it, adds the bias and writes the output in ``x.dtype``.
The workspace and counters are cached per (device, B, N) and are left zeroed after every
launch, so the kernel is CUDA-graph safe. Caveat: two launches with the same (device, B,
N) must not run concurrently on different streams.

For the decode step (runtime/kernels.py `FusedDecodeStep`) the split-K kernel can also compute its input as
``silu(gate) * up`` from the gate/up GEMV's output (``glu=True``) or as the block's RMSNorm of it (``norm=``; the
stream kernel's compaction launch does the same), add the block's residual in its epilogue (``residual=``), and run
dense over every row (``all_rows=True``, the dense side of the decode step). Every kernel here is launched with
programmatic dependent launch on Hopper (`pdl_args`) and loads what no earlier kernel of the step writes before it
waits for the previous one.
Very wide problems (the fused gate/up) default to a two-phase kernel: compact the active channels, then stream
exactly their rows (`_stream_gemv`). `sparse_mlp` runs a decode row's whole MLP after one compaction launch in one
more (`_mlp_kernel`: each program owns some intermediate channels, so it finishes their gate/up sums itself and
streams their active rows of down without waiting for other programs), or chains two stream launches (gate/up's
last programs compute silu·mul and list down's active channels; down streams exactly those rows).

The module imports without triton or a GPU (``HAVE_TRITON`` tells). On CPU it runs under
``TRITON_INTERPRET=1`` (set before triton is imported), which the tests use.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover
    triton = None
    tl = None
    HAVE_TRITON = False

__all__ = [
    "HAVE_TRITON",
    "sparse_gemv",
    "sparse_gemv_segments",
    "sparse_mlp",
    "reference_sparse_gemv",
    "reference_sparse_gemv_segments",
    "pick_config",
    "split_k_config",
    "dense_config",
    "set_tuned",
]


# --------------------------------------------------------------------------------------
# Reference (pure torch) implementations: the semantics the kernels must match.
# --------------------------------------------------------------------------------------
def reference_sparse_gemv(x, w_t, threshold, scale=None, bias=None):
    s = 1.0 if scale is None else scale
    xm = torch.where(x.abs() * s >= threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))
    y = xm @ w_t
    if bias is not None:
        y = y + bias
    return y


def reference_sparse_gemv_segments(x, w_t, thresholds, seg_sizes, scales=None, bias=None):
    outs = []
    start = 0
    for j, n in enumerate(seg_sizes):
        outs.append(
            reference_sparse_gemv(
                x,
                w_t[:, start : start + n],
                thresholds[j],
                None if scales is None else scales[j],
                None if bias is None else bias[start : start + n],
            )
        )
        start += n
    return torch.cat(outs, dim=-1)


# --------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------
if HAVE_TRITON:

    @triton.jit
    def _pdl_launch(USE_PDL: tl.constexpr):
        """Programmatic dependent launch (Hopper): let the next kernel's programs be scheduled now; they wait in
        `_pdl_wait` until this whole grid has finished, so consecutive decode kernels do not pay a full launch gap."""
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _pdl_wait(USE_PDL: tl.constexpr):
        """Wait until the previous kernel has finished and its writes are visible. Before this, a kernel may read
        only what no kernel of the current decode step writes (weights, thresholds, scales, segment maps; the
        attention's position and older cache rows, written by earlier steps)."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _pdl_start(USE_PDL: tl.constexpr):
        _pdl_wait(USE_PDL)
        _pdl_launch(USE_PDL)

    @triton.jit
    def _glu(g, u, dtype):
        """silu(g) * u with torch's roundings: silu in fp32 rounded to x.dtype, then the product rounded."""
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(dtype).to(tl.float32)
        return (s * u.to(tl.float32)).to(dtype)

    @triton.jit
    def _round_thr(t, x_ptr, HAS_SCALE: tl.constexpr):
        """The threshold as torch compares it: without scales, |x| (x.dtype) against the threshold rounded to
        x.dtype (bf16: explicit round-to-nearest-even, which the CPU interpreter's casts would truncate)."""
        if not HAS_SCALE:
            if x_ptr.dtype.element_ty == tl.bfloat16:
                bits = t.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                t = bits.to(tl.float32, bitcast=True)
            else:
                t = t.to(x_ptr.dtype.element_ty).to(tl.float32)
        return t

    @triton.jit
    def _inv_rms(xf, D, eps):
        """1 / sqrt(mean(x^2) + eps) of a whole fp32 row (runtime.model.RMSNorm's statistics)."""
        return 1.0 / tl.sqrt_rn(tl.sum(xf * xf, 0) / D + eps)

    @triton.jit
    def _normed(xf, gw, r, dt):
        """RMSNorm's output with its roundings: x * r rounded to dt, times the gain, rounded to dt."""
        return (gw * (xf * r).to(dt).to(tl.float32)).to(dt)

    @triton.jit
    def _load_x1(x_ptr, scale_ptr, seg, K, offs_k, k_hi, HAS_SCALE: tl.constexpr, GLU: tl.constexpr, norm_ptr, r,
                 HAS_NORM: tl.constexpr):
        k_in = offs_k < k_hi
        if GLU:  # x is [gate | up] (2K values): the input is silu(gate) * up, never written to memory
            g = tl.load(x_ptr + offs_k, mask=k_in, other=0.0)
            u = tl.load(x_ptr + K + offs_k, mask=k_in, other=0.0)
            xr = _glu(g, u, x_ptr.dtype.element_ty)
        else:
            xr = tl.load(x_ptr + offs_k, mask=k_in, other=0.0)
        if HAS_NORM:  # RMSNorm(x) (r: 1 / rms of the whole row)
            gw = tl.load(norm_ptr + offs_k, mask=k_in, other=0.0).to(tl.float32)
            xr = _normed(xr.to(tl.float32), gw, r, x_ptr.dtype.element_ty)
        if HAS_SCALE:
            sr = tl.load(scale_ptr + seg * K + offs_k, mask=k_in, other=0.0)
        else:
            sr = xr
        return xr, sr

    @triton.jit
    def _act1(xr, sr, t, offs_k, k_hi, HAS_SCALE: tl.constexpr, ALL_ROWS: tl.constexpr = False):
        xv = xr.to(tl.float32)
        if ALL_ROWS:  # dense: every channel, no threshold test
            act = offs_k >= 0
        elif HAS_SCALE:
            act = tl.abs(xv) * sr >= t
        else:
            act = tl.abs(xv) >= t
        act = act & (offs_k < k_hi)
        return tl.where(act, xv, 0.0), act

    @triton.jit
    def _load_w(w_cols, offs_k, stride_wk, act, n_in, EVEN_N: tl.constexpr, EVICT: tl.constexpr):
        if EVEN_N:
            m = act[:, None]
        else:
            m = act[:, None] & n_in[None, :]
        if EVICT:
            return tl.load(w_cols + offs_k[:, None] * stride_wk, mask=m, other=0.0, eviction_policy="evict_first")
        else:
            return tl.load(w_cols + offs_k[:, None] * stride_wk, mask=m, other=0.0)

    @triton.jit
    def _residual(y, ptrs, mask, dtype, HAS_RES: tl.constexpr):
        """y + residual (at `ptrs`) as torch computes `res + linear(x)`: y rounded to the output dtype first."""
        if HAS_RES:
            r = tl.load(ptrs, mask=mask, other=0.0)
            y = y.to(dtype).to(tl.float32) + r.to(tl.float32)
        return y

    @triton.jit
    def _pending(x_ptr, p_ptr, pb_ptr, offs, m, HAS_PB: tl.constexpr):
        """x + a linear's output handed over as fp32 partial sums (`partial=`): the sums (+ bias) rounded to x.dtype,
        then added, as the split-K epilogue's `_residual` computes `x + linear(h)`. In x.dtype."""
        y = tl.load(p_ptr + offs, mask=m, other=0.0)
        if HAS_PB:
            y += tl.load(pb_ptr + offs, mask=m, other=0.0).to(tl.float32)
        return _residual(y, x_ptr + offs, m, x_ptr.dtype.element_ty, True).to(x_ptr.dtype.element_ty)

    @triton.jit
    def _clear(ptr, n, pid, BLOCK: tl.constexpr):
        """Zero slots [pid * BLOCK, pid * BLOCK + BLOCK) of n: a partial-sum buffer whose readers all ran in the
        previous kernel, left zeroed for its next writer."""
        if BLOCK > 0:
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            tl.store(ptr + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=offs < n)

    @triton.jit
    def _column_block(blkseg_ptr, N, BLOCK_N: tl.constexpr, NSEG: tl.constexpr):
        """This program's column block (grid axis 0): its index, columns, their in-bounds mask and its segment."""
        pid_n = tl.program_id(0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_in = offs_n < N
        if NSEG > 1:
            seg = tl.load(blkseg_ptr + pid_n)
        else:
            seg = 0
        return pid_n, offs_n, n_in, seg

    @triton.jit
    def _sparse_gemv_kernel(
        x_ptr,  # [B, K], row stride stride_xb, unit column stride
        w_ptr,  # [K, N], row stride stride_wk, unit column stride
        thr_ptr,  # [NSEG] fp32
        scale_ptr,  # [NSEG, K] fp32 (contiguous) or dummy
        bias_ptr,  # [N] or dummy
        res_ptr,  # [B, N] residual added to the output (row stride stride_ob), or dummy
        blkseg_ptr,  # [cdiv(N, BLOCK_N)] int32 segment of each column block, or dummy
        out_ptr,  # [B, N], row stride stride_ob
        ws_ptr,  # [B, N] fp32 workspace (zeroed), used when SPLIT_K > 1
        cnt_ptr,  # [cdiv(N, BLOCK_N)] int32 counters (zeroed), used when SPLIT_K > 1
        B,
        K,
        N,
        stride_xb,
        stride_wk,
        stride_ob,
        K_PER_SPLIT,  # multiple of BLOCK_K
        SPLIT_K: tl.constexpr,  # True when the K dimension is split over programs
        NSEG: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_B: tl.constexpr,  # 1 -> elementwise path; >= 16 -> tl.dot path
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT_IEEE: tl.constexpr,
        PREFETCH: tl.constexpr,
        EVEN_N: tl.constexpr,
        USE_DOT: tl.constexpr,
        EVICT: tl.constexpr,
        HAS_RES: tl.constexpr = False,
        GLU: tl.constexpr = False,
        ALL_ROWS: tl.constexpr = False,
        norm_ptr=None,  # [K] RMSNorm weight when HAS_NORM
        eps=0.0,
        HAS_NORM: tl.constexpr = False,
        BLOCK_ROW: tl.constexpr = 16,  # next power of two >= K (HAS_NORM)
        USE_PDL: tl.constexpr = False,
        PARTIAL: tl.constexpr = False,  # hand the fp32 partial sums over in ws_ptr: no epilogue (see `partial=`)
        clear_ptr=None,  # [CLEAR_N] fp32 zeroed after the wait (CLEAR_BLOCK slots per program), or None
        CLEAR_N=0,
        CLEAR_BLOCK: tl.constexpr = 0,
        EARLY: tl.constexpr = False,  # batch 1: the first step's weight rows loaded before the PDL wait, all of them
    ):
        _pdl_launch(USE_PDL)
        pid_n, offs_n, n_in, seg = _column_block(blkseg_ptr, N, BLOCK_N, NSEG)
        pid_k = tl.program_id(1)
        t = _round_thr(tl.load(thr_ptr + seg).to(tl.float32), x_ptr, HAS_SCALE)
        k_lo = pid_k * K_PER_SPLIT
        w_cols = w_ptr + offs_n[None, :]
        if EARLY:  # weights are static: read while the previous kernel ends; inactive rows then meet x = 0
            offs_k0 = k_lo + tl.arange(0, BLOCK_K)
            w0 = _load_w(w_cols, offs_k0, stride_wk, offs_k0 < tl.minimum(k_lo + K_PER_SPLIT, K), n_in, EVEN_N,
                         EVICT)
        _pdl_wait(USE_PDL)  # the segment map and threshold above are static: their loads overlap the previous kernel
        _clear(clear_ptr, CLEAR_N, pid_n * tl.num_programs(1) + pid_k, CLEAR_BLOCK)
        r = 1.0
        if HAS_NORM:  # every program needs 1 / rms of the whole row (8 KB from L2 at 4096 wide): no norm launch
            row = tl.arange(0, BLOCK_ROW)
            r = _inv_rms(tl.load(x_ptr + row, mask=row < K, other=0.0).to(tl.float32), K, eps)

        if BLOCK_B == 1:
            k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
            acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
            if PREFETCH:
                # software pipeline: the weight tile of step i+1 and the x/scale of step
                # i+2 are in flight while step i is accumulated.
                offs_k = k_lo + tl.arange(0, BLOCK_K)
                xr, sr = _load_x1(x_ptr, scale_ptr, seg, K, offs_k, k_hi, HAS_SCALE, GLU, norm_ptr, r, HAS_NORM)
                xm, act = _act1(xr, sr, t, offs_k, k_hi, HAS_SCALE, ALL_ROWS)
                if EARLY:
                    w = w0
                else:
                    w = _load_w(w_cols, offs_k, stride_wk, act, n_in, EVEN_N, EVICT)
                offs_k += BLOCK_K
                xr, sr = _load_x1(x_ptr, scale_ptr, seg, K, offs_k, k_hi, HAS_SCALE, GLU, norm_ptr, r, HAS_NORM)
                for kk in range(0, K_PER_SPLIT, BLOCK_K):
                    xm1, act1 = _act1(xr, sr, t, offs_k, k_hi, HAS_SCALE, ALL_ROWS)
                    w1 = _load_w(w_cols, offs_k, stride_wk, act1, n_in, EVEN_N, EVICT)
                    xr, sr = _load_x1(x_ptr, scale_ptr, seg, K, offs_k + BLOCK_K, k_hi, HAS_SCALE, GLU, norm_ptr, r,
                                      HAS_NORM)
                    acc += xm[:, None] * w.to(tl.float32)
                    xm = xm1
                    w = w1
                    offs_k += BLOCK_K
            else:
                k0 = 0
                if EARLY:
                    offs_k = k_lo + tl.arange(0, BLOCK_K)
                    xr, sr = _load_x1(x_ptr, scale_ptr, seg, K, offs_k, k_hi, HAS_SCALE, GLU, norm_ptr, r, HAS_NORM)
                    xm, act = _act1(xr, sr, t, offs_k, k_hi, HAS_SCALE, ALL_ROWS)
                    acc += xm[:, None] * w0.to(tl.float32)
                    k0 = BLOCK_K
                for kk in range(k0, K_PER_SPLIT, BLOCK_K):
                    offs_k = k_lo + kk + tl.arange(0, BLOCK_K)
                    xr, sr = _load_x1(x_ptr, scale_ptr, seg, K, offs_k, k_hi, HAS_SCALE, GLU, norm_ptr, r, HAS_NORM)
                    xm, act = _act1(xr, sr, t, offs_k, k_hi, HAS_SCALE, ALL_ROWS)
                    w = _load_w(w_cols, offs_k, stride_wk, act, n_in, EVEN_N, EVICT)
                    acc += xm[:, None] * w.to(tl.float32)
            res = tl.sum(acc, axis=0)[None, :]  # [1, BLOCK_N]
        else:
            offs_b = tl.arange(0, BLOCK_B)
            b_in = offs_b < B
            acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
            for kk in range(0, K_PER_SPLIT, BLOCK_K):
                offs_k = k_lo + kk + tl.arange(0, BLOCK_K)
                k_in = offs_k < K
                xb = tl.load(
                    x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :],
                    mask=b_in[:, None] & k_in[None, :],
                    other=0.0,
                )
                xf = xb.to(tl.float32)
                if HAS_SCALE:
                    sv = tl.load(scale_ptr + seg * K + offs_k, mask=k_in, other=0.0)
                    act2 = tl.abs(xf) * sv[None, :] >= t
                else:
                    act2 = tl.abs(xf) >= t
                act2 = act2 & b_in[:, None] & k_in[None, :]
                union = tl.max(act2.to(tl.int32), axis=0) > 0
                w = tl.load(
                    w_cols + offs_k[:, None] * stride_wk,
                    mask=union[:, None] & n_in[None, :],
                    other=0.0,
                )
                if not USE_DOT:
                    xm = tl.where(act2, xf, 0.0)
                    acc += tl.sum(xm[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
                elif DOT_IEEE:
                    # fp32 inputs, or the CPU interpreter (its bf16/fp16 dot is broken)
                    xm = tl.where(act2, xf, 0.0)
                    acc += tl.dot(xm, w.to(tl.float32), input_precision="ieee")
                else:
                    xm = tl.where(act2, xf, 0.0).to(w.dtype)
                    acc += tl.dot(xm, w)
            res = acc

        rows = tl.arange(0, BLOCK_B)
        r_in = rows < B
        o_mask = r_in[:, None] & n_in[None, :]
        if not SPLIT_K:
            if HAS_BIAS:
                res += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
            res = _residual(res, res_ptr + rows[:, None] * stride_ob + offs_n[None, :], o_mask,
                            out_ptr.dtype.element_ty, HAS_RES)
            tl.store(
                out_ptr + rows[:, None] * stride_ob + offs_n[None, :],
                res.to(out_ptr.dtype.element_ty),
                mask=o_mask,
            )
        else:
            ws = ws_ptr + rows[:, None] * N + offs_n[None, :]
            tl.atomic_add(ws, res, mask=o_mask, sem="relaxed")
            if PARTIAL:  # the consumer finishes the sums (`_pending`): no arrival counter, no last program
                return
            tl.debug_barrier()
            cnt = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if cnt == tl.num_programs(1) - 1:
                zero = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
                # read the sums from L2 (atomic: sees every program's adds), then re-zero
                tot = tl.atomic_add(ws, zero, mask=o_mask, sem="relaxed")
                tl.store(ws, zero, mask=o_mask)
                if HAS_BIAS:
                    tot += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
                tot = _residual(tot, res_ptr + rows[:, None] * stride_ob + offs_n[None, :], o_mask,
                                out_ptr.dtype.element_ty, HAS_RES)
                tl.store(
                    out_ptr + rows[:, None] * stride_ob + offs_n[None, :],
                    tot.to(out_ptr.dtype.element_ty),
                    mask=o_mask,
                )
                tl.atomic_xchg(cnt_ptr + pid_n, 0)


# --------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------
def pick_config(B: int, K: int, N: int, seg_sizes: Optional[Sequence[int]] = None, device=None) -> dict:
    """Launch config for a [B, K] x [K, N] problem (bf16 H200 tuning, see
    benchmarks/gpu_explore.py). Returns the two-phase stream kernel's config (algo="stream") for very wide
    batch-1 problems, else `split_k_config`'s. block_n is later reduced, if needed, so that it divides every
    segment boundary."""
    if B == 1 and N >= 16384 and (device is None or device.type == "cuda"):
        # Very wide (fused gate_up 4096 -> 28672): the two-phase stream kernel over wide column blocks with
        # two rows per step won the sweep (benchmarks/gpu_explore.py, 2026-11-28: 36.3 us vs 42.2 us).
        nblk = -(-N // 2048)
        return dict(algo="stream", block_n=2048, rows=2, split=max(1, 528 // nblk), num_warps=8,
                    num_stages=2, prefetch=True)
    return split_k_config(B, K, N)


def gemv_config(B: int, K: int, N: int, seg_sizes: Sequence[int], variant: str, device=None) -> dict:
    """The config `sparse_gemv_segments` runs a sparse call with by default: a tuned one (`set_tuned`; variant
    "sparse" or "norm"), else `pick_config`'s. algo="stream" means the two-phase kernel (no `partial=`)."""
    return TUNED.get((B, K, N, tuple(seg_sizes), variant)) or pick_config(B, K, N, seg_sizes, device)


def split_k_config(B: int, K: int, N: int) -> dict:
    """Launch config of the one-launch split-K kernel (the masked-row kernel above)."""
    if B == 1:
        # Small tiles (64 cols x 32 rows, one warp) and many programs won: the kernel is
        # bound by load latency (x -> mask -> weight-row load chain), so occupancy matters
        # more than tile size. Split K so the grid has <= ~2048 programs.
        nblk = -(-N // 64)
        kps = 64
        while kps < 512 and nblk * -(-K // kps) > 2048:
            kps *= 2
        if nblk * -(-K // kps) > 2048:  # very wide (e.g. fused gate_up 4096 -> 28672)
            return dict(block_n=256, block_k=16, k_per_split=512, num_warps=2, num_stages=1)
        # hand prefetch paid off at 8 steps per program (q/k/v 4096 -> 6144: 12.3 -> 10.5 us), not at o's 4 (8.5)
        # or down's 16 (22.6) (gpu_suite tune, 2026-11-28)
        return dict(block_n=64, block_k=64 if kps == 64 else 32, k_per_split=kps, num_warps=1, num_stages=1,
                    prefetch=kps == 256)
    kps = 512 if N * K >= 32 * 1024 * 1024 else 256
    return dict(block_n=128, block_k=32, k_per_split=kps, num_warps=4, num_stages=3, use_dot=True)


def dense_config(B: int, K: int, N: int) -> dict:
    """Split-K config for `all_rows` (dense) calls. Every row is read, so short K slices win: at 4096 -> 4096 (o)
    64 x 32 tiles over 128 rows with prefetch, 12.7 us (the sparse default: 19.7); at 14336 -> 4096 (down, silu·mul
    and residual fused) 128 x 16 tiles over 128 rows, 34.4 us (the sparse default: 69.5) (gpu_suite tune, H200,
    bf16, 2026-11-28; cuBLAS without the fusions: 13.4 and 32.1 us)."""
    if B != 1:
        return split_k_config(B, K, N)
    if K > 8192:
        return dict(block_n=128, block_k=16, k_per_split=128, num_warps=1, num_stages=1)
    return dict(block_n=64, block_k=32, k_per_split=128, num_warps=1, num_stages=1, prefetch=True)


def _fix_block_n(block_n: int, N: int, seg_sizes: Optional[Sequence[int]]) -> int:
    block_n = min(block_n, max(16, triton.next_power_of_2(N)))
    if seg_sizes is not None and len(seg_sizes) > 1:
        while block_n > 16 and any(n % block_n for n in seg_sizes[:-1]):
            block_n //= 2
        if any(n % block_n for n in seg_sizes[:-1]):
            raise ValueError(f"segment sizes {tuple(seg_sizes)} must be multiples of 16")
    return block_n


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# `_mlp_kernel`'s trace row (`MLP_TRACE`, diagnostics): SM, 6 timestamps, gate/up list rows, down rows, last program.
MLP_TRACE_SLOTS = 11

# Programmatic dependent launch for the decode kernels (Hopper and newer; WINA_PDL=0 turns it off). Every kernel
# launched with it waits (gdc_wait) before its first memory access, so the order of memory effects is that of
# plain stream order; only the launch gap overlaps the previous kernel's tail.
PDL = os.environ.get("WINA_PDL", "1") not in ("", "0")
_PDL_OK: dict = {}


# Decode kernels launched in stream order instead of early, by role ("qkv": split-K GEMVs with their RMSNorm,
# "gemv": the other split-K GEMVs, "attention", "compact", "mlp": `_mlp_kernel`, "norm": `rms_norm`); they still let
# the next kernel launch early. Chosen by measurement, not by a rule (H200, docs/BENCHMARKS.md session 10, runs
# BH-BJ): the sparse decode step gains from launching its attention (32 programs after the q/k/v GEMV's 1536) and
# its compaction (4 programs after o's 2048) late, +1.0 % and about +0.4 %, dense loses nothing measurable; q/k/v,
# o, down and the dense RMSNorm lose when launched late. The compaction has since moved to TRIGGER_AFTER_WAIT.
PDL_LATE: frozenset = frozenset({"attention"})


# Split-K GEMV roles ("qkv", "gemv", as in PDL_LATE) whose batch-1 programs load their first step's weight rows
# before the PDL wait: all of them, since the threshold test needs x, which the previous kernel writes. The first
# weight read then overlaps the previous kernel's end (launched early) or at least x's read, instead of following
# it. Sparse, that also reads the first step's inactive rows. Same bits: inactive rows are multiplied by x = 0.
# Measured on an H200 (docs/BENCHMARKS.md, session 11, runs BO-BQ): q/k/v, whose early programs wait out the MLP
# kernel's tail, +0.9 % sparse decode (373.9 against 370.4 and 378.1 against 374.6 tok/s, same processes; in the
# profile q/k/v + o 16.11 us per layer against 17.16); "gemv" (o after the attention, dense's o and down) nothing or
# a little less. Only the sparse q/k/v runs the split-K kernel with a norm.
EARLY_ROWS: frozenset = frozenset({"qkv"})


# Kernel roles (only "compact", whose kernel has `LATE_TRIGGER`; not in PDL_LATE) launched early whose programs let
# the next kernel launch only once past their own wait, instead of at their start: their own launch gap is hidden
# behind the previous kernel, and the next kernel's programs still do not sit on the SMs while the previous one runs.
# Measured on an H200 (docs/BENCHMARKS.md, session 13, run CN): the compaction this way, against launched late, 388.4
# and 387.9 against 382.9 tok/s (three samples), same process; the attention this way lost (381.8; both 384.3-384.4),
# so its kernel has no such variant.
TRIGGER_AFTER_WAIT: frozenset = frozenset({"compact"})


def pdl_args(device, role: str = "") -> dict:
    """Launch kwargs turning programmatic dependent launch on where it is available, else {}: the kernel may be
    scheduled before the previous one ends (it waits in `_pdl_wait`) and lets the next one be scheduled early. A
    `role` in PDL_LATE is not launched early; a kernel not launched early passes `_pdl_wait` at once. A role in
    TRIGGER_AFTER_WAIT is launched early and lets the next kernel launch only once past its own wait."""
    if not PDL or device.type != "cuda" or _interpreting():
        return {}
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PDL_OK:
        cuda_ext = getattr(getattr(tl, "extra", None), "cuda", None)  # gdc_* (seen in triton 3.6 and 3.9)
        _PDL_OK[idx] = torch.cuda.get_device_capability(idx)[0] >= 9 and hasattr(cuda_ext, "gdc_wait")
    if not _PDL_OK[idx]:
        return {}
    return pdl_role_args(role)


def pdl_role_args(role: str = "") -> dict:
    """`pdl_args` where programmatic dependent launch is available: by role (PDL_LATE, TRIGGER_AFTER_WAIT)."""
    if role in PDL_LATE:
        return {"USE_PDL": True}
    if role in TRIGGER_AFTER_WAIT:
        return {"USE_PDL": True, "launch_pdl": True, "LATE_TRIGGER": True}
    return {"USE_PDL": True, "launch_pdl": True}


_WS_CACHE = {}
_BLKSEG_CACHE = {}


def _workspace(device, B: int, N: int, nblk: int):
    key = (device, B, N)
    ws = _WS_CACHE.get(key)
    if ws is None or ws[1].numel() < nblk:
        ws = (
            torch.zeros(B * N, dtype=torch.float32, device=device),
            torch.zeros(max(nblk, 1), dtype=torch.int32, device=device),
        )
        _WS_CACHE[key] = ws
    return ws


def _blkseg(device, seg_sizes: tuple, block_n: int):
    key = (device, seg_sizes, block_n)
    t = _BLKSEG_CACHE.get(key)
    if t is None:
        ids = []
        for j, n in enumerate(seg_sizes):
            ids += [j] * (n // block_n)
        if sum(seg_sizes) % block_n:
            ids.append(len(seg_sizes) - 1)
        t = torch.tensor(ids, dtype=torch.int32, device=device)
        _BLKSEG_CACHE[key] = t
    return t


_NO_THR_CACHE = {}


def _no_thresholds(device, nseg: int) -> torch.Tensor:
    """-inf per segment, cached on the device (a fresh host tensor per call would be a copy, and not capturable)."""
    key = (device, nseg)
    if key not in _NO_THR_CACHE:
        _NO_THR_CACHE[key] = torch.full((nseg,), float("-inf"), dtype=torch.float32, device=device)
    return _NO_THR_CACHE[key]


def _as_f32_vec(v, n, device):
    if isinstance(v, torch.Tensor):
        v = v.to(device=device, dtype=torch.float32).reshape(-1)
    else:
        v = torch.tensor([float(a) for a in (v if isinstance(v, (list, tuple)) else [v])],
                         dtype=torch.float32, device=device)
    if v.numel() == 1 and n > 1:
        v = v.expand(n).contiguous()
    if v.numel() != n:
        raise ValueError(f"expected {n} thresholds, got {v.numel()}")
    return v


def sparse_gemv_segments(
    x: torch.Tensor,
    w_t: torch.Tensor,
    thresholds,
    seg_sizes: Sequence[int],
    scales: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    config: Optional[dict] = None,
    residual: Optional[torch.Tensor] = None,
    glu: bool = False,
    norm: Optional[tuple] = None,
    all_rows: bool = False,
    partial: Optional[torch.Tensor] = None,
    clear: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused threshold-sparse GEMV over column segments that share one input.

    ``w_t`` is ``[K, N]`` with ``N = sum(seg_sizes)``: the input-channel-major weights of
    several projections concatenated along the output dim (e.g. ``cat([Wq.T, Wk.T, Wv.T],
    1)`` with ``seg_sizes=(4096, 1024, 1024)``, or gate/up). Output column ``n`` belongs to
    segment ``j`` (``sum(seg_sizes[:j]) <= n < sum(seg_sizes[:j+1])``) and uses that
    segment's mask ``|x| * scales[j] >= thresholds[j]``::

        y[:, seg j] = where(|x| * scales[j] >= thresholds[j], x, 0) @ w_t[:, seg j] (+ bias)

    Args:
        x: ``[B, K]`` (B small, 1..8), bf16/fp16/fp32, unit column stride.
        w_t: ``[K, N]`` contiguous, same dtype as x.
        thresholds: ``[nseg]`` tensor (any float dtype, on x's device preferably; a
            Python float/list works too but costs a host-to-device copy) or a scalar
            shared by all segments.
        seg_sizes: column count of each segment; all but the last must be multiples of 16.
        scales: ``[nseg, K]`` fp32 per-input-channel scales (WINA column norms), or None
            (TEAL: all ones). A ``[K]`` tensor is shared by all segments.
        bias: ``[N]`` or None.
        out: optional ``[B, N]`` output (x.dtype).
        config: optional launch config override (see ``pick_config``).
        residual: optional ``[B, N]`` added to the output (``residual + y``, y rounded to x.dtype first, as torch
            computes ``x + linear(h)``): saves the separate add of a decoder block's residual stream.
        glu: x is ``[1, 2K]`` = ``[gate | up]`` and the input is ``silu(gate) * up`` (the MLP's down projection),
            computed on the fly with torch's roundings. Batch 1, original kernel only.
        norm: ``(weight, eps)``: the input is ``rms_norm(x, weight, eps)`` (a decoder block's RMSNorm before q/k/v
            or gate/up). Batch 1 fuses it: the stream kernel's compaction launch, or every split-K program (1/rms
            of the whole row, read from L2), computes it, so the norm costs no launch of its own; batches run
            `rms_norm` first.
        all_rows: dense — every input channel counts, thresholds and scales are ignored (the decode step's dense
            o and down, which keep the fused residual and silu·mul). Split-K kernel only.
        partial: a zeroed fp32 ``[1, N]`` buffer (`partial_buffer`): the programs add their fp32 partial sums there
            and stop, without the split-K epilogue (arrival counter, last program rereading the sums), which costs
            1.3-1.5 us per GEMV on an H200 (run AT, docs/BENCHMARKS.md); the next kernel finishes them (bias,
            rounding, residual: `_pending`) and a later one zeroes the buffer. Returns `partial`. Batch 1, no bias or
            residual here.
        clear: an fp32 buffer this launch zeroes after waiting for the previous kernel (a `partial` whose readers
            all ran before it).
    Returns ``[B, N]`` in x.dtype (split it with ``y.split(seg_sizes, -1)``).
    One kernel launch for all segments.
    """
    if not HAVE_TRITON:
        raise RuntimeError("triton is not available")
    assert x.dim() == 2 and w_t.dim() == 2, "x must be [B, K], w_t [K, N]"
    B, K = x.shape
    K2, N = w_t.shape
    if glu:
        assert B == 1 and K == 2 * K2, "glu needs x = [1, 2K] (gate | up)"
        K = K2
    assert K == K2, f"x has K={K}, w_t has K={K2}"
    seg_sizes = tuple(int(s) for s in seg_sizes)
    assert sum(seg_sizes) == N, f"seg_sizes {seg_sizes} do not sum to N={N}"
    nseg = len(seg_sizes)
    if x.stride(1) != 1:
        x = x.contiguous()
    if w_t.stride(1) != 1:
        w_t = w_t.contiguous()
    dev = x.device
    if all_rows:  # dense through the split-K kernel: no threshold test, no scales
        thresholds, scales = _no_thresholds(dev, nseg), None
        if config is None or config.get("algo") == "stream":
            config = TUNED.get((B, K, N, seg_sizes, "all_rows")) or dense_config(B, K, N)
    thr = _as_f32_vec(thresholds, nseg, dev)
    if scales is not None:
        scales = scales.to(device=dev, dtype=torch.float32)
        if scales.dim() == 1:
            scales = scales.reshape(1, K).expand(nseg, K)
        assert scales.shape == (nseg, K), f"scales must be [{nseg}, {K}]"
        scales = scales.contiguous()
    if bias is not None:
        assert bias.numel() == N
        bias = bias.contiguous()
    if out is None:
        out = torch.empty((B, N), dtype=x.dtype, device=dev)
    else:
        assert out.shape == (B, N) and out.stride(1) == 1

    if config is None:
        config = gemv_config(B, K, N, seg_sizes, "sparse" if norm is None else "norm", dev)
    cfg = dict(config)
    if residual is not None:
        assert residual.shape == (B, N) and residual.is_contiguous() and out.is_contiguous()
    if partial is not None:
        assert B == 1 and bias is None and residual is None and partial.shape == (1, N), "partial: batch 1, no epilogue"
        assert partial.dtype == torch.float32 and partial.is_contiguous()
    if B == 1 and cfg.get("algo") == "stream" and not glu and residual is None and partial is None:
        return _stream_gemv(x, w_t, thr, seg_sizes, scales, bias, out, cfg, norm)
    if norm is not None:
        assert not glu, "norm and glu exclude each other"
        if B > 1:  # the kernel normalises batch row 0 only
            x, norm = rms_norm(x, norm[0], norm[1]), None
    if cfg.get("algo") == "stream":  # the stream kernel has no batch / glu / residual variant
        cfg = split_k_config(B, K, N)
    block_n = _fix_block_n(cfg["block_n"], N, seg_sizes)
    block_k = cfg["block_k"]
    use_dot = bool(cfg.get("use_dot", True))
    if B == 1:
        block_b = 1
    elif use_dot:
        block_b = max(16, triton.next_power_of_2(B))
    else:
        block_b = triton.next_power_of_2(B)
    kps = max(block_k, (cfg["k_per_split"] // block_k) * block_k)
    kps = min(kps, triton.cdiv(K, block_k) * block_k)
    split_k = triton.cdiv(K, kps)
    nblk = triton.cdiv(N, block_n)
    if partial is not None:
        ws, cnt = partial, partial  # no counters
    elif split_k > 1:
        ws, cnt = _workspace(dev, B, N, nblk)
    else:
        ws, cnt = out, out  # unused
    blkseg = _blkseg(dev, seg_sizes, block_n) if nseg > 1 else thr
    role = "qkv" if norm is not None else "gemv"
    _sparse_gemv_kernel[(nblk, split_k)](
        x, w_t, thr,
        scales if scales is not None else thr,
        bias if bias is not None else thr,
        residual if residual is not None else thr,
        blkseg, out, ws, cnt,
        B, K, N, x.stride(0), w_t.stride(0), out.stride(0), kps,
        SPLIT_K=split_k > 1 or partial is not None, NSEG=nseg,
        HAS_SCALE=scales is not None, HAS_BIAS=bias is not None,
        BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_N=block_n,
        DOT_IEEE=x.dtype == torch.float32 or _interpreting(),
        PREFETCH=bool(cfg.get("prefetch", False)), EVEN_N=N % block_n == 0,
        USE_DOT=use_dot, EVICT=bool(cfg.get("evict", False)), HAS_RES=residual is not None, GLU=glu,
        ALL_ROWS=all_rows and block_b == 1, norm_ptr=norm[0] if norm is not None else thr,
        eps=float(norm[1]) if norm is not None else 0.0, HAS_NORM=norm is not None,
        BLOCK_ROW=triton.next_power_of_2(K) if norm is not None else 16,
        **pdl_args(dev, role), num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 1),
        PARTIAL=partial is not None, **_clear_args(clear, nblk * split_k), EARLY=block_b == 1 and role in EARLY_ROWS,
    )
    return out if partial is None else partial


def _clear_args(clear: Optional[torch.Tensor], programs: int) -> dict:
    """Launch kwargs of `_clear`: `clear` spread over a grid of `programs` programs (none: no clearing)."""
    if clear is None:
        return {}
    assert clear.dtype == torch.float32 and clear.is_contiguous()
    n = clear.numel()
    return dict(clear_ptr=clear, CLEAR_N=n, CLEAR_BLOCK=max(16, triton.next_power_of_2(triton.cdiv(n, programs))))


_PARTIAL_CACHE: dict = {}


def partial_buffer(device, name: str, n: int) -> torch.Tensor:
    """A zeroed fp32 [1, n] buffer for `sparse_gemv_segments(partial=)`, cached per (device, name, n); whoever
    reads its sums leaves it zeroed (`clear=`, or the reader itself)."""
    key = (device, name, n)
    if key not in _PARTIAL_CACHE:
        _PARTIAL_CACHE[key] = torch.zeros(1, n, dtype=torch.float32, device=device)
    return _PARTIAL_CACHE[key]


def sparse_gemv(
    x: torch.Tensor,
    w_t: torch.Tensor,
    threshold,
    scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """y = where(|x| * scale >= threshold, x, 0) @ w_t (+ bias), reading only active rows.

    x: ``[B, K]`` (B in 1..8; 1-D ``[K]`` is accepted and gives ``[N]``); w_t: ``[K, N]``
    contiguous (``W.T.contiguous()``); threshold: 0-dim tensor (preferred; no host sync)
    or float; scale: ``[K]`` fp32 or None (TEAL); bias: ``[N]`` or None. For B > 1 every
    row uses its own mask; a weight row is read when any row needs it. fp32 accumulation;
    output in x.dtype.
    """
    squeeze = x.dim() == 1
    if squeeze:
        x = x.unsqueeze(0)
    if out is not None and out.dim() == 1:
        out = out.unsqueeze(0)
    y = sparse_gemv_segments(
        x, w_t, threshold, (w_t.shape[1],),
        scales=None if scale is None else scale.reshape(1, -1),
        bias=bias, out=out, config=config,
    )
    return y.squeeze(0) if squeeze else y


# --------------------------------------------------------------------------------------
# Two-phase batch-1 path ("stream"): compact the active channels, then stream their rows.
# --------------------------------------------------------------------------------------
# Phase 1 (`_compact_kernel`, one program per segment) applies the threshold test once and
# writes the active channel indices and their fp32 x values into a dense list (+ count).
# Phase 2 (`_stream_kernel`, grid = column blocks x SPLIT) splits each segment's list
# evenly over SPLIT programs; a program loads ROWS indices, then a [ROWS, BLOCK_N] tile of
# exactly those weight rows (no per-row threshold test and no masked-off lanes on the
# critical path, so every iteration keeps ROWS * BLOCK_N * 2 bytes in flight). Split-K
# partials are reduced like the main kernel (fp32 atomics + last program writes).
if HAVE_TRITON:

    @triton.jit
    def _write_list(idx_ptr, xv_ptr, cnt_ptr, base, offs, xv, act):
        """One chunk of a stream list: the active channels' indices and fp32 values packed from slot `base` on,
        their count at cnt_ptr (the compaction launch, gate/up's pair epilogue and `_mlp_kernel` write the same
        format). Returns the count."""
        a32 = act.to(tl.int32)
        pos = base + tl.cumsum(a32, 0) - 1
        tl.store(idx_ptr + pos, offs, mask=act)
        tl.store(xv_ptr + pos, xv, mask=act)
        n = tl.sum(a32, 0)
        tl.store(cnt_ptr + tl.arange(0, 1), n + tl.zeros([1], dtype=tl.int32))
        return n

    @triton.jit
    def _compact_kernel(x_ptr, thr_ptr, scale_ptr, idx_ptr, xv_ptr, cnt_ptr, K, NCHUNK, norm_ptr, eps,
                        HAS_SCALE: tl.constexpr, CH: tl.constexpr, HAS_NORM: tl.constexpr = False,
                        BLOCK_ROW: tl.constexpr = 16, USE_PDL: tl.constexpr = False, p_ptr=None, pb_ptr=None,
                        x1_ptr=None, PENDING: tl.constexpr = False, HAS_PB: tl.constexpr = False,
                        LATE_TRIGGER: tl.constexpr = False):
        """grid (nseg, NCHUNK): chunk c of segment seg compacts channels [c*CH, (c+1)*CH) into its own slots. With
        HAS_NORM the input is RMSNorm(x) (norm weight at norm_ptr), with the formula, block and warps of
        `_rmsnorm_kernel`: the norm costs no launch of its own. PENDING (with HAS_NORM): the input is x1 = x + the
        o projection handed over as partial sums (p_ptr, bias pb_ptr; `_pending`), which segment 0's programs also
        store at x1_ptr (the MLP's residual). LATE_TRIGGER: the next kernel is let launch after the wait
        (`TRIGGER_AFTER_WAIT`)."""
        if not LATE_TRIGGER:
            _pdl_launch(USE_PDL)
        seg = tl.program_id(0)
        c = tl.program_id(1)
        t = _round_thr(tl.load(thr_ptr + seg).to(tl.float32), x_ptr, HAS_SCALE)
        offs = c * CH + tl.arange(0, CH)
        m = offs < K
        if HAS_SCALE:
            sc = tl.load(scale_ptr + seg * K + offs, mask=m, other=0.0)
        if HAS_NORM:
            gw = tl.load(norm_ptr + offs, mask=m, other=0.0).to(tl.float32)
        _pdl_wait(USE_PDL)
        if LATE_TRIGGER:
            _pdl_launch(USE_PDL)
        row = tl.arange(0, BLOCK_ROW)
        if PENDING:
            x1 = _pending(x_ptr, p_ptr, pb_ptr, offs, m, HAS_PB)
            if seg == 0:
                tl.store(x1_ptr + offs, x1, mask=m)
            xv = x1.to(tl.float32)
            xrow = _pending(x_ptr, p_ptr, pb_ptr, row, row < K, HAS_PB).to(tl.float32)
        else:
            xv = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            if HAS_NORM:
                xrow = tl.load(x_ptr + row, mask=row < K, other=0.0).to(tl.float32)
        if HAS_NORM:
            r = _inv_rms(xrow, K, eps)
            xv = _normed(xv, gw, r, x_ptr.dtype.element_ty).to(tl.float32)
        if HAS_SCALE:
            act = (tl.abs(xv) * sc >= t) & m
        else:
            act = (tl.abs(xv) >= t) & m
        _write_list(idx_ptr + seg * K, xv_ptr + seg * K, cnt_ptr + seg * NCHUNK + c, c * CH, offs, xv, act)

    @triton.jit
    def _list_idx(idx_ptr, xv_ptr, r, n, ROWS: tl.constexpr, ends=None, gaps=None):
        """Indices and fp32 values of list entries [r, r + ROWS) (masked beyond the list's n entries). A list stored
        in chunks (the compaction launch's: chunk c's entries first in its slots) has its chunks' cumulative counts
        in `ends` and their empty slots in `gaps`: entry v lives at v + the gaps of the chunks it comes after."""
        offs_r = r + tl.arange(0, ROWS)
        rm = offs_r < n
        if ends is not None:
            offs_r += tl.sum(tl.where(offs_r[:, None] >= ends[None, :], gaps[None, :], 0), 1)
        ii = tl.load(idx_ptr + offs_r, mask=rm, other=0).to(tl.int64)
        return ii, tl.load(xv_ptr + offs_r, mask=rm, other=0.0), rm

    @triton.jit
    def _chunked_list(cnt_ptr, NCHUNK: tl.constexpr, CH: tl.constexpr):
        """(entry count, chunk ends, chunk gaps) of a list the compaction launch wrote in NCHUNK chunks of CH slots."""
        c = tl.arange(0, triton.next_power_of_2(NCHUNK))
        cn = tl.load(cnt_ptr + c, mask=c < NCHUNK, other=0)
        return tl.sum(cn, 0), tl.cumsum(cn, 0), CH - cn

    @triton.jit
    def _list_rows(w_ptr, ii, mask, stride_wk, offs_n):
        """The weight rows `ii` (int64) at columns offs_n, where `mask` ([rows, 1] or [rows, columns]) holds."""
        return tl.load(w_ptr + ii[:, None] * stride_wk + offs_n[None, :], mask=mask, other=0.0)

    @triton.jit
    def _stream_tile(idx_ptr, xv_ptr, w_ptr, seg, K, r, hi, stride_wk, offs_n, n_in, ROWS: tl.constexpr,
                     EVEN_N: tl.constexpr):
        ii, xx, rm = _list_idx(idx_ptr + seg * K, xv_ptr + seg * K, r, hi, ROWS)
        if EVEN_N:
            wm = rm[:, None]
        else:
            wm = rm[:, None] & n_in[None, :]
        return xx, _list_rows(w_ptr, ii, wm, stride_wk, offs_n)

    @triton.jit
    def _glu_compact(out_ptr, pid_n, nthr_ptr, nscale_ptr, nidx_ptr, nxv_ptr, ncnt_ptr, pcnt_ptr,
                     NEXT_SCALE: tl.constexpr, BLOCK_N: tl.constexpr):
        """Called by the last program of a column block of gate/up (x = [gate | up], halves of whole blocks):
        the second of the pair (gate block j, up block j) to finish computes silu(gate) * up of those BLOCK_N
        channels, applies the down projection's threshold test and writes its active channels as chunk j of a
        stream-kernel list: down then needs no compaction launch."""
        tl.debug_barrier()  # this CTA's output stores precede its arrival
        half = tl.num_programs(0) // 2
        pair = pid_n % half
        if tl.atomic_add(pcnt_ptr + pair, 1, sem="acq_rel") == 1:
            offs = pair * BLOCK_N + tl.arange(0, BLOCK_N)
            g = tl.load(out_ptr + offs, cache_modifier=".cg")  # the partner's stores: from L2
            u = tl.load(out_ptr + half * BLOCK_N + offs, cache_modifier=".cg")
            h = _glu(g, u, out_ptr.dtype.element_ty).to(tl.float32)
            t = _round_thr(tl.load(nthr_ptr).to(tl.float32), out_ptr, NEXT_SCALE)
            if NEXT_SCALE:
                act = tl.abs(h) * tl.load(nscale_ptr + offs) >= t
            else:
                act = tl.abs(h) >= t
            _write_list(nidx_ptr, nxv_ptr, ncnt_ptr + pair, pair * BLOCK_N, offs, h, act)
            tl.atomic_xchg(pcnt_ptr + pair, 0)

    @triton.jit
    def _stream_store(tot, offs_n, n_in, pid_n, bias_ptr, res_ptr, out_ptr, HAS_BIAS: tl.constexpr,
                      HAS_RES: tl.constexpr, NEXT_GLU: tl.constexpr, nthr_ptr, nscale_ptr, nidx_ptr, nxv_ptr,
                      ncnt_ptr, pcnt_ptr, NEXT_SCALE: tl.constexpr, BLOCK_N: tl.constexpr):
        """A column block's finished sums: + bias, + residual (y rounded first, as torch's `res + linear(x)`),
        stored; then, for gate/up feeding down, `_glu_compact`."""
        dt = out_ptr.dtype.element_ty
        if HAS_BIAS:
            tot += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)
        tot = _residual(tot, res_ptr + offs_n, n_in, dt, HAS_RES)
        tl.store(out_ptr + offs_n, tot.to(dt), mask=n_in)
        if NEXT_GLU:
            _glu_compact(out_ptr, pid_n, nthr_ptr, nscale_ptr, nidx_ptr, nxv_ptr, ncnt_ptr, pcnt_ptr, NEXT_SCALE,
                         BLOCK_N)

    @triton.jit
    def _stream_kernel(idx_ptr, xv_ptr, cnt_ptr, w_ptr, bias_ptr, blkseg_ptr, out_ptr, ws_ptr, wcnt_ptr,
                       K, N, stride_wk, NCHUNK, CH,
                       SPLIT: tl.constexpr, NSEG: tl.constexpr, HAS_BIAS: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
                       PREFETCH: tl.constexpr = False, USE_PDL: tl.constexpr = False,
                       res_ptr=None, HAS_RES: tl.constexpr = False,
                       nthr_ptr=None, nscale_ptr=None, nidx_ptr=None, nxv_ptr=None, ncnt_ptr=None, pcnt_ptr=None,
                       NEXT_GLU: tl.constexpr = False, NEXT_SCALE: tl.constexpr = False):
        _pdl_launch(USE_PDL)
        pid_n, offs_n, n_in, seg = _column_block(blkseg_ptr, N, BLOCK_N, NSEG)
        pid_k = tl.program_id(1)
        _pdl_wait(USE_PDL)
        M = SPLIT // NCHUNK  # programs per chunk
        c = pid_k // M
        sub = pid_k % M
        cnt = tl.load(cnt_ptr + seg * NCHUNK + c)
        per = tl.cdiv(tl.cdiv(cnt, M), ROWS) * ROWS
        lo = c * CH + sub * per
        hi = c * CH + tl.minimum(sub * per + per, cnt)
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        if PREFETCH:
            # hand-pipelined: the next tile's rows are in flight while this one is accumulated
            xx, w = _stream_tile(idx_ptr, xv_ptr, w_ptr, seg, K, lo, hi, stride_wk, offs_n, n_in, ROWS, EVEN_N)
            for r in range(lo + ROWS, hi + ROWS, ROWS):
                xx2, w2 = _stream_tile(idx_ptr, xv_ptr, w_ptr, seg, K, r, hi, stride_wk, offs_n, n_in, ROWS, EVEN_N)
                acc += xx[:, None] * w.to(tl.float32)
                xx = xx2
                w = w2
        else:
            for r in range(lo, hi, ROWS):
                xx, w = _stream_tile(idx_ptr, xv_ptr, w_ptr, seg, K, r, hi, stride_wk, offs_n, n_in, ROWS, EVEN_N)
                acc += xx[:, None] * w.to(tl.float32)
        res = tl.sum(acc, axis=0)
        if SPLIT == 1:
            _stream_store(res, offs_n, n_in, pid_n, bias_ptr, res_ptr, out_ptr, HAS_BIAS, HAS_RES, NEXT_GLU,
                          nthr_ptr, nscale_ptr, nidx_ptr, nxv_ptr, ncnt_ptr, pcnt_ptr, NEXT_SCALE, BLOCK_N)
        else:
            ws = ws_ptr + offs_n
            tl.atomic_add(ws, res, mask=n_in, sem="relaxed")
            tl.debug_barrier()
            c = tl.atomic_add(wcnt_ptr + pid_n, 1, sem="acq_rel")
            if c == SPLIT - 1:
                zero = tl.zeros([BLOCK_N], dtype=tl.float32)
                tot = tl.atomic_add(ws, zero, mask=n_in, sem="relaxed")
                tl.store(ws, zero, mask=n_in)
                tl.atomic_xchg(wcnt_ptr + pid_n, 0)
                _stream_store(tot, offs_n, n_in, pid_n, bias_ptr, res_ptr, out_ptr, HAS_BIAS, HAS_RES, NEXT_GLU,
                              nthr_ptr, nscale_ptr, nidx_ptr, nxv_ptr, ncnt_ptr, pcnt_ptr, NEXT_SCALE, BLOCK_N)

    TRACE_SLOTS = tl.constexpr(MLP_TRACE_SLOTS)

    @triton.jit
    def _trace(tr, slot, TRACE: tl.constexpr):
        """Diagnostics only: the global timer (ns) at `slot` of this program's trace row."""
        if TRACE:
            tl.store(tr + slot + tl.arange(0, 1), tl.extra.cuda.globaltimer() + tl.zeros([1], dtype=tl.int64))

    @triton.jit
    def _mlp_kernel(idx_ptr, xv_ptr, cnt_ptr, wgu_ptr, bgu_ptr, thr_ptr, dscale_ptr, wd_ptr, res_ptr, out_ptr,
                    ws_ptr, done_ptr, didx_ptr, dxv_ptr, dcnt_ptr, K, F, N,
                    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_F: tl.constexpr, ROWS: tl.constexpr,
                    ROWS_D: tl.constexpr, BLOCK_OUT: tl.constexpr, NCHUNK: tl.constexpr, CH: tl.constexpr,
                    GU_STAGES: tl.constexpr, D_STAGES: tl.constexpr, USE_PDL: tl.constexpr = False,
                    trace_ptr=None, TRACE: tl.constexpr = False, clear_ptr=None, CLEAR_N=0,
                    CLEAR_BLOCK: tl.constexpr = 0):
        """The sparse MLP after the compaction launch, in one launch without a grid-wide barrier between gate/up and
        down: program p owns intermediate channels [p * BLOCK_F, (p + 1) * BLOCK_F). It sums their gate and up
        columns over every listed (active) input row, so it holds finished gate/up values itself; computes
        silu(gate) * up and applies down's threshold test; lists its active channels (slots p * BLOCK_F... of the
        down list) and streams exactly their rows of w_d (input-channel-major, whole rows) into one fp32 partial of
        the output, added to the workspace once (an atomic add per step instead made the kernel 2-4x slower); the
        last program adds the residual and writes the output. Both loops are pipelined by Triton (GU_STAGES,
        D_STAGES): list entries and weight rows go through shared memory by cp.async (`MLP_FUSED`: gate/up in 3
        stages, down in 4, whose 48 KB of buffers are the most). TRACE: per program, the SM and global timer at each
        phase (benchmarks/gpu_profile.py --mlp-timeline)."""
        _pdl_launch(USE_PDL)
        pid = tl.program_id(0)
        tr = trace_ptr
        if TRACE:
            tr = trace_ptr + pid * TRACE_SLOTS
        _trace(tr, 1, TRACE)
        offs_f = pid * BLOCK_F + tl.arange(0, BLOCK_F)
        dt = out_ptr.dtype.element_ty
        t = _round_thr(tl.load(thr_ptr).to(tl.float32), out_ptr, HAS_SCALE)
        if HAS_SCALE:
            sd = tl.load(dscale_ptr + offs_f)
        if HAS_BIAS:
            bg = tl.load(bgu_ptr + offs_f).to(tl.float32)
            bu = tl.load(bgu_ptr + F + offs_f).to(tl.float32)
        _pdl_wait(USE_PDL)
        _clear(clear_ptr, CLEAR_N, pid, CLEAR_BLOCK)
        _trace(tr, 2, TRACE)
        # the compaction's lists: gate's active inputs in slots [0, K), up's in [K, 2K), NCHUNK chunks each
        n_g, e_g, p_g = _chunked_list(cnt_ptr, NCHUNK, CH)
        n_u, e_u, p_u = _chunked_list(cnt_ptr + NCHUNK, NCHUNK, CH)
        s_gu = 2 * F
        # gate's and up's rows step together, ROWS list entries a step
        acc_g = tl.zeros([ROWS, BLOCK_F], dtype=tl.float32)
        acc_u = tl.zeros([ROWS, BLOCK_F], dtype=tl.float32)
        for r in tl.range(0, tl.maximum(n_g, n_u), ROWS, num_stages=GU_STAGES):
            gi, gx, gm = _list_idx(idx_ptr, xv_ptr, r, n_g, ROWS, e_g, p_g)
            ui, ux, um = _list_idx(idx_ptr + K, xv_ptr + K, r, n_u, ROWS, e_u, p_u)
            gw = _list_rows(wgu_ptr, gi, gm[:, None], s_gu, offs_f)
            uw = _list_rows(wgu_ptr + F, ui, um[:, None], s_gu, offs_f)
            acc_g += gx[:, None] * gw.to(tl.float32)
            acc_u += ux[:, None] * uw.to(tl.float32)
        g = tl.sum(acc_g, 0)
        u = tl.sum(acc_u, 0)
        if HAS_BIAS:
            g += bg
            u += bu
        h = _glu(g.to(dt), u.to(dt), dt).to(tl.float32)  # gate/up rounded to x.dtype first, as their GEMV writes
        if HAS_SCALE:
            act = tl.abs(h) * sd >= t
        else:
            act = tl.abs(h) >= t
        _trace(tr, 3, TRACE)
        # down: list this program's active channels, then stream exactly their rows, ROWS_D whole rows a step
        base = pid * BLOCK_F
        n_d = _write_list(didx_ptr, dxv_ptr, dcnt_ptr + pid, base, offs_f, h, act)
        tl.debug_barrier()  # the list's stores precede its loads (same CTA)
        _trace(tr, 4, TRACE)
        offs_o = tl.arange(0, BLOCK_OUT)
        o_in = offs_o < N
        acc = tl.zeros([BLOCK_OUT], dtype=tl.float32)
        for r in tl.range(0, n_d, ROWS_D, num_stages=D_STAGES):
            di, dx, dm = _list_idx(didx_ptr + base, dxv_ptr + base, r, n_d, ROWS_D)
            w = _list_rows(wd_ptr, di, dm[:, None] & o_in[None, :], N, offs_o)
            acc += tl.sum(dx[:, None] * w.to(tl.float32), 0)
        _trace(tr, 5, TRACE)
        tl.atomic_add(ws_ptr + offs_o, acc, mask=o_in, sem="relaxed")
        tl.debug_barrier()  # this CTA's adds precede its arrival
        last = tl.atomic_add(done_ptr, 1, sem="acq_rel") == tl.num_programs(0) - 1
        if last:
            zero = tl.zeros([BLOCK_OUT], dtype=tl.float32)
            tot = tl.atomic_add(ws_ptr + offs_o, zero, mask=o_in, sem="relaxed")  # every program's sums, from L2
            tl.store(ws_ptr + offs_o, zero, mask=o_in)
            tl.atomic_xchg(done_ptr, 0)
            tot = _residual(tot, res_ptr + offs_o, o_in, dt, True)
            tl.store(out_ptr + offs_o, tot.to(dt), mask=o_in)
        if TRACE:
            _trace(tr, 6, TRACE)
            tl.store(tr + tl.arange(0, 1), tl.extra.cuda.smid().to(tl.int64) + tl.zeros([1], dtype=tl.int64))
            j = tl.arange(0, 4)
            tl.store(tr + 7 + j, tl.where(j == 0, n_g, tl.where(j == 1, n_u, tl.where(j == 2, n_d, last.to(
                tl.int32)))).to(tl.int64))

_LIST_CACHE = {}


def _lists(device, nseg: int, K: int, nchunk: int):
    """The stream lists of `nseg` segments over K channels (indices, fp32 values, a count per chunk), cached per
    (device, nseg, K); the counts grow to the largest `nchunk` asked for."""
    key = (device, nseg, K)
    t = _LIST_CACHE.get(key)
    if t is None or t[2].numel() < nseg * nchunk:
        t = (torch.zeros(nseg * K, dtype=torch.int32, device=device),
             torch.zeros(nseg * K, dtype=torch.float32, device=device),
             torch.zeros(nseg * max(nchunk, 1), dtype=torch.int32, device=device))
        _LIST_CACHE[key] = t
    return t


def _stream_gemv(x, w_t, thr, seg_sizes, scales, bias, out, cfg, norm=None, glu_next=None):
    """The two-phase path: compaction launch, then `_stream_launch`. `glu_next` = (threshold [1], scale [K2] or
    None) of a down projection fed by this gate/up (see `sparse_mlp`)."""
    # benchmarks only (skip_compact): reuse the lists of the previous call (same x)
    (idx, xv, cnt), nchunk, ch = _compact(x, thr, scales, norm, cfg, launch=not cfg.get("skip_compact"))
    return _stream_launch(idx, xv, cnt, w_t, bias, out, seg_sizes, thr, nchunk, ch, cfg, glu_next=glu_next)


def _compact(x, thr, scales, norm, cfg: dict, launch: bool = True, pending: Optional[tuple] = None) -> tuple:
    """The compaction launch: each segment's (one per threshold) active channels of x (RMSNorm(x) with `norm`) in
    chunks of cfg's compact_ch (1024 by default). `pending` (partial sums, bias or None, x1 out; with `norm`): the
    input is x1 = x + the sums, stored at x1 out. Returns (the cached lists, chunks per segment, chunk size)."""
    K = x.shape[1]
    ch = min(triton.next_power_of_2(K), cfg.get("compact_ch", 1024))
    nchunk = triton.cdiv(K, ch)
    idx, xv, cnt = lists = _lists(x.device, thr.numel(), K, nchunk)
    # with a norm, its row reduction must see the layout of `rms_norm`: the same warps
    warps = _norm_warps(K) if norm is not None else cfg.get("compact_warps", 4)
    pend = {}
    if pending is not None:
        assert norm is not None, "pending sums need the norm's whole-row pass"
        p, pb, x1 = pending
        pend = dict(p_ptr=p, pb_ptr=pb if pb is not None else p, x1_ptr=x1, PENDING=True, HAS_PB=pb is not None)
    if launch:
        _compact_kernel[(thr.numel(), nchunk)](x, thr, scales if scales is not None else thr, idx, xv, cnt, K,
                                               nchunk, thr if norm is None else norm[0],
                                               0.0 if norm is None else float(norm[1]), HAS_SCALE=scales is not None,
                                               CH=ch, HAS_NORM=norm is not None, BLOCK_ROW=triton.next_power_of_2(K),
                                               num_warps=warps, **pdl_args(x.device, "compact"), **pend)
    return lists, nchunk, ch


def _stream_launch(idx, xv, cnt, w_t, bias, out, seg_sizes, dummy, nchunk: int, ch: int, cfg: dict,
                   residual=None, glu_next=None):
    """Phase 2 over compacted lists (chunks of `ch` channels, `nchunk` per segment): out = lists @ w_t (+ bias)
    (+ residual); with `glu_next` the gate/up epilogue also lists the down projection's active channels. `dummy`:
    any device tensor, passed for pointer arguments a variant does not read."""
    K, N = w_t.shape
    dev = w_t.device
    block_n = _fix_block_n(cfg.get("block_n", 128), N, seg_sizes)
    nblk = triton.cdiv(N, block_n)
    split = max(1, int(cfg.get("split", 8)))
    split = nchunk * max(1, round(split / nchunk))
    if split > 1:
        ws, wcnt = _workspace(dev, 1, N, nblk)
    else:
        ws, wcnt = out, out
    nseg = len(seg_sizes)
    blkseg = _blkseg(dev, tuple(seg_sizes), block_n) if nseg > 1 else dummy
    nxt = {}
    if glu_next is not None:
        nthr, nscale = glu_next
        nidx, nxv, ncnt = _lists(dev, 1, N // 2, nblk // 2)
        nxt = dict(nthr_ptr=nthr, nscale_ptr=nscale if nscale is not None else nthr, nidx_ptr=nidx, nxv_ptr=nxv,
                   ncnt_ptr=ncnt, pcnt_ptr=_pair_counters(dev, nblk // 2), NEXT_GLU=True,
                   NEXT_SCALE=nscale is not None)
    _stream_kernel[(nblk, split)](
        idx, xv, cnt, w_t, bias if bias is not None else dummy, blkseg, out, ws, wcnt,
        K, N, w_t.stride(0), nchunk, ch,
        SPLIT=split, NSEG=nseg, HAS_BIAS=bias is not None, ROWS=cfg.get("rows", 32), BLOCK_N=block_n,
        EVEN_N=N % block_n == 0, PREFETCH=bool(cfg.get("prefetch", False)), **pdl_args(dev),
        res_ptr=residual if residual is not None else dummy, HAS_RES=residual is not None, **nxt,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )
    return out


_PAIR_CACHE: dict = {}


def _pair_counters(device, n: int) -> torch.Tensor:
    """Zeroed int32 arrival counters of the (gate block, up block) pairs; the second arrival resets its own."""
    key = (device, n)
    if key not in _PAIR_CACHE:
        _PAIR_CACHE[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return _PAIR_CACHE[key]


# The down projection as a pure row stream (`sparse_mlp`), tuned on an H200 with its compaction launch: 21.1 us
# per call at s = 0.5 against 22.6 for the split-K kernel with silu·mul inside (gpu_suite tune, 2026-11-29); inside
# `sparse_mlp` no other grid of 48 tried was faster (gpu_suite --tune-mlp, runs P and T in docs/BENCHMARKS.md).
DOWN_STREAM = dict(block_n=2048, rows=4, split=132, num_warps=8, num_stages=2, prefetch=True)


def sparse_mlp(x: torch.Tensor, w_gu: torch.Tensor, thr_gu: torch.Tensor, seg_sizes: Sequence[int],
               scales_gu: Optional[torch.Tensor], bias_gu: Optional[torch.Tensor], norm: tuple,
               w_down: torch.Tensor, thr_down: torch.Tensor, scale_down: Optional[torch.Tensor],
               residual: Optional[torch.Tensor], config: Optional[dict] = None,
               down_config: Optional[dict] = None, pending: Optional[tuple] = None) -> Optional[torch.Tensor]:
    """residual + down(silu(gate) * up) of a decode row with both GEMVs sparse. With `MLP_FUSED` (or a config with
    algo="fused") in two launches: RMSNorm + compaction of gate/up's active channels, then `_mlp_kernel` (gate/up
    over exactly those rows, silu·mul, down over exactly its active rows, residual). Else, with a stream config, in
    three: the same compaction; gate/up over exactly those rows, whose last program per (gate block, up block) pair
    computes silu·mul of those channels and lists down's active ones; down streaming exactly its active rows,
    residual added. None where neither applies (the caller then runs gate/up and the split-K down with silu·mul
    inside): batch 1, gate/up = two equal halves, and a stream config (two equal halves of whole column blocks for
    three launches) or a fused config whose block_f divides F.

    x [1, K]; w_gu [K, 2F] input-major (gate | up), seg_sizes (F, F); norm (weight, eps) of x; w_down [F, N];
    thr_down [1]; scale_down [F] (WINA) or None; residual [1, N].

    pending = (fp32 partial sums [1, K], bias or None) of the previous linear (`sparse_gemv_segments(partial=)`),
    two launches only (see `fused_mlp_config`): the MLP's input is then x1 = x + those sums (`_pending`), which is
    also the residual (pass residual=None); the compaction launch finishes the sums and `_mlp_kernel` zeroes them."""
    cfg = _mlp_config(x, w_gu, seg_sizes, w_down, config)
    fused = _fused_of(cfg, config, w_down.shape[0])
    if pending is not None and fused is None:
        raise ValueError("pending sums need the two-launch MLP (fused_mlp_config)")
    if fused is None:
        if cfg is None or cfg.get("algo") != "stream":
            return None
        F = w_down.shape[0]
        seg_sizes = (F, F)
        block_n = _fix_block_n(cfg.get("block_n", 128), 2 * F, seg_sizes)
        if F % block_n:  # the (gate block j, up block j) pairs must be whole column blocks
            return None
    dev = x.device
    thr, thr_down = _as_f32_vec(thr_gu, 2, dev), _as_f32_vec(thr_down, 1, dev)
    if scale_down is not None:
        scale_down = scale_down.to(device=dev, dtype=torch.float32).reshape(-1).contiguous()
    if fused is not None:
        return _fused_mlp(x, w_gu, thr, scales_gu, bias_gu, norm, w_down, thr_down, scale_down, residual, fused,
                          pending)
    gu = torch.empty(1, 2 * F, dtype=x.dtype, device=dev)
    _stream_gemv(x, w_gu, thr, seg_sizes, scales_gu, bias_gu, gu, dict(cfg), norm, glu_next=(thr_down, scale_down))
    nchunk = F // block_n
    idx, xv, cnt = _lists(dev, 1, F, nchunk)  # written by gate/up's pair epilogues: chunk j = channels of pair j
    N = w_down.shape[1]
    out = torch.empty(1, N, dtype=x.dtype, device=dev)
    dcfg = down_config
    if dcfg is None:  # a tuned stream config of this down shape, else DOWN_STREAM
        tuned = TUNED.get((1, F, N, (N,), "sparse"))
        dcfg = tuned if tuned and tuned.get("algo") == "stream" else DOWN_STREAM
    return _stream_launch(idx, xv, cnt, w_down, None, out, (N,), thr, nchunk, block_n, dcfg,
                          residual=residual.contiguous())


def fused_mlp_config(x: torch.Tensor, w_gu: torch.Tensor, seg_sizes: Sequence[int], w_down: torch.Tensor,
                     config: Optional[dict] = None) -> Optional[dict]:
    """The `_mlp_kernel` config `sparse_mlp` runs this call with (two launches), or None (three, or not at all)."""
    return _fused_of(_mlp_config(x, w_gu, seg_sizes, w_down, config), config, w_down.shape[0])


def _fused_of(cfg: Optional[dict], config: Optional[dict], F: int) -> Optional[dict]:
    """The two-launch config given gate/up's (`_mlp_config`): the caller's own fused config, else `MLP_FUSED` where
    gate/up would stream; None unless its block_f divides F."""
    fused = cfg and (config or (MLP_FUSED if cfg.get("algo") == "stream" else None))
    return fused if fused and fused.get("algo") == "fused" and F % fused["block_f"] == 0 else None


def _mlp_config(x, w_gu, seg_sizes, w_down, config: Optional[dict]) -> Optional[dict]:
    """gate/up's config for a `sparse_mlp` call (the given one, tuned or picked), None where the call does not fit
    (batch 1, gate/up = two halves of F)."""
    B, K = x.shape
    F = w_down.shape[0]
    seg_sizes = tuple(int(v) for v in seg_sizes)
    if B != 1 or seg_sizes != (F, F) or w_gu.shape != (K, 2 * F):
        return None
    return config or gemv_config(1, K, 2 * F, seg_sizes, "norm", x.device)


# `sparse_mlp` in two launches (`_mlp_kernel`: intermediate channels per program, list rows per step of gate/up,
# whole down rows per step, compaction chunk, stages of Triton's pipeliner for the gate/up and down loops) where it
# would take three stream launches; None: three. Measured on an H200 (docs/BENCHMARKS.md): decode 347.1-350.3 tok/s
# against 341.8-343.8 in three launches, same processes (runs X-AG); both loops in 3 stages by Triton instead of
# pipelined by hand: 353.9 and 357.7 against 350.2 and 352.2 tok/s (runs AO, AN), the MLP alone 55.0 against 56.1 us
# (run AN); 4 warps instead of 8 (204 registers instead of 116, still 2 programs per SM, one wave): 381.7 against
# 378.0 tok/s, the MLP alone 52.7-52.9 against 53.8 us (run BS, session 11); down 2 rows a step in 4 stages instead
# of 4 in 3 (49 KB of shared memory instead of 66): 383.5-383.9 against 381.8-382.3 tok/s in runs CC and CD, the
# kernel's span 47.2-48.6 us against 49.8-50.7 (runs CC, BY; session 12).
MLP_FUSED: Optional[dict] = dict(algo="fused", block_f=64, rows=64, rows_d=2, num_warps=4, compact_ch=2048,
                                 gu_stages=3, d_stages=4)

# The decode step's split-K GEMVs hand their fp32 partial sums to the next kernel instead of finishing them
# (`sparse_gemv_segments(partial=)`; `FusedDecodeStep`): sparse, q/k/v's to the attention and o's to the MLP's
# compaction launch; dense, o's to the RMSNorm before gate/up. False: every GEMV finishes its own sums.
HAND_OVER = True

# Diagnostics (benchmarks/gpu_profile.py --mlp-timeline): an int64 [programs, MLP_TRACE_SLOTS] device tensor that
# the next `_mlp_kernel` launch fills with its trace rows (see `_mlp_kernel`), or None.
MLP_TRACE: Optional[torch.Tensor] = None


def _fused_mlp(x, w_gu, thr, scales_gu, bias_gu, norm, w_down, thr_down, scale_down, residual, cfg, pending=None):
    """`sparse_mlp` in two launches: the compaction (norm fused), then `_mlp_kernel`."""
    K = x.shape[1]
    F, N = w_down.shape
    dev = x.device
    clear = {}
    if pending is not None:
        assert residual is None, "with pending sums the residual is the MLP's input"
        residual = torch.empty_like(x)
        pending = (pending[0], pending[1], residual)
        clear = _clear_args(pending[0], F // cfg["block_f"])
    lists, nchunk, ch = _compact(x, thr, scales_gu, norm, cfg, pending=pending)
    ws, done = _workspace(dev, 1, N, 1)
    out = torch.empty(1, N, dtype=x.dtype, device=dev)
    bf = cfg["block_f"]
    _mlp_kernel[(F // bf,)](*lists, w_gu, bias_gu if bias_gu is not None else thr, thr_down,
                            scale_down if scale_down is not None else thr, w_down, residual.contiguous(), out, ws,
                            done, *_lists(dev, 1, F, F // bf), K, F, N, HAS_BIAS=bias_gu is not None,
                            HAS_SCALE=scale_down is not None, BLOCK_F=bf, ROWS=cfg.get("rows", 64),
                            ROWS_D=cfg.get("rows_d", 4), BLOCK_OUT=triton.next_power_of_2(N), NCHUNK=nchunk, CH=ch,
                            GU_STAGES=cfg.get("gu_stages", 3), D_STAGES=cfg.get("d_stages", 3), **pdl_args(dev, "mlp"),
                            trace_ptr=MLP_TRACE, TRACE=MLP_TRACE is not None, num_warps=cfg.get("num_warps", 8),
                            num_stages=1, **clear)
    return out


# Per-shape configs found by a tuning run (benchmarks/gpu_suite.py); consulted by sparse_gemv_segments.
TUNED: dict = {}


def set_tuned(B: int, K: int, N: int, seg_sizes, config: dict, variant: str = "sparse") -> None:
    """Register a tuned config for `sparse_gemv_segments` calls of this shape; variant "sparse" (plain calls),
    "norm" (calls with `norm=`) or "all_rows" (dense calls)."""
    assert variant in ("sparse", "norm", "all_rows"), variant
    TUNED[(B, K, N, tuple(seg_sizes), variant)] = dict(config)


if HAVE_TRITON:

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, D, eps, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False,
                        p_ptr=None, pb_ptr=None, x1_ptr=None, PENDING: tl.constexpr = False,
                        HAS_PB: tl.constexpr = False):
        """RMSNorm of each row; PENDING (one row): of x1 = x + a linear's output handed over as partial sums
        (`_pending`), storing x1 too and zeroing the sums (this program is their only reader)."""
        _pdl_launch(USE_PDL)
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < D
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        _pdl_wait(USE_PDL)
        if PENDING:
            x1 = _pending(x_ptr, p_ptr, pb_ptr, offs, m, HAS_PB)
            tl.store(x1_ptr + offs, x1, mask=m)
            _clear(p_ptr, D, 0, BLOCK)
            x = x1.to(tl.float32)
        else:
            x = tl.load(x_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * D + offs, _normed(x, w, _inv_rms(x, D, eps), y_ptr.dtype.element_ty), mask=m)


def _norm_warps(D: int) -> int:
    return 4 if D <= 4096 else 8


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, pending: Optional[tuple] = None):
    """One-launch RMSNorm with the numerics of runtime.model.RMSNorm (fp32 statistics, x.dtype output).

    pending = (fp32 partial sums [1, D], bias or None) of the linear whose output is added to the one row x
    (`sparse_gemv_segments(partial=)`): returns (x1, rms_norm(x1)) for x1 = x + that output, and zeroes the sums."""
    D = x.shape[-1]
    if pending is not None:
        assert x.numel() == D and x.is_contiguous()
        p, pb = pending
        x1, y = torch.empty_like(x), torch.empty_like(x)
        _rmsnorm_kernel[(1,)](x, weight, y, D, float(eps), BLOCK=triton.next_power_of_2(D), num_warps=_norm_warps(D),
                              **pdl_args(x.device, "norm"), p_ptr=p, pb_ptr=pb if pb is not None else p, x1_ptr=x1,
                              PENDING=True, HAS_PB=pb is not None)
        return x1, y
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != D):
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _rmsnorm_kernel[(x2.shape[0],)](x2, weight, y, D, float(eps), BLOCK=triton.next_power_of_2(D),
                                    num_warps=_norm_warps(D), **pdl_args(x.device, "norm"))
    return y.view(x.shape)
