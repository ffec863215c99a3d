"""Fast paths (runtime/kernels.py, the two-phase Triton kernel, the decode runner) vs the reference sparse path.

Small random Llama on CPU; Triton kernels under TRITON_INTERPRET=1. GPU timing lives in benchmarks/gpu_suite.py.
"""

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from wina.runtime import bench as wb
from wina.runtime import cpu_kernels
from wina.runtime.decode import teacher_forced_logits, time_decode
from wina.runtime.kernels import (
    FastRMSNorm,
    FusedSparseLinear,
    disable_fast_path,
    enable_fast_path,
    refresh_fast_path,
)

SMALL = dict(wb.LLAMA3_8B, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256)


@pytest.fixture(scope="module")
def tiny():
    hf = wb.synthetic_hf(SMALL, "cpu", torch.float32, layers=2)
    dec = wb.decoder_from_hf(hf)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    tables = wb.calibrate(dec, ids)
    wb.set_sparsity(dec, tables, 0.5)
    return hf, dec, ids


def _decode_logits(dec, ids, steps=3):
    return teacher_forced_logits(dec, ids[:, : 8 + steps], 8)


def test_dense_logits_exact_vs_transformers(tiny):
    hf, dec, ids = tiny
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, dec(ids))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fast_path_matches_reference(tiny, backend):
    pytest.importorskip("triton")
    _, dec, ids = tiny
    ref = _decode_logits(dec, ids)
    summary = enable_fast_path(dec, backend=backend, cpu_autotune=False)
    try:
        assert summary["sparse_kernels"] > 0
        # whole decode blocks: the Triton one always, the CPU one where its C++ ops build
        assert summary["decode_steps"] == (2 if backend == "triton" or cpu_kernels.load() is not None else 0)
        if backend == "triton":
            assert isinstance(dec.blocks[0].attn.qkv, FusedSparseLinear)
            assert isinstance(dec.blocks[0].attn_norm, FastRMSNorm)
        y = _decode_logits(dec, ids)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        # dense calls never take the fast path: exact
        with torch.no_grad():
            d = dec(ids)
        disable_fast_path(dec)
        with torch.no_grad():
            assert torch.allclose(dec(ids), d, rtol=1e-5, atol=1e-5)
    finally:
        disable_fast_path(dec)
    assert dec.blocks[0].attn.qkv is None and dec.blocks[0].attn.q.kernel is None


def test_refresh_after_method_change(tiny):
    """refresh_fast_path (what WinaModel.set_sparsity calls) keeps the input-major weights and updates the fused
    kernels' scales: after WINA -> TEAL the fast decode equals the reference decode at the TEAL thresholds."""
    pytest.importorskip("triton")
    _, dec, ids = tiny
    saved = {n: (lin.threshold_value, lin.use_col_norm) for n, lin in dec.sparse_linears().items()}
    try:
        wb.set_sparsity(dec, wb.calibrate(dec, ids, method="teal"), 0.5, method="teal")
        ref = _decode_logits(dec, ids)
        for n, lin in dec.sparse_linears().items():
            lin.set_threshold(*saved[n])
        enable_fast_path(dec, backend="triton", cpu_autotune=False)
        qkv = dec.blocks[0].attn.qkv
        w_t = qkv.w_t
        assert qkv._scales is not None  # WINA
        wb.set_sparsity(dec, wb.calibrate(dec, ids, method="teal"), 0.5, method="teal")
        refresh_fast_path(dec)
        assert qkv._scales is None and dec.blocks[0].attn.qkv is qkv and qkv.w_t is w_t
        torch.testing.assert_close(_decode_logits(dec, ids), ref, rtol=1e-4, atol=1e-4)
    finally:
        disable_fast_path(dec)
        for n, lin in dec.sparse_linears().items():
            lin.set_threshold(*saved[n])


def test_meter_bypasses_fast_path(tiny):
    """Measured sparsity keeps using the reference path (the kernel hook is skipped while a meter is attached)."""
    from wina.runtime.sparse import SparsityMeter

    _, dec, ids = tiny
    enable_fast_path(dec, backend="cpu", cpu_autotune=False)
    try:
        meter = SparsityMeter()
        for lin in dec.sparse_linears().values():
            lin.meter = meter
        _decode_logits(dec, ids, steps=1)
        s = meter.by_matrix()
        assert len(s) == len(dec.sparse_linears()) and all(0.2 < v < 0.8 for v in s.values())
    finally:
        for lin in dec.sparse_linears().values():
            lin.meter = None
        disable_fast_path(dec)


def test_time_decode_and_matrix_bench(tiny):
    _, dec, ids = tiny
    r = time_decode(dec, ids[:, :8], 3, sparse=True)
    assert r["tok_s"] > 0 and r["ids"].shape == (1, 3)
    enable_fast_path(dec, backend="cpu", cpu_autotune=False)
    try:
        mb = wb.matrix_bench(dec, (0.0, 0.5))
    finally:
        disable_fast_path(dec)
    assert set(mb["matrices"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert mb["layer"]["0.5"]["ideal_us"] == pytest.approx(0.5 * mb["layer"]["0.5"]["dense_us"])


def test_ablation_sets_runtime_settings_for_one_run(monkeypatch):
    """gpu_suite's --ablate: a triton_kernels NAME or 'module.[Class.]NAME' in wina.runtime holds its value for one
    timed decode and is restored afterwards; an unknown name is refused before anything runs."""
    from wina.runtime import model
    from wina.runtime import triton_decode as td
    from wina.runtime import triton_kernels as tk

    seen = []

    def e2e(*args, **kwargs):
        seen.append((td.ATTN_SPLIT, tk.PDL_LATE, model.Rotary.TABLE_DEVICES))
        return {"dense_tok_s": 1.0, "sparse_tok_s": 2.0, "sparse_over_dense": 2.0}

    monkeypatch.setattr(wb, "e2e", e2e)
    before = (td.ATTN_SPLIT, tk.PDL_LATE, model.Rotary.TABLE_DEVICES)
    settings = {"triton_decode.ATTN_SPLIT": 64, "PDL_LATE": {"qkv"}, "model.Rotary.TABLE_DEVICES": ()}
    r = wb._ablation(None, None, 1, 1, lambda *a: None, "x", **settings)
    assert seen == [(64, {"qkv"}, ())] and r["sparse_over_dense"] == 2.0
    assert (td.ATTN_SPLIT, tk.PDL_LATE, model.Rotary.TABLE_DEVICES) == before
    with pytest.raises(AttributeError, match="no setting triton_decode.ATTN_SPLITS"):
        wb._ablation(None, None, 1, 1, lambda *a: None, "y", **{"triton_decode.ATTN_SPLITS": 1})
    assert len(seen) == 1


def test_profile_layer_reading():
    """gpu_profile's in-context per-layer reading (run CE's profile, µs per token over 32 layers): the kernels of every
    layer but the attention, per layer; dense's RMSNorms counted apart; the LM head (one call) left out."""
    path = Path(__file__).parents[1] / "benchmarks" / "gpu_profile.py"
    spec = importlib.util.spec_from_file_location("gpu_profile", path)
    gp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gp)

    def prof(*rows):
        return {"kernels": [{"name": n, "calls_per_token": c, "effective_us_per_token": us} for n, c, us in rows]}

    dense = prof(("nvjet_gate_up", 32, 1874.5), ("_sparse_gemv_kernel", 64, 1462.8), ("nvjet_qkv", 32, 506.3),
                 ("nvjet_lm_head", 1, 248.2), ("_rope_attention_kernel", 32, 131.2), ("_rmsnorm_kernel", 65, 93.6))
    sparse = prof(("_mlp_kernel", 32, 1584.2), ("_sparse_gemv_kernel", 64, 515.3), ("nvjet_lm_head", 1, 248.4),
                  ("_compact_kernel", 32, 134.0), ("_rope_attention_kernel", 32, 128.9), ("_rmsnorm_kernel", 1, 1.3))
    r = gp.layer_reading(dense, sparse, 32)
    assert r["dense_us"] == pytest.approx((1874.5 + 1462.8 + 506.3) / 32)
    assert r["dense_with_norms_us"] == pytest.approx((1874.5 + 1462.8 + 506.3 + 93.6) / 32)
    assert r["sparse_us"] == pytest.approx((1584.2 + 515.3 + 134.0) / 32)
    assert r["sparse_over_ideal"] == pytest.approx(1.162, abs=1e-3)
    assert r["sparse_over_ideal_with_norms"] == pytest.approx(1.134, abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seg,ch,split", [((96,), 64, 1), ((64, 32, 32), 64, 3), ((48, 48), 256, 2)])
@pytest.mark.parametrize("with_scale", [True, False])
def test_stream_kernel(dtype, seg, ch, split, with_scale):
    tk = pytest.importorskip("wina.runtime.triton_kernels")
    g = torch.Generator().manual_seed(len(seg) + split)
    K, N = 150, sum(seg)
    x = torch.randn(1, K, generator=g).to(dtype)
    w = (torch.randn(K, N, generator=g) * 0.1).to(dtype)
    sc = torch.rand(len(seg), K, generator=g) + 0.5 if with_scale else None
    thr = torch.tensor([0.5, 0.9, 0.2][: len(seg)])
    b = torch.randn(N, generator=g).to(dtype)
    cfg = dict(algo="stream", block_n=32, rows=16, split=split, compact_ch=ch)
    y = tk.sparse_gemv_segments(x, w, thr, seg, sc, b, config=cfg)
    ref = tk.reference_sparse_gemv_segments(x.float(), w.float(), thr, seg, sc, b.float())
    if not with_scale:  # torch rounds the threshold to x.dtype: use the low-precision mask
        ref = tk.reference_sparse_gemv_segments(x, w.float(), thr, seg, None, b.float()) if dtype == torch.float32 else \
            torch.cat([torch.where(x.abs() >= t, x, torch.zeros((), dtype=dtype)).float() @ ws.float()
                       for t, ws in zip(thr, w.split(list(seg), 1))], -1) + b.float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (y.float() - ref).abs().max().item() <= tol * (1 + ref.abs().max().item())


def test_rms_norm_kernel():
    tk = pytest.importorskip("wina.runtime.triton_kernels")
    from wina.runtime.model import RMSNorm

    n = RMSNorm(100, 1e-5)
    n.weight.data = torch.rand(100) + 0.5
    x = torch.randn(3, 1, 100)
    torch.testing.assert_close(tk.rms_norm(x, n.weight, 1e-5), n(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (64, 48)])
@pytest.mark.parametrize("with_scale", [True, False])
def test_cpu_sparse_matvec_matches_reference(shape, with_scale):
    """The C++ op (both thread splits: long and short rows) == the reference: same mask, fp32 sums."""
    import shutil

    from wina.runtime import cpu_kernels
    from wina.runtime.sparse import reference_sparse_linear

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the embedding_bag fallback runs (tested below)")
    assert cpu_kernels.load() is not None, cpu_kernels.failure()
    k, n = shape
    g = torch.Generator().manual_seed(k + n)
    w, x, bias = torch.randn(n, k, generator=g), torch.randn(k, generator=g), torch.randn(n, generator=g)
    scale = torch.rand(k, generator=g) + 0.5 if with_scale else None
    t = float(((x.abs() * scale) if with_scale else x.abs()).median())
    want, keep = reference_sparse_linear(x[None], w, bias, torch.tensor(t), scale, True)
    assert 0.4 < keep.float().mean() < 0.6
    for threads in (1, 2):
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            got = cpu_kernels.sparse_matvec(x, w.t().contiguous(), scale, t, bias)
        finally:
            torch.set_num_threads(saved)
        torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-4)


def test_cpu_ops_use_the_intra_op_threads():
    """The C++ ops split their work over torch's intra-op threads: at::parallel_for needs the extension compiled
    with OpenMP, without which it silently runs on one thread (as it did until session 13)."""
    ops = cpu_kernels.load()
    if ops is None:
        pytest.skip(f"C++ ops not built: {cpu_kernels.failure()}")
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert ops.parallel_threads() == threads
    finally:
        torch.set_num_threads(saved)


def test_cpu_embedding_bag_fallback_matches_reference(tiny):
    """Where the C++ op cannot be built, embedding_bag answers: the same decode logits."""
    from wina.runtime.kernels import _CpuKernel

    _, dec, ids = tiny
    ref = _decode_logits(dec, ids)
    enable_fast_path(dec, backend="cpu", cpu_autotune=False)
    try:
        for lin in dec.sparse_linears().values():
            assert isinstance(lin.kernel, _CpuKernel)
            lin.kernel.native = None
        torch.testing.assert_close(_decode_logits(dec, ids), ref, rtol=1e-4, atol=1e-4)
    finally:
        disable_fast_path(dec)


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("pos", [0, 9, 600])
def test_cpu_decode_ops_match_torch(window, pos):
    """The C++ ops of CpuDecodeStep vs runtime/model.py's torch code: RMSNorm, silu·mul, and rope + cache write +
    attention (GQA, sliding window; 600 positions take the multi-threaded path)."""
    import torch.nn.functional as F

    from wina.runtime.model import RMSNorm, apply_rope

    ops = cpu_kernels.load()
    if ops is None:
        pytest.skip(f"C++ ops not built: {cpu_kernels.failure()}")
    g = torch.Generator().manual_seed(pos + window)
    n = RMSNorm(48, 1e-5)
    n.weight.data = torch.rand(48, generator=g) + 0.5
    x = torch.randn(48, generator=g) * 3
    torch.testing.assert_close(ops.rms_norm(x, n.weight, 1e-5), n(x), rtol=1e-5, atol=1e-6)
    gu = torch.randn(2, 200, generator=g) * 3
    torch.testing.assert_close(ops.glu(gu[0], gu[1]), F.silu(gu[0]) * gu[1], rtol=1e-5, atol=1e-6)

    H, KV, HD, L = 6, 2, 16, 640
    q, k, v = torch.randn(H * HD, generator=g), torch.randn(KV * HD, generator=g), torch.randn(KV * HD, generator=g)
    ang = torch.rand(HD // 2, generator=g) * 6
    cos = torch.cat([ang.cos(), ang.cos()]).view(1, HD)
    sin = torch.cat([ang.sin(), ang.sin()]).view(1, HD)
    kc, vc = torch.randn(1, KV, L, HD, generator=g), torch.randn(1, KV, L, HD, generator=g)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    y = ops.rope_attention(q, k, v, cos, sin, torch.tensor([pos]), kc, vc, window)
    kc_ref[0, :, pos] = apply_rope(k.view(KV, HD), cos, sin)
    vc_ref[0, :, pos] = v.view(KV, HD)
    torch.testing.assert_close(kc, kc_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(vc, vc_ref)
    j = torch.arange(L)
    allowed = (j <= pos) & ((j > pos - window) if window else True)
    qr = apply_rope(q.view(H, HD), cos, sin).view(1, H, 1, HD)
    want = F.scaled_dot_product_attention(qr, kc_ref, vc_ref, attn_mask=allowed.view(1, 1, 1, L), enable_gqa=True)
    torch.testing.assert_close(y.view(H, HD), want.view(H, HD), rtol=1e-5, atol=1e-5)
