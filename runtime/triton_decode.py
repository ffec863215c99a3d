"""Triton kernels for the non-linear part of one decode step (batch 1, one token), so a layer is a handful of launches.

- `rope_attention`: rotary embedding of q and k, the KV-cache write of k and v at the position held in a device
  tensor (CUDA-graph safe) and softmax(q K^T / sqrt(d)) V of the token over the cache (causal, optional sliding
  window, grouped-query heads; online softmax in fp32), one launch instead of about a dozen small torch ops. The
  context is split over programs of up to `ATTN_SPLIT` positions per query head, whose partials the last of them
  combines (flash-decoding); the token's own k/v come from registers, so the program that writes its cache row races
  with nobody;
- `glu`: silu(gate) * up in one launch (the dense path; the sparse down kernel computes it on the fly);
- `argmax_two_stage`: the argmax over a large vocabulary in two short launches instead of one slow single-row
  reduction (the decode loop's greedy token on CUDA).

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

    from .triton_kernels import _glu, _pdl_launch, _pdl_start, _pdl_wait

    @triton.jit
    def _head(ptr, b_ptr, d, dt, PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr):
        """One head's slice of the q/k/v GEMV's output: as stored (dt), or, PARTIAL, finished from its fp32 partial
        sums as the split-K epilogue does (+ bias, rounded to dt)."""
        v = tl.load(ptr + d)
        if PARTIAL:
            if HAS_BIAS:
                v += tl.load(b_ptr + d).to(tl.float32)
            v = v.to(dt)
        return v

    @triton.jit
    def _rope(ptr, b_ptr, d, partner, sign, c, s, dt, PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr):
        """transformers' `x * cos + rotate_half(x) * sin` for one head, products and sum rounded to dt."""
        x = _head(ptr, b_ptr, d, dt, PARTIAL, HAS_BIAS).to(tl.float32)
        xp = _head(ptr, b_ptr, partner, dt, PARTIAL, HAS_BIAS).to(tl.float32)
        return ((x * c).to(dt).to(tl.float32) + (sign * xp * s).to(dt).to(tl.float32)).to(dt)

    @triton.jit
    def _rope_attention_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, out_ptr, ws_ptr,
                               cnt_ptr, GROUP, NSPLIT, stride_ch, stride_cl, scale, WINDOW, HD: tl.constexpr,
                               P: tl.constexpr, NS_BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                               USE_PDL: tl.constexpr = False, qb_ptr=None, kb_ptr=None, vb_ptr=None,
                               PARTIAL: tl.constexpr = False, HAS_BIAS: tl.constexpr = False):
        """grid (query heads, NSPLIT): program (h, sp) attends over cache positions [sp*P, sp*P + P) of its window;
        the program of the split holding `pos` adds the token itself (rotated k, v from registers; the head group's
        first program writes them to the cache row nobody else reads now). Partials (max, sum, acc) meet in an fp32
        workspace; the last split of a head to finish (atomic counter, reset afterwards) combines them. Splits
        outside [window start, pos] do nothing, so the grid can be sized by the cache (CUDA-graph safe).

        The position and the cache rows before it are read before `_pdl_wait` (overlapping the q/k/v GEMV where the
        attention is launched early; `triton_kernels.PDL_LATE` launches it in stream order): both were written by
        earlier decode steps, which end in non-PDL kernels (the argmax, whose second launch advances the position)
        and begin with some (embedding, rotary row), so every write to them completed before this step's first PDL
        kernel started. cos/sin, this step's rotary row, are read after the wait. PARTIAL: q, k and v are the q/k/v
        GEMV's fp32 partial sums (bias at qb/kb/vb_ptr with HAS_BIAS), finished here (`_head`)."""
        _pdl_launch(USE_PDL)
        h = tl.program_id(0)
        sp = tl.program_id(1)
        kvh = h // GROUP
        d = tl.arange(0, HD)
        offs = sp * P + tl.arange(0, P)
        base = kvh * stride_ch
        ptr = base + offs[:, None] * stride_cl + d[None, :]
        pos = tl.load(pos_ptr).to(tl.int32)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(pos - WINDOW + 1, 0)
        first = lo // P
        last = pos // P
        active = (sp >= first) & (sp <= last)
        lm = offs < tl.where(active, pos, 0)
        if HAS_WINDOW:
            lm = lm & (offs >= lo)
        k = tl.load(kc_ptr + ptr, mask=lm[:, None], other=0.0).to(tl.float32)
        v = tl.load(vc_ptr + ptr, mask=lm[:, None], other=0.0).to(tl.float32)
        _pdl_wait(USE_PDL)
        if active:
            half: tl.constexpr = HD // 2
            partner = (d + half) % HD
            sign = tl.where(d < half, -1.0, 1.0)
            c = tl.load(cos_ptr + d).to(tl.float32)
            s = tl.load(sin_ptr + d).to(tl.float32)
            dt = kc_ptr.dtype.element_ty
            q = _rope(q_ptr + h * HD, qb_ptr + h * HD, d, partner, sign, c, s, dt, PARTIAL, HAS_BIAS).to(tl.float32)
            sc = tl.where(lm, tl.sum(q[None, :] * k, 1) * scale, float("-inf"))
            # the token itself (always inside its window) belongs to the split holding pos
            own = sp == last
            k_new = _rope(k_ptr + kvh * HD, kb_ptr + kvh * HD, d, partner, sign, c, s, dt, PARTIAL, HAS_BIAS)
            v_new = _head(v_ptr + kvh * HD, vb_ptr + kvh * HD, d, dt, PARTIAL, HAS_BIAS)
            if own & (h % GROUP == 0):
                tl.store(kc_ptr + base + pos * stride_cl + d, k_new)
                tl.store(vc_ptr + base + pos * stride_cl + d, v_new)
            s_new = tl.where(own, tl.sum(q * k_new.to(tl.float32), 0) * scale, float("-inf"))
            m_i = tl.maximum(tl.max(sc, 0), s_new)
            p = tl.exp(sc - m_i)
            p_new = tl.exp(s_new - m_i)
            l_i = tl.sum(p, 0) + p_new
            acc = tl.sum(p[:, None] * v, 0) + p_new * v_new.to(tl.float32)
            if first == last:
                tl.store(out_ptr + h * HD + d, (acc / l_i).to(out_ptr.dtype.element_ty))
            else:
                W: tl.constexpr = HD + 2
                row = ws_ptr + (h * NSPLIT + sp) * W
                tl.store(row + d, acc)
                tl.store(row + HD + tl.arange(0, 2), tl.where(tl.arange(0, 2) == 0, m_i, l_i))
                tl.debug_barrier()
                done = tl.atomic_add(cnt_ptr + h, 1, sem="acq_rel")
                if done == last - first:  # every other split of this head has written its partial: combine
                    M = tl.full([], float("-inf"), tl.float32)
                    L = tl.full([], 0.0, tl.float32)
                    ACC = tl.zeros([HD], dtype=tl.float32)
                    for j0 in range(first, last + 1, NS_BLOCK):
                        js = j0 + tl.arange(0, NS_BLOCK)
                        jm = js <= last
                        rows = ws_ptr + (h * NSPLIT + js) * W
                        mj = tl.load(rows + HD, mask=jm, other=float("-inf"), cache_modifier=".cg")
                        lj = tl.load(rows + HD + 1, mask=jm, other=0.0, cache_modifier=".cg")
                        aj = tl.load(rows[:, None] + d[None, :], mask=jm[:, None], other=0.0, cache_modifier=".cg")
                        M_new = tl.maximum(M, tl.max(mj, 0))
                        f = tl.where(jm, tl.exp(mj - M_new), 0.0)
                        alpha = tl.exp(M - M_new)
                        L = L * alpha + tl.sum(lj * f, 0)
                        ACC = ACC * alpha + tl.sum(aj * f[:, None], 0)
                        M = M_new
                    tl.store(out_ptr + h * HD + d, (ACC / L).to(out_ptr.dtype.element_ty))
                    tl.atomic_xchg(cnt_ptr + h, 0)

    @triton.jit
    def _argmax_part_kernel(x_ptr, val_ptr, idx_ptr, V, NPART, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
        """grid (rows, NPART): max and first index of the max of one BLOCK-wide slice of a row."""
        _pdl_start(USE_PDL)
        b = tl.program_id(0)
        c = tl.program_id(1)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + b * V + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m = tl.max(x, 0)
        i = tl.min(tl.where(x == m, offs, V), 0)
        tl.store(val_ptr + b * NPART + c, m)
        tl.store(idx_ptr + b * NPART + c, i)

    @triton.jit
    def _argmax_last_kernel(val_ptr, idx_ptr, out_ptr, pos_ptr, NPART, NP: tl.constexpr, ADVANCE: tl.constexpr):
        """grid (rows,): a row's argmax from its slices' maxima (the first slice holding the max, as torch's
        argmax), stored as int64; with ADVANCE, program 0 also adds 1 to the position at pos_ptr."""
        b = tl.program_id(0)
        c = tl.arange(0, NP)
        v = tl.load(val_ptr + b * NPART + c, mask=c < NPART, other=float("-inf"))
        j = tl.min(tl.where(v == tl.max(v, 0), c, NP), 0)
        tl.store(out_ptr + b, tl.load(idx_ptr + b * NPART + j).to(tl.int64))
        if ADVANCE:
            if b == 0:
                tl.store(pos_ptr, tl.load(pos_ptr) + 1)

    @triton.jit
    def _glu_kernel(x_ptr, out_ptr, F, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
        _pdl_start(USE_PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < F
        g = tl.load(x_ptr + offs, mask=m, other=0.0)
        u = tl.load(x_ptr + F + offs, mask=m, other=0.0)
        tl.store(out_ptr + offs, _glu(g, u, out_ptr.dtype.element_ty), mask=m)


def rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   window: int | None = None, partial: bool = False, bias: tuple | None = None) -> torch.Tensor:
    """One decode token's attention in one launch: rotate q [H*d] and k [KV*d] (cos/sin: [1, d] tables of the
    token's position), write rotated k and v into the caches [1, KV, max_len, d] at `pos` (int64 [1] device tensor,
    CUDA-graph safe), attend over cache positions < pos (and > pos - window) plus the token itself. Returns [H*d].
    With programmatic dependent launch on, `pos` and the cache rows before it are read before waiting for the
    previous kernel: they must have been written before the step's first PDL kernel (as in `Decoder.forward`, whose
    embedding and rotary-row kernels come first).

    `partial`: q, k, v are the q/k/v GEMV's fp32 partial sums (`sparse_gemv_segments(partial=)`), finished here:
    + `bias` (q's, k's, v's, or None), rounded to the cache's dtype."""
    hd = k_cache.shape[-1]
    n_q, n_kv = q.numel() // hd, k.numel() // hd
    assert k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride() and k_cache.shape[0] == 1
    has_bias = partial and bias is not None
    qb, kb, vb = bias if has_bias else (q, k, v)  # (unread without bias)
    extra = dict(qb_ptr=qb, kb_ptr=kb, vb_ptr=vb, PARTIAL=partial, HAS_BIAS=has_bias)
    out = torch.empty(q.shape, dtype=k_cache.dtype, device=q.device)
    per = min(ATTN_SPLIT, max(16, triton.next_power_of_2(k_cache.shape[2])))
    nsplit = triton.cdiv(k_cache.shape[2], per)
    ws, cnt = _attn_workspace(q.device, n_q, nsplit, hd)
    _rope_attention_kernel[(n_q, nsplit)](q, k, v, cos, sin, pos, k_cache, v_cache, out, ws, cnt, n_q // n_kv,
                                          nsplit, k_cache.stride(1), k_cache.stride(2), 1.0 / math.sqrt(hd),
                                          window or 0, HD=hd, P=per, NS_BLOCK=16, HAS_WINDOW=window is not None,
                                          num_warps=8 if per * hd >= 16384 else 4,
                                          **pdl_args(q.device, "attention"), **extra)
    return out


# Most cache positions per attention program (flash-decoding split over the context): caches up to this length
# take one program per head and no combine step; longer ones are split into programs of this many positions.
ATTN_SPLIT = 128
_ATTN_WS: dict = {}


def _attn_workspace(device, n_q: int, nsplit: int, hd: int):
    """Partials [n_q, nsplit, hd + 2] fp32 and per-head counters (left zeroed by every launch), cached."""
    key = (device, n_q, nsplit, hd)
    if key not in _ATTN_WS:
        _ATTN_WS[key] = (torch.empty(n_q * nsplit * (hd + 2), dtype=torch.float32, device=device),
                         torch.zeros(n_q, dtype=torch.int32, device=device))
    return _ATTN_WS[key]


def argmax_two_stage(logits: torch.Tensor, block: int = 4096, out: torch.Tensor | None = None,
                     advance: torch.Tensor | None = None) -> torch.Tensor:
    """argmax over [B, V] -> [B, 1] int64 (into `out` if given) in two launches (`block`-wide slices, then their
    maxima): first index of the max, as torch, for logits without NaN (torch would pick a NaN). `advance`: a
    position tensor [1] incremented by the second launch (the decode loop's step, without launches of its own)."""
    B, V = logits.shape
    npart = triton.cdiv(V, block)
    val = torch.empty(B, npart, dtype=torch.float32, device=logits.device)  # ties: the first slice, first index
    idx = torch.empty(B, npart, dtype=torch.int32, device=logits.device)
    if out is None:
        out = torch.empty(B, 1, dtype=torch.long, device=logits.device)
    assert out.dtype == torch.long and out.is_contiguous() and out.numel() == B
    _argmax_part_kernel[(B, npart)](logits, val, idx, V, npart, BLOCK=block, num_warps=8)
    _argmax_last_kernel[(B,)](val, idx, out, out if advance is None else advance, npart,
                              NP=triton.next_power_of_2(npart), ADVANCE=advance is not None, num_warps=1)
    return out


def glu(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [..., 2F] (gate | up), torch's roundings; one launch."""
    f = x.shape[-1] // 2
    assert x.numel() == 2 * f and x.is_contiguous(), "glu takes one row [gate | up]"
    out = torch.empty(f, dtype=x.dtype, device=x.device)
    _glu_kernel[(triton.cdiv(f, 1024),)](x, out, f, BLOCK=1024, num_warps=4, **pdl_args(x.device))
    return out
