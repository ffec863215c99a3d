"""CPU tests of runtime/triton_kernels.py under the Triton interpreter (TRITON_INTERPRET=1).

GPU correctness + timing live in benchmarks/gpu_kernels.py.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

import pytest
import torch

pytest.importorskip("triton")

from wina.runtime import triton_kernels as tk  # noqa: E402

if not tk.HAVE_TRITON:  # pragma: no cover
    pytest.skip("triton not importable", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)

DEV = "cuda" if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"


def _threshold(x, scale, s):
    v = x.float().abs() * (1.0 if scale is None else scale)
    return torch.quantile(v.flatten(), s) if s > 0 else torch.zeros(())


def _check(y, x, w_t, ref):
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = (y.float() - ref).abs().max().item()
    big = ref.abs().max().item()
    if x.dtype == torch.float32:
        tol = 1e-4 * big + 1e-5
    else:
        tol = 1.5e-2 * big + 1e-2
    assert err <= tol, f"max err {err} > tol {tol}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("with_scale,with_bias", [(False, False), (True, False), (True, True), (False, True)])
def test_sparse_gemv_matches_reference(dtype, B, s, with_scale, with_bias):
    g = torch.Generator().manual_seed(1 + B + int(10 * s))
    K, N = 200, 96
    x = torch.randn(B, K, generator=g).to(dtype)
    w_t = (torch.randn(K, N, generator=g) * 0.1).to(dtype)
    scale = torch.rand(K, generator=g) + 0.5 if with_scale else None
    bias = torch.randn(N, generator=g).to(dtype) if with_bias else None
    t = _threshold(x, scale, s)
    y = tk.sparse_gemv(x, w_t, t, scale, bias)
    ref = tk.reference_sparse_gemv(x.float(), w_t.float(), t, scale, None if bias is None else bias.float())
    # the fp32 reference uses the same mask as the low-precision one when scale is given;
    # without scale torch rounds t to x.dtype first: use the exact low-precision mask
    if scale is None:
        xm = torch.where(x.abs() >= t, x, torch.zeros((), dtype=dtype)).float()
        ref = xm @ w_t.float() + (0 if bias is None else bias.float())
    _check(y, x, w_t, ref)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(block_n=32, block_k=16, k_per_split=64, num_warps=1),  # split-K, atomics path
        dict(block_n=64, block_k=32, k_per_split=512, num_warps=2),  # no split
        dict(block_n=32, block_k=16, k_per_split=48, prefetch=True),  # pipelined loop
        dict(block_n=32, block_k=16, k_per_split=64, use_dot=False),  # B>1 without tl.dot
        dict(block_n=32, block_k=16, k_per_split=64, num_stages=3, evict=True),
    ],
)
@pytest.mark.parametrize("B", [1, 3])
def test_configs(cfg, B):
    g = torch.Generator().manual_seed(7)
    K, N = 150, 80  # ragged K and N
    x = torch.randn(B, K, generator=g).to(torch.bfloat16)
    w_t = (torch.randn(K, N, generator=g) * 0.1).to(torch.bfloat16)
    scale = torch.rand(K, generator=g) + 0.5
    bias = torch.randn(N, generator=g).to(torch.bfloat16)
    t = _threshold(x, scale, 0.5)
    y = tk.sparse_gemv(x, w_t, t, scale, bias, config=cfg)
    ref = tk.reference_sparse_gemv(x.float(), w_t.float(), t, scale, bias.float())
    _check(y, x, w_t, ref)
    # repeated launches reuse the self-resetting workspace
    y2 = tk.sparse_gemv(x, w_t, t, scale, bias, config=cfg)
    assert torch.equal(y, y2)


def test_early_first_rows_same_bits(monkeypatch):
    """`EARLY_ROWS`: a program that reads its first step's weight rows before knowing which are active (inactive ones
    then meet x = 0) gives the same bits as one that reads only active rows: with and without the hand-written
    prefetch, a K slice not a multiple of the step, the fused norm + residual and the dense (every row) variant."""
    g = torch.Generator().manual_seed(1)
    K, N = 256, 192
    x = torch.randn(1, K, generator=g).to(torch.bfloat16)
    w_t = (torch.randn(K, N, generator=g) * 0.1).to(torch.bfloat16)
    sc = torch.rand(3, K, generator=g) + 0.5
    thr = torch.tensor([0.6, 0.7, 0.8])
    gain = (torch.rand(K, generator=g) + 0.5).to(torch.bfloat16)
    res = torch.randn(1, N, generator=g).to(torch.bfloat16)

    def runs():
        out = []
        for cfg in (dict(block_n=32, block_k=16, k_per_split=64, num_warps=1, prefetch=True),
                    dict(block_n=32, block_k=16, k_per_split=64, num_warps=1),
                    dict(block_n=64, block_k=32, k_per_split=96, num_warps=1)):
            out.append(tk.sparse_gemv_segments(x, w_t, thr, (64, 64, 64), sc, config=cfg))
            out.append(tk.sparse_gemv_segments(x, w_t, thr, (64, 64, 64), sc, config=cfg, norm=(gain, 1e-5),
                                               residual=res))
            out.append(tk.sparse_gemv_segments(x, w_t, thr, (64, 64, 64), None, config=cfg, all_rows=True))
        return out

    monkeypatch.setattr(tk, "EARLY_ROWS", frozenset({"qkv", "gemv"}))
    early = runs()
    monkeypatch.setattr(tk, "EARLY_ROWS", frozenset())
    late = runs()
    assert all(torch.equal(a, b) for a, b in zip(early, late))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_is_exact(dtype):
    """y = masked x exactly when w_t = I: checks >= at the boundary and torch's promotion."""
    g = torch.Generator().manual_seed(3)
    K = 128
    x = torch.randn(2, K, generator=g).to(dtype)
    w_t = torch.eye(K, dtype=dtype)
    scale = torch.full((K,), 0.5)  # power of two: |x| * scale is exact
    # threshold equal to one of the |x| * scale values: that channel must be kept
    t = (x[0, 5].float().abs() * 0.5).reshape(())
    y = tk.sparse_gemv(x, w_t, t, scale)
    ref = torch.where(x.abs() * scale >= t, x, torch.zeros((), dtype=dtype))
    assert torch.equal(y, ref)
    assert y[0, 5] == x[0, 5]
    # TEAL: fp32 threshold between two bf16 values -> torch rounds t to x.dtype
    t2 = torch.tensor(float(x[1, 9].float().abs()) * (1 + 2**-12))
    y = tk.sparse_gemv(x, w_t, t2)
    ref = torch.where(x.abs() >= t2, x, torch.zeros((), dtype=dtype))
    assert torch.equal(y, ref)
    # python float threshold and 1-D x
    y1 = tk.sparse_gemv(x[0], w_t, 0.3)
    assert y1.shape == (K,)
    assert torch.equal(y1, torch.where(x[0].abs() >= 0.3, x[0], torch.zeros((), dtype=dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("seg_sizes", [(64, 32, 32), (48, 80), (96,)])
@pytest.mark.parametrize("with_scale", [True, False])
def test_segments(dtype, B, seg_sizes, with_scale):
    g = torch.Generator().manual_seed(11 + B)
    K, N = 192, sum(seg_sizes)
    nseg = len(seg_sizes)
    x = torch.randn(B, K, generator=g).to(dtype)
    w_t = (torch.randn(K, N, generator=g) * 0.1).to(dtype)
    scales = torch.rand(nseg, K, generator=g) + 0.5 if with_scale else None
    bias = torch.randn(N, generator=g).to(dtype)
    sparsities = [0.0, 0.5, 0.9][:nseg]
    thr = torch.stack([
        _threshold(x, None if scales is None else scales[j], sparsities[j]) for j in range(nseg)
    ])
    y = tk.sparse_gemv_segments(x, w_t, thr, seg_sizes, scales, bias)
    assert y.shape == (B, N)
    refs = []
    start = 0
    for j, n in enumerate(seg_sizes):
        if scales is None:
            xm = torch.where(x.abs() >= thr[j], x, torch.zeros((), dtype=dtype)).float()
        else:
            xm = torch.where(x.float().abs() * scales[j] >= thr[j], x.float(), 0.0)
        refs.append(xm @ w_t[:, start:start + n].float() + bias[start:start + n].float())
        start += n
    _check(y, x, w_t, torch.cat(refs, -1))
    # segment j of the fused call equals the single-projection call
    j = nseg - 1
    start = sum(seg_sizes[:j])
    yj = tk.sparse_gemv(x, w_t[:, start:].contiguous(), thr[j],
                        None if scales is None else scales[j], bias[start:])
    _check(yj, x, w_t, refs[j])


def test_shared_scale_and_scalar_threshold():
    g = torch.Generator().manual_seed(5)
    K, N = 64, 64
    x = torch.randn(1, K, generator=g)
    w_t = torch.randn(K, N, generator=g)
    scale = torch.rand(K, generator=g) + 0.5
    y = tk.sparse_gemv_segments(x, w_t, 0.7, (32, 32), scale)  # [K] scale and scalar t shared
    ref = tk.reference_sparse_gemv(x, w_t, 0.7, scale)
    _check(y, x, w_t, ref)


def test_bad_segments():
    x = torch.randn(1, 64)
    w_t = torch.randn(64, 40)
    with pytest.raises(ValueError):
        tk.sparse_gemv_segments(x, w_t, torch.zeros(2), (20, 20))
