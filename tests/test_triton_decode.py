"""CPU tests (TRITON_INTERPRET=1) of the fused decode step: runtime/triton_decode.py kernels, the GEMV's fused
silu·mul and residual, and whole decode steps of a small Llama through `FusedDecodeStep` vs the plain path.

GPU correctness of the same paths (CUDA graphs, bf16, Llama-3-8B shapes) is checked by benchmarks/gpu_suite.py.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from wina.runtime import bench as wb  # noqa: E402
from wina.runtime import triton_decode as td  # noqa: E402
from wina.runtime import triton_kernels as tk  # noqa: E402
from wina.runtime.decode import teacher_forced_logits  # noqa: E402
from wina.runtime.kernels import FusedDecodeStep, disable_fast_path, enable_fast_path  # noqa: E402
from wina.runtime.model import apply_rope  # noqa: E402

if not tk.HAVE_TRITON or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):  # pragma: no cover
    pytest.skip("needs triton under TRITON_INTERPRET=1", allow_module_level=True)

H, KV, HD, L = 4, 2, 16, 24


def _qkv(dtype, g):
    return (torch.randn(H * HD, generator=g).to(dtype), torch.randn(KV * HD, generator=g).to(dtype),
            torch.randn(KV * HD, generator=g).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_cache_matches_reference(dtype):
    """Rotated q and the cache rows written at `pos` equal the torch reference; other cache rows are untouched."""
    g = torch.Generator().manual_seed(0)
    q, k, v = _qkv(dtype, g)
    ang = torch.rand(HD // 2, generator=g) * 6
    cos = torch.cat([ang.cos(), ang.cos()]).to(dtype).view(1, HD)
    sin = torch.cat([ang.sin(), ang.sin()]).to(dtype).view(1, HD)
    kc, vc = torch.randn(1, KV, L, HD).to(dtype), torch.randn(1, KV, L, HD).to(dtype)
    kc0, vc0 = kc.clone(), vc.clone()
    pos = torch.tensor([7])
    qr = td.rope_cache(q, k, v, cos, sin, pos, kc, vc)
    # fp32: bit for bit. bf16: the CPU interpreter truncates float->bf16 casts (the GPU rounds to nearest even like
    # torch), so allow the last two bits there (two products and a sum are rounded).
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=2**-6, atol=2**-6)
    torch.testing.assert_close(qr.view(H, HD), apply_rope(q.view(H, HD), cos, sin), **tol)
    torch.testing.assert_close(kc[0, :, 7], apply_rope(k.view(KV, HD), cos, sin), **tol)
    assert torch.equal(vc[0, :, 7], v.view(KV, HD))
    keep = torch.ones(L, dtype=torch.bool)
    keep[7] = False
    assert torch.equal(kc[:, :, keep], kc0[:, :, keep]) and torch.equal(vc[:, :, keep], vc0[:, :, keep])


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("p", [0, 9, L - 1])
def test_decode_attention_matches_sdpa(window, p):
    g = torch.Generator().manual_seed(p)
    q = torch.randn(H * HD, generator=g)
    kc, vc = torch.randn(1, KV, L, HD, generator=g), torch.randn(1, KV, L, HD, generator=g)
    y = td.decode_attention(q, kc, vc, torch.tensor([p]), window)
    j = torch.arange(L)
    allowed = (j <= p) & ((j > p - window) if window else True)
    ref = F.scaled_dot_product_attention(q.view(1, H, 1, HD), kc, vc, attn_mask=allowed.view(1, 1, 1, L),
                                         enable_gqa=True)
    torch.testing.assert_close(y.view(H, HD), ref.view(H, HD), rtol=1e-5, atol=1e-5)


def test_glu_matches_torch():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2 * 300, generator=g) * 3).to(torch.bfloat16)
    ref = F.silu(x[:300]) * x[300:]
    y = td.glu(x)
    assert (y.float() - ref.float()).abs().max().item() <= 1e-2 * ref.float().abs().max().item()


@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_fused_glu_and_residual(with_bias):
    """The down projection of the decode step: silu(gate)*up computed in the kernel, residual in its epilogue."""
    g = torch.Generator().manual_seed(2)
    K, N = 150, 70
    gu = torch.randn(1, 2 * K, generator=g)
    h = F.silu(gu[:, :K]) * gu[:, K:]
    w_t = torch.randn(K, N, generator=g) * 0.1
    scale = torch.rand(K, generator=g) + 0.5
    bias = torch.randn(N, generator=g) if with_bias else None
    res = torch.randn(1, N, generator=g)
    t = torch.quantile((h.abs() * scale).flatten(), 0.5)
    y = tk.sparse_gemv_segments(gu, w_t, t, (N,), scale.view(1, -1), bias, residual=res, glu=True,
                                config=dict(block_n=32, block_k=16, k_per_split=64, num_warps=1))
    ref = res + tk.reference_sparse_gemv(h, w_t, t, scale, bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


SMALL = dict(wb.LLAMA3_8B, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256)


class _Counting:
    """Wraps a decode step and records the calls it answered."""

    def __init__(self, step, calls: list) -> None:
        self.step, self.calls = step, calls

    def __call__(self, *args):
        y = self.step(*args)
        if y is not None:
            self.calls.append(1)
        return y


@pytest.mark.parametrize("sparse", [None, True])
def test_fused_decode_step_matches_plain_path(sparse):
    """Whole decode steps (dense and sparse at calibrated 50 % thresholds) through FusedDecodeStep equal the plain
    block path in fp32, and the fused step really ran on every block of every step."""
    hf = wb.synthetic_hf(SMALL, "cpu", torch.float32, layers=2)
    dec = wb.decoder_from_hf(hf)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    wb.set_sparsity(dec, wb.calibrate(dec, ids), 0.5)
    outs, calls = {}, []
    for fast in (False, True):
        if fast:
            assert enable_fast_path(dec, backend="triton")["decode_steps"] == 2
            for blk in dec.blocks:
                blk.decode_step = _Counting(blk.decode_step, calls)
        outs[fast] = teacher_forced_logits(dec, ids[:, :18], 14, sparse, use_graph=False)
    disable_fast_path(dec)
    assert len(calls) == 2 * 4
    assert all(blk.decode_step is None for blk in dec.blocks)
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-4, atol=1e-4)


def test_fused_decode_step_declines_other_calls():
    """Prefill (several tokens) and paper-mode masks are not decode steps: the block's plain path answers."""
    hf = wb.synthetic_hf(SMALL, "cpu", torch.float32, layers=1)
    dec = wb.decoder_from_hf(hf)
    enable_fast_path(dec, backend="triton")
    step = dec.blocks[0].decode_step
    assert isinstance(step, FusedDecodeStep)
    dec.setup_cache(1, 8)
    x = torch.randn(1, 3, 64)
    cos, sin = dec.rotary(torch.arange(3), x.dtype)
    assert step(x, cos, sin, torch.arange(3), True) is None
    x1 = torch.randn(1, 1, 64)
    assert step(x1, cos[:1], sin[:1], torch.tensor([0]), torch.ones(1, 1, dtype=torch.bool)) is None
    dec.clear_cache()
    assert step(x1, cos[:1], sin[:1], torch.tensor([0]), True) is None  # no cache
