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
from wina.runtime.decode import DecodeRunner, teacher_forced_logits  # noqa: E402
from wina.runtime.kernels import FusedDecodeStep, disable_fast_path, enable_fast_path  # noqa: E402
from wina.runtime.model import apply_rope  # noqa: E402

if not tk.HAVE_TRITON or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):  # pragma: no cover
    pytest.skip("needs triton under TRITON_INTERPRET=1", allow_module_level=True)

H, KV, HD, L = 4, 2, 16, 24


def _qkv(dtype, g):
    return (torch.randn(H * HD, generator=g).to(dtype), torch.randn(KV * HD, generator=g).to(dtype),
            torch.randn(KV * HD, generator=g).to(dtype))


def _rope_tables(dtype, g):
    ang = torch.rand(HD // 2, generator=g) * 6
    cos = torch.cat([ang.cos(), ang.cos()]).to(dtype).view(1, HD)
    sin = torch.cat([ang.sin(), ang.sin()]).to(dtype).view(1, HD)
    return cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_attention_writes_rotated_cache_row(dtype):
    """The cache rows written at `pos` are rotated k and plain v (torch reference); other rows are untouched."""
    g = torch.Generator().manual_seed(0)
    q, k, v = _qkv(dtype, g)
    cos, sin = _rope_tables(dtype, g)
    kc, vc = torch.randn(1, KV, L, HD).to(dtype), torch.randn(1, KV, L, HD).to(dtype)
    kc0, vc0 = kc.clone(), vc.clone()
    td.rope_attention(q, k, v, cos, sin, torch.tensor([7]), kc, vc)
    # fp32: bit for bit. bf16: the CPU interpreter truncates float->bf16 casts (the GPU rounds to nearest even like
    # torch), so allow the last two bits there (two products and a sum are rounded).
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=2**-6, atol=2**-6)
    torch.testing.assert_close(kc[0, :, 7], apply_rope(k.view(KV, HD), cos, sin), **tol)
    assert torch.equal(vc[0, :, 7], v.view(KV, HD))
    keep = torch.ones(L, dtype=torch.bool)
    keep[7] = False
    assert torch.equal(kc[:, :, keep], kc0[:, :, keep]) and torch.equal(vc[:, :, keep], vc0[:, :, keep])


@pytest.mark.parametrize("window", [None, 5, 21])
@pytest.mark.parametrize("p,length", [(0, L), (9, L), (L - 1, L), (0, 100), (7, 100), (8, 100), (63, 100),
                                      (99, 100)])
def test_rope_attention_matches_sdpa(window, p, length, monkeypatch):
    """Attention of the rotated query over the cache rows before `pos` plus the token's own (rotated) k and v, as
    SDPA computes it over the updated cache with a causal (and sliding-window) mask. With 8 positions per program,
    the 100-row cache runs up to 13 splits whose partials are combined (split edges at 7/8, 63/64)."""
    monkeypatch.setattr(td, "ATTN_SPLIT", 8)
    g = torch.Generator().manual_seed(p)
    q, k, v = _qkv(torch.float32, g)
    cos, sin = _rope_tables(torch.float32, g)
    kc, vc = torch.randn(1, KV, length, HD, generator=g), torch.randn(1, KV, length, HD, generator=g)
    y = td.rope_attention(q, k, v, cos, sin, torch.tensor([p]), kc, vc, window)
    y2 = td.rope_attention(q, k, v, cos, sin, torch.tensor([p]), kc, vc, window)  # counters were left at zero
    assert torch.equal(y, y2)
    j = torch.arange(length)
    allowed = (j <= p) & ((j > p - window) if window else True)
    qr = apply_rope(q.view(H, HD), cos, sin)
    ref = F.scaled_dot_product_attention(qr.view(1, H, 1, HD), kc, vc, attn_mask=allowed.view(1, 1, 1, length),
                                         enable_gqa=True)
    torch.testing.assert_close(y.view(H, HD), ref.view(H, HD), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("teal", [False, True])
def test_gemv_fused_rmsnorm(teal):
    """`norm=`: the stream kernel's compaction launch, or each split-K program, computes RMSNorm(x) itself: same as
    the norm, then the kernel."""
    g = torch.Generator().manual_seed(4)
    K, seg = 96, (64, 32, 32)
    x = torch.randn(1, K, generator=g) * 3
    w_t = torch.randn(K, sum(seg), generator=g) * 0.1
    gain = torch.rand(K, generator=g) + 0.5
    scales = None if teal else torch.rand(len(seg), K, generator=g) + 0.5
    h = tk.rms_norm(x, gain, 1e-5)
    torch.testing.assert_close(h, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * gain)
    thr = torch.stack([torch.quantile((h.abs() * (1 if teal else scales[j])).flatten(), 0.5) for j in range(3)])
    ref = tk.reference_sparse_gemv_segments(h, w_t, thr, seg, scales)
    for cfg in (dict(algo="stream", block_n=32, rows=4, split=4, compact_ch=32),
                dict(block_n=32, block_k=16, k_per_split=32, num_warps=1),
                dict(block_n=32, block_k=16, k_per_split=64, num_warps=1, prefetch=True)):
        y = tk.sparse_gemv_segments(x, w_t, thr, seg, scales, norm=(gain, 1e-5), config=cfg)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("teal,with_bias", [(False, False), (True, True)])
def test_sparse_mlp_matches_reference(teal, with_bias):
    """`sparse_mlp`: norm + gate/up (stream) whose last programs compute silu·mul and list down's active channels,
    then down over exactly those rows + residual = the reference chain; twice (self-resetting counters and lists)."""
    g = torch.Generator().manual_seed(6)
    K, H, N = 96, 64, 80
    x = torch.randn(1, K, generator=g) * 3
    gain = torch.rand(K, generator=g) + 0.5
    w_gu = torch.randn(K, 2 * H, generator=g) * 0.1
    w_d = torch.randn(H, N, generator=g) * 0.1
    s_gu = None if teal else torch.rand(2, K, generator=g) + 0.5
    s_d = None if teal else torch.rand(H, generator=g) + 0.5
    bias = torch.randn(2 * H, generator=g) if with_bias else None
    res = torch.randn(1, N, generator=g)
    h = tk.rms_norm(x, gain, 1e-5)
    t_gu = torch.stack([torch.quantile((h.abs() * (1 if teal else s_gu[j])).flatten(), 0.5) for j in range(2)])
    gu = tk.reference_sparse_gemv_segments(h, w_gu, t_gu, (H, H), s_gu, bias)
    act = F.silu(gu[:, :H]) * gu[:, H:]
    t_d = torch.quantile((act.abs() * (1 if teal else s_d)).flatten(), 0.5).reshape(1)
    ref = res + tk.reference_sparse_gemv(act, w_d, t_d, s_d)
    for _ in range(2):
        y = tk.sparse_mlp(x, w_gu, t_gu, (H, H), s_gu, bias, (gain, 1e-5), w_d, t_d, s_d, res,
                          config=dict(algo="stream", block_n=16, rows=4, split=4, compact_ch=32),
                          down_config=dict(block_n=32, rows=4, split=4))
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # two launches (compaction, `_mlp_kernel`): the lists in chunks of 32 channels (3 per segment), programs of 16
    # channels, lists 4 rows a step, down 2 whole rows (80 columns in a block of 128) a step; twice (the done counter
    # and the workspace reset themselves)
    fused = dict(algo="fused", block_f=16, rows=4, rows_d=2, num_warps=4, compact_ch=32)
    for _ in range(2):
        y = tk.sparse_mlp(x, w_gu, t_gu, (H, H), s_gu, bias, (gain, 1e-5), w_d, t_d, s_d, res, config=fused)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # no active gate/up input: empty lists, gate/up = bias, down of silu(bias_g) * bias_u (or nothing at all)
    none = torch.full((2,), float("inf"))
    act0 = F.silu(gu[:, :H] * 0 + (0 if bias is None else bias[:H])) * (0 if bias is None else bias[H:])
    ref0 = res + tk.reference_sparse_gemv(act0, w_d, t_d, s_d)
    y = tk.sparse_mlp(x, w_gu, none, (H, H), s_gu, bias, (gain, 1e-5), w_d, t_d, s_d, res, config=fused)
    torch.testing.assert_close(y, ref0, rtol=1e-5, atol=1e-5)
    # a split-K gate/up config: not this path (the caller runs gate/up, then down with silu·mul inside)
    assert tk.sparse_mlp(x, w_gu, t_gu, (H, H), s_gu, bias, (gain, 1e-5), w_d, t_d, s_d, res,
                         config=dict(block_n=32, block_k=16, k_per_split=32)) is None


def test_partial_sums_handed_over():
    """`partial=`: a split-K GEMV leaves its fp32 sums for the next kernel, which finishes them exactly as the
    GEMV's own epilogue would (bias, rounding, residual): the attention (q/k/v), the MLP's compaction (o, then the
    MLP kernel zeroes them) and the RMSNorm (dense o, zeroing them itself); `clear=` zeroes another buffer."""
    g = torch.Generator().manual_seed(8)
    K, seg = 96, (H * HD, KV * HD, KV * HD)
    N = sum(seg)
    x = torch.randn(1, K, generator=g)
    w_t = torch.randn(K, N, generator=g) * 0.1
    bias = torch.randn(N, generator=g)
    gain = torch.rand(K, generator=g) + 0.5
    scales = torch.rand(3, K, generator=g) + 0.5
    h = tk.rms_norm(x, gain, 1e-5)
    thr = torch.stack([torch.quantile((h.abs() * scales[j]).flatten(), 0.5) for j in range(3)])
    cfg = dict(block_n=32, block_k=16, k_per_split=32, num_warps=1)
    p = torch.zeros(1, N)
    dirty = torch.randn(50, generator=g)
    assert tk.sparse_gemv_segments(x, w_t, thr, seg, scales, norm=(gain, 1e-5), config=cfg, partial=p,
                                   clear=dirty) is p
    torch.testing.assert_close(p, tk.reference_sparse_gemv_segments(h, w_t, thr, seg, scales), rtol=1e-5, atol=1e-5)
    assert not dirty.any()
    # the attention finishes q/k/v: + bias, then as from the finished output
    cos, sin = _rope_tables(torch.float32, g)
    kc, vc = torch.randn(1, KV, L, HD, generator=g), torch.randn(1, KV, L, HD, generator=g)
    kc2, vc2 = kc.clone(), vc.clone()
    y = td.rope_attention(*p.view(-1).split(seg), cos, sin, torch.tensor([9]), kc, vc, partial=True,
                          bias=bias.split(seg))
    ref = td.rope_attention(*(p + bias).view(-1).split(seg), cos, sin, torch.tensor([9]), kc2, vc2)
    assert torch.equal(y, ref) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
    # dense o's sums to the RMSNorm: x1 = x + (sums + bias), its norm, the sums zeroed
    po, bo = p[:, :K].clone(), bias[:K]
    x1, hn = tk.rms_norm(x, gain, 1e-5, pending=(po, bo))
    torch.testing.assert_close(x1, x + p[:, :K] + bo)
    torch.testing.assert_close(hn, tk.rms_norm(x1, gain, 1e-5))
    assert not po.any()
    # o's sums to the MLP in two launches: as `sparse_mlp` of x1 with x1 as residual; the MLP kernel zeroes them
    Fm = 64
    w_gu = torch.randn(K, 2 * Fm, generator=g) * 0.1
    w_d = torch.randn(Fm, K, generator=g) * 0.1
    t_gu, t_d = torch.tensor([0.3, 0.3]), torch.tensor([0.05])
    fused = dict(algo="fused", block_f=16, rows=4, rows_d=2, num_warps=4, compact_ch=32)
    ref = tk.sparse_mlp(x1, w_gu, t_gu, (Fm, Fm), None, None, (gain, 1e-5), w_d, t_d, None, x1, config=fused)
    po = p[:, :K].clone()
    y = tk.sparse_mlp(x, w_gu, t_gu, (Fm, Fm), None, None, (gain, 1e-5), w_d, t_d, None, None, config=fused,
                      pending=(po, bo))
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    assert not po.any()


def test_two_stage_argmax_matches_torch():
    """The decode loop's greedy token on CUDA: first index of the max, as torch.argmax, also across slices and for
    ties (a tie inside one slice, and across two slices)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1000, generator=g).to(torch.bfloat16)
    x[1, 5] = x[1, 700] = 9.0  # tie across slices
    x[2, 300] = x[2, 301] = 9.0  # tie inside a slice
    got = td.argmax_two_stage(x, block=256)
    assert torch.equal(got, x.argmax(-1, keepdim=True)) and got[1, 0] == 5 and got[2, 0] == 300
    # as the decode loop calls it: into its token buffer, its position advanced by one in the same launches
    tok, pos = torch.zeros(3, 1, dtype=torch.long), torch.tensor([7])
    assert td.argmax_two_stage(x, block=256, out=tok, advance=pos) is tok
    assert torch.equal(tok, got) and pos.item() == 8


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


@pytest.mark.parametrize("sparse,stream,fused_mlp", [(None, False, False), (True, False, False), (True, True, False),
                                                     (True, True, True), (True, "gate_up", True)])
def test_fused_decode_step_matches_plain_path(sparse, stream, fused_mlp, monkeypatch):
    """Whole decode steps (dense and sparse at calibrated 50 % thresholds) through FusedDecodeStep equal the plain
    block path in fp32, and the fused step really ran on every block of every step. `stream`: q/k/v and gate/up (or
    gate/up only, as on the GPU) run the stream kernel with the RMSNorm fused into its compaction launch; otherwise
    the split-K kernel with the norm computed in each program (dense: over every row for o and down). With stream,
    sparse, the MLP takes `sparse_mlp`: in three launches (down streams the channels gate/up's last programs
    listed), or with `fused_mlp` in two (compaction, then `_mlp_kernel`; gate/up then never streams). Split-K
    GEMVs hand their partial sums over (`HAND_OVER`): dense, o's to the RMSNorm; sparse with the MLP in two launches
    and a split-K q/k/v (the GPU's path), also q/k/v's to the attention and o's to the compaction."""
    monkeypatch.setattr(tk, "MLP_FUSED", dict(algo="fused", block_f=32, rows=4, rows_d=2, num_warps=4)
                        if fused_mlp else None)
    hf = wb.synthetic_hf(SMALL, "cpu", torch.float32, layers=2)
    dec = wb.decoder_from_hf(hf)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    wb.set_sparsity(dec, wb.calibrate(dec, ids), 0.5)
    monkeypatch.setattr(td, "ATTN_SPLIT", 8)  # a 22-position cache: attention over up to 3 splits
    if stream:
        monkeypatch.setattr(tk, "TUNED", {})
        d, f = SMALL["hidden_size"], SMALL["intermediate_size"]
        kv = d // SMALL["num_attention_heads"] * SMALL["num_key_value_heads"]
        for seg in ((d, kv, kv), (f, f))[1 if stream == "gate_up" else 0:]:
            tk.set_tuned(1, d, sum(seg), seg, dict(algo="stream", block_n=32, rows=4, split=2), variant="norm")
    streamed, mlps = [], []
    real_stream, real_mlp = tk._stream_gemv, tk.sparse_mlp
    monkeypatch.setattr(tk, "_stream_gemv", lambda *a, **k: streamed.append(a[8] is not None) or real_stream(*a, **k))

    def mlp(*a, **k):
        y = real_mlp(*a, **k)
        mlps.append(y is not None)
        return y

    monkeypatch.setattr(tk, "sparse_mlp", mlp)
    handed = []
    real_partial = tk.partial_buffer
    monkeypatch.setattr(tk, "partial_buffer", lambda *a: handed.append(a[1]) or real_partial(*a))
    outs, calls = {}, []
    for fast in (False, True):
        if fast:
            assert enable_fast_path(dec, backend="triton")["decode_steps"] == 2
            for blk in dec.blocks:
                blk.decode_step = _Counting(blk.decode_step, calls)
        outs[fast] = teacher_forced_logits(dec, ids[:, :18], 14, sparse, use_graph=False)
    disable_fast_path(dec)
    assert len(calls) == 2 * 4
    # q/k/v and gate/up (unless the fused MLP takes it), normed, 2 blocks, 4 steps
    per_block = (stream != "gate_up") + (not (sparse and fused_mlp))
    assert streamed == ([True] * per_block * 2 * 4 if stream else [])
    # sparse: `sparse_mlp` answers where gate/up's config streams (in two launches with fused_mlp, else three)
    assert mlps == ([bool(stream)] * 2 * 4 if sparse else [])
    hand_over = ["o"] if not sparse else ["o", "qkv"] if fused_mlp and stream == "gate_up" else []
    assert handed == hand_over * 2 * 4
    assert all(blk.decode_step is None for blk in dec.blocks)
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-4, atol=1e-4)


def test_layer_chain_runs_the_decode_steps_linears_on_real_data(monkeypatch):
    """`bench.linears_only` (what `bench.layer_chain` times on the GPU): the decode step with each block's attention
    answering the output it recorded in a real step, on the GPU's path (split-K q/k/v handing its sums to the
    attention, the MLP in two launches). Sparse, the chain gives that real step's logits bit for bit; dense, it runs
    the dense kernels on the same inputs. It leaves the hand-over buffers zeroed and the blocks their own steps."""
    monkeypatch.setattr(tk, "MLP_FUSED", dict(algo="fused", block_f=32, rows=4, rows_d=2, num_warps=4))
    monkeypatch.setattr(tk, "TUNED", {})
    d, f = SMALL["hidden_size"], SMALL["intermediate_size"]
    tk.set_tuned(1, d, 2 * f, (f, f), dict(algo="stream", block_n=32, rows=4, split=2), variant="norm")
    monkeypatch.setattr(td, "ATTN_SPLIT", 8)
    hf = wb.synthetic_hf(SMALL, "cpu", torch.float32, layers=3)
    dec = wb.decoder_from_hf(hf)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    wb.set_sparsity(dec, wb.calibrate(dec, ids), 0.5)
    enable_fast_path(dec, backend="triton")
    own = [blk.decode_step for blk in dec.blocks]
    r = DecodeRunner(dec, 1, ids.shape[1] + 2, sparse=True, use_graph=False)
    r.prefill(ids)
    r.step()
    real = r.logits
    r.close()
    with torch.no_grad(), wb.linears_only(dec, ids) as chain:
        steps = [blk.decode_step for blk in dec.blocks]
        assert all(isinstance(st, wb._WithoutAttention) for st in steps)
        assert torch.equal(dec.lm_head(dec.norm(chain(True)))[:, -1], real)
        x = steps[0].inputs[0]
        for st in steps:
            x = st(x, *st.inputs[1:], None)
        dense = chain(None)
        assert torch.equal(dense, x) and not torch.equal(dense, chain(True))
        assert all(not p.any() for p in tk._PARTIAL_CACHE.values())
    assert [blk.decode_step for blk in dec.blocks] == own
    assert dec.max_cache_len == 0
    disable_fast_path(dec)
    with wb.linears_only(dec, ids) as chain:
        assert chain is None


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


def test_decode_step_launches_less_with_the_same_results(monkeypatch):
    """Per-token work outside the blocks: the rotary row read from a table built with the cache (CUDA; forced onto
    the CPU here) and the attention mask built only if a block's plain path asks for it give the same logits as the
    plain computation; the fused decode step never builds the mask."""
    hf = wb.synthetic_hf(SMALL, "cpu", torch.float32, layers=2)
    dec = wb.decoder_from_hf(hf)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    ref = teacher_forced_logits(dec, ids, 6, None, use_graph=False)
    built, real_mask = [], dec._mask
    monkeypatch.setattr(dec, "_mask", lambda *a: built.append(1) or real_mask(*a))
    monkeypatch.setattr(type(dec.rotary), "TABLE_DEVICES", ("cpu",))
    dec.setup_cache(1, 16)
    assert dec.rotary.table.shape == (2, 16, dec.cfg.head_dim)
    dec.clear_cache()
    assert dec.rotary.table is None
    assert torch.equal(teacher_forced_logits(dec, ids, 6, None, use_graph=False), ref)
    assert len(built) == 1 + 6  # prefill, then one per decode step: the plain path asks for it
    built.clear()
    enable_fast_path(dec, backend="triton")
    fast = teacher_forced_logits(dec, ids, 6, None, use_graph=False)
    disable_fast_path(dec)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert len(built) == 1  # the prefill only
