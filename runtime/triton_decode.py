"""Triton kernels for the non-linear part of one decode step (batch 1, one token), so a layer is a handful of launches.

- `rope_cache`: rotary embedding of q and k plus the KV-cache write of k and v at the position held in a device
  tensor (CUDA-graph safe), one launch instead of about a dozen small torch ops;
- `decode_attention`: softmax(q K^T / sqrt(d)) V of one query token over the cache up to its position (causal,
  optional sliding window, grouped-query heads), online softmax in fp32; one program per query head reads its
  kv head's cache rows, so it suits the short-to-medium contexts of decode benchmarks (no split over the context);
- `glu`: silu(gate) * up in one launch (the dense path; the sparse down kernel computes it on the fly).

Numerics follow the torch reference (runtime/model.py): rope products and the sum rounded to the activation dtype
like transformers' `x * cos + rotate_half(x) * sin`; attention in fp32 like SDPA's math path, output rounded once.
"""

from __future__ import annotations

import math

import torch

from .triton_kernels import HAVE_TRITON, pdl_args

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_kernels import _glu, _pdl_start

    @triton.jit
    def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, qo_ptr, kc_ptr, vc_ptr,
                           H, stride_ch, stride_cl, HD: tl.constexpr, USE_PDL: tl.constexpr = False):
        _pdl_start(USE_PDL)
        pid = tl.program_id(0)
        d = tl.arange(0, HD)
        half: tl.constexpr = HD // 2
        partner = (d + half) % HD
        sign = tl.where(d < half, -1.0, 1.0)
        c = tl.load(cos_ptr + d).to(tl.float32)
        s = tl.load(sin_ptr + d).to(tl.float32)
        dt = qo_ptr.dtype.element_ty
        if pid < H:
            src = q_ptr + pid * HD
        else:
            src = k_ptr + (pid - H) * HD
        x = tl.load(src + d).to(tl.float32)
        xp = tl.load(src + partner).to(tl.float32)
        y = ((x * c).to(dt).to(tl.float32) + (sign * xp * s).to(dt).to(tl.float32)).to(dt)
        if pid < H:
            tl.store(qo_ptr + pid * HD + d, y)
        else:
            h = pid - H
            pos = tl.load(pos_ptr)
            tl.store(kc_ptr + h * stride_ch + pos * stride_cl + d, y)
            tl.store(vc_ptr + h * stride_ch + pos * stride_cl + d, tl.load(v_ptr + h * HD + d))

    @triton.jit
    def _decode_attention_kernel(q_ptr, kc_ptr, vc_ptr, pos_ptr, out_ptr, GROUP, stride_ch, stride_cl, scale,
                                 WINDOW, HD: tl.constexpr, BLOCK_L: tl.constexpr, HAS_WINDOW: tl.constexpr,
                                 USE_PDL: tl.constexpr = False):
        _pdl_start(USE_PDL)
        h = tl.program_id(0)
        kvh = h // GROUP
        d = tl.arange(0, HD)
        q = tl.load(q_ptr + h * HD + d).to(tl.float32)
        pos = tl.load(pos_ptr).to(tl.int32)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(pos - WINDOW + 1, 0)
        m_i = tl.full([], float("-inf"), tl.float32)
        l_i = tl.full([], 0.0, tl.float32)
        acc = tl.zeros([HD], dtype=tl.float32)
        base = kvh * stride_ch
        for start in range(lo, pos + 1, BLOCK_L):
            offs = start + tl.arange(0, BLOCK_L)
            lm = offs <= pos
            ptr = base + offs[:, None] * stride_cl + d[None, :]
            k = tl.load(kc_ptr + ptr, mask=lm[:, None], other=0.0).to(tl.float32)
            sc = tl.sum(q[None, :] * k, 1) * scale
            sc = tl.where(lm, sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 0))
            p = tl.exp(sc - m_new)
            alpha = tl.exp(m_i - m_new)
            v = tl.load(vc_ptr + ptr, mask=lm[:, None], other=0.0).to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            m_i = m_new
        tl.store(out_ptr + h * HD + d, (acc / l_i).to(out_ptr.dtype.element_ty))

    @triton.jit
    def _glu_kernel(x_ptr, out_ptr, F, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
        _pdl_start(USE_PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < F
        g = tl.load(x_ptr + offs, mask=m, other=0.0)
        u = tl.load(x_ptr + F + offs, mask=m, other=0.0)
        tl.store(out_ptr + offs, _glu(g, u, out_ptr.dtype.element_ty), mask=m)


def rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """Rotate q [H*d] and k [KV*d] of one token at position `pos` (int64 [1] device tensor), write rotated k and v
    into the caches [1, KV, max_len, d] at `pos`; returns rotated q [H*d]. cos/sin: [1, d] tables of that position."""
    hd = k_cache.shape[-1]
    n_q, n_kv = q.numel() // hd, k.numel() // hd
    assert k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride() and k_cache.shape[0] == 1
    qo = torch.empty(q.numel(), dtype=q.dtype, device=q.device)
    _rope_cache_kernel[(n_q + n_kv,)](q, k, v, cos, sin, pos, qo, k_cache, v_cache, n_q,
                                      k_cache.stride(1), k_cache.stride(2), HD=hd, num_warps=1, **pdl_args(q.device))
    return qo


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     window: int | None = None) -> torch.Tensor:
    """Attention of one query token (rotated q [H*d]) over cache positions <= pos (and > pos - window). [H*d]."""
    hd = k_cache.shape[-1]
    n_q, n_kv = q.numel() // hd, k_cache.shape[1]
    out = torch.empty_like(q)
    _decode_attention_kernel[(n_q,)](q, k_cache, v_cache, pos, out, n_q // n_kv, k_cache.stride(1),
                                     k_cache.stride(2), 1.0 / math.sqrt(hd), window or 0, HD=hd, BLOCK_L=32,
                                     HAS_WINDOW=window is not None, num_warps=4, **pdl_args(q.device))
    return out


def glu(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [..., 2F] (gate | up), torch's roundings; one launch."""
    f = x.shape[-1] // 2
    assert x.numel() == 2 * f and x.is_contiguous(), "glu takes one row [gate | up]"
    out = torch.empty(f, dtype=x.dtype, device=x.device)
    _glu_kernel[(triton.cdiv(f, 1024),)](x, out, f, BLOCK=1024, num_warps=4, **pdl_args(x.device))
    return out
