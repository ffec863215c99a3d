"""CPU sparse matvec: one C++ op that tests the threshold and accumulates only the active weight rows; and the
non-linear rest of a decode step (RMSNorm, rope + KV-cache write + attention, silu·mul) as one op each.

Decoding one token on the CPU is bound by memory bandwidth: a dense matvec streams the whole weight. Torch has no op
that reads just the rows of the active input channels without overheads of its own — `embedding_bag` with
per-sample weights reads them but runs one bag on one thread, gather + matmul copies them first, and the mask,
`nonzero` and indexing cost a few dispatches per call (docs/BENCHMARKS.md measures each). `sparse_matvec` does
the threshold test, the compaction and the accumulation in one call, over input-major weights, eight active rows at
a time so that several memory streams are in flight, into an accumulator that stays in L1. The intra-op threads
(`at::parallel_for`) split the output columns of long rows, or the active rows themselves when rows are short.

The op is compiled on first use with `torch.utils.cpp_extension.load_inline` (needs a C++ compiler with OpenMP and
`ninja`; the build is cached under `TORCH_EXTENSIONS_DIR`). `load()` returns None when it cannot be built, and the
caller falls back to `embedding_bag`.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

// o[0:len] += sum_r xs[r] * rows[r][c0 : c0 + len], eight rows at a time so that eight memory streams are in
// flight (the rows of active channels are not adjacent: the hardware prefetcher restarts at each one).
static void accumulate(const float* const* rows, const float* xs, int64_t n, int64_t c0, int64_t len, float* o) {
  int64_t r = 0;
  for (; r + 8 <= n; r += 8) {
    const float* __restrict__ w0 = rows[r] + c0;
    const float* __restrict__ w1 = rows[r + 1] + c0;
    const float* __restrict__ w2 = rows[r + 2] + c0;
    const float* __restrict__ w3 = rows[r + 3] + c0;
    const float* __restrict__ w4 = rows[r + 4] + c0;
    const float* __restrict__ w5 = rows[r + 5] + c0;
    const float* __restrict__ w6 = rows[r + 6] + c0;
    const float* __restrict__ w7 = rows[r + 7] + c0;
    const float a0 = xs[r], a1 = xs[r + 1], a2 = xs[r + 2], a3 = xs[r + 3];
    const float a4 = xs[r + 4], a5 = xs[r + 5], a6 = xs[r + 6], a7 = xs[r + 7];
    for (int64_t c = 0; c < len; ++c)
      o[c] += (a0 * w0[c] + a1 * w1[c] + a2 * w2[c] + a3 * w3[c]) + (a4 * w4[c] + a5 * w5[c] + a6 * w6[c] + a7 * w7[c]);
  }
  for (; r < n; ++r) {
    const float* __restrict__ w0 = rows[r] + c0;
    const float a0 = xs[r];
    for (int64_t c = 0; c < len; ++c) o[c] += a0 * w0[c];
  }
}

// y = where(|x| * scale >= threshold, x, 0) @ w_t (+ bias): x [K] f32, w_t [K, N] f32 input-major, scale [K] or
// empty (TEAL), threshold rounded to f32 as torch compares an f32 tensor with a Python float.
torch::Tensor sparse_matvec(const torch::Tensor& x, const torch::Tensor& w_t, const torch::Tensor& scale,
                            double threshold, const torch::Tensor& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w_t.scalar_type() == at::kFloat, "sparse_matvec: float32 only");
  TORCH_CHECK(x.is_contiguous() && w_t.is_contiguous() && w_t.dim() == 2 && x.numel() == w_t.size(0),
              "sparse_matvec: x [K] and contiguous w_t [K, N]");
  const int64_t K = w_t.size(0), N = w_t.size(1);
  const float* xp = x.data_ptr<float>();
  const float* sp = scale.numel() ? scale.data_ptr<float>() : nullptr;
  const float t = static_cast<float>(threshold);
  std::vector<const float*> rows;
  std::vector<float> xs;
  rows.reserve(K);
  xs.reserve(K);
  const float* wp = w_t.data_ptr<float>();
  for (int64_t i = 0; i < K; ++i) {
    float s = std::fabs(xp[i]);
    if (sp) s *= sp[i];
    if (s >= t) {
      rows.push_back(wp + i * N);
      xs.push_back(xp[i]);
    }
  }
  auto y = torch::zeros({N}, x.options());
  float* yp = y.data_ptr<float>();
  const int64_t n = static_cast<int64_t>(rows.size());
  const int threads = at::get_num_threads();
  if (threads > 1 && N < 1024) {
    // Short rows (e.g. down_proj, N = hidden): split the active rows instead, so each thread streams whole rows,
    // into its own accumulator; the partial sums are added at the end.
    std::vector<float> part(static_cast<size_t>(threads) * N, 0.0f);
    const int64_t per = (n + threads - 1) / threads;
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t tid = t0; tid < t1; ++tid)
        accumulate(rows.data() + tid * per, xs.data() + tid * per, std::max<int64_t>(0, std::min(per, n - tid * per)),
                   0, N, part.data() + tid * N);
    });
    for (int tid = 0; tid < threads; ++tid)
      for (int64_t c = 0; c < N; ++c) yp[c] += part[tid * N + c];
  } else {
    at::parallel_for(0, N, 128, [&](int64_t c0, int64_t c1) {
      accumulate(rows.data(), xs.data(), n, c0, c1 - c0, yp + c0);
    });
  }
  if (bias.numel()) y.add_(bias);
  return y;
}

// How many threads at::parallel_for runs the ops on (each chunk counts itself): 1 when the extension was compiled
// without OpenMP, whose pragma inside at::parallel_for is then ignored.
int64_t parallel_threads() {
  std::atomic<int64_t> n{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { n += 1; });
  return n.load();
}

// ---- the rest of one decode step (runtime/kernels.py CpuDecodeStep): one call each instead of ~10 torch ops ----

// weight * (x * rsqrt(mean(x^2) + eps)), fp32 (runtime.model.RMSNorm for float32 models).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && w.numel() == x.numel(), "rms_norm: x [D] f32");
  const int64_t D = x.numel();
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float ss = 0.0f;
  for (int64_t i = 0; i < D; ++i) ss += xp[i] * xp[i];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
  auto y = torch::empty({D}, x.options());
  float* yp = y.data_ptr<float>();
  for (int64_t i = 0; i < D; ++i) yp[i] = wp[i] * (xp[i] * r);
  return y;
}

// silu(g) * u for one token (the MLP's down-projection input).
torch::Tensor glu(const torch::Tensor& g, const torch::Tensor& u) {
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.is_contiguous() && u.is_contiguous() && g.numel() == u.numel(),
              "glu: g, u [F] f32");
  const int64_t F = g.numel();
  const float* gp = g.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  auto y = torch::empty({F}, g.options());
  float* yp = y.data_ptr<float>();
  for (int64_t i = 0; i < F; ++i) yp[i] = gp[i] / (1.0f + std::exp(-gp[i])) * up[i];
  return y;
}

// out[d] = x[d] * cos[d] + rotate_half(x)[d] * sin[d] (transformers' rope) for one head of hd values.
static void rope(const float* x, const float* c, const float* s, int64_t hd, float* out) {
  const int64_t half = hd / 2;
  for (int64_t d = 0; d < half; ++d) out[d] = x[d] * c[d] + (-x[d + half]) * s[d];
  for (int64_t d = half; d < hd; ++d) out[d] = x[d] * c[d] + x[d - half] * s[d];
}

// One query token: rotate q [H*hd] and k [KV*hd] at position pos, write k and v into the caches [1, KV, L, hd]
// at pos, and return softmax(q K^T / sqrt(hd)) V over cache positions (pos - window, pos] ([H*hd]; window 0: all).
torch::Tensor rope_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& pos_t,
                             const torch::Tensor& kc, const torch::Tensor& vc, int64_t window) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && kc.scalar_type() == at::kFloat && kc.dim() == 4 && kc.size(0) == 1,
              "rope_attention: f32, caches [1, KV, L, hd]");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && cos.is_contiguous() &&
              sin.is_contiguous() && kc.is_contiguous() && vc.is_contiguous(), "rope_attention: contiguous inputs");
  const int64_t KV = kc.size(1), L = kc.size(2), hd = kc.size(3), H = q.numel() / hd, group = H / KV;
  const int64_t pos = pos_t.item<int64_t>();
  TORCH_CHECK(pos >= 0 && pos < L, "rope_attention: position outside the cache");
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  float* kcp = kc.data_ptr<float>();
  float* vcp = vc.data_ptr<float>();
  for (int64_t j = 0; j < KV; ++j) {
    rope(k.data_ptr<float>() + j * hd, c, s, hd, kcp + (j * L + pos) * hd);
    std::copy(v.data_ptr<float>() + j * hd, v.data_ptr<float>() + (j + 1) * hd, vcp + (j * L + pos) * hd);
  }
  const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  auto y = torch::zeros({H * hd}, q.options());
  float* yp = y.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  at::parallel_for(0, H, (pos - lo) < 512 ? H : 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> qr(hd), p(pos - lo + 1);
    for (int64_t h = h0; h < h1; ++h) {
      rope(qp + h * hd, c, s, hd, qr.data());
      const float* kb = kcp + (h / group) * L * hd;
      const float* vb = vcp + (h / group) * L * hd;
      float m = -INFINITY;
      for (int64_t t = lo; t <= pos; ++t) {
        float acc = 0.0f;
        for (int64_t d = 0; d < hd; ++d) acc += qr[d] * kb[t * hd + d];
        p[t - lo] = acc * scale;
        m = std::max(m, p[t - lo]);
      }
      float sum = 0.0f;
      for (int64_t t = lo; t <= pos; ++t) sum += (p[t - lo] = std::exp(p[t - lo] - m));
      float* out = yp + h * hd;
      for (int64_t t = lo; t <= pos; ++t) {
        const float a = p[t - lo] / sum;
        for (int64_t d = 0; d < hd; ++d) out[d] += a * vb[t * hd + d];
      }
    }
  });
  return y;
}
"""

_module: ModuleType | None = None
_failed: str | None = None


def load() -> ModuleType | None:
    """The compiled op module, building it on first call; None (reason in `failure()`) where it cannot be built."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    try:
        from torch.utils.cpp_extension import load_inline

        _module = load_inline(
            name="wina_cpu_sparse",
            cpp_sources=_SOURCE,
            functions=["sparse_matvec", "parallel_threads", "rms_norm", "glu", "rope_attention"],
            # -fopenmp: at::parallel_for is a header template whose threads come from an OpenMP pragma; compiled
            # without it the op runs on one thread (it did until session 13: docs/BENCHMARKS.md, CPU). The
            # extension then links the libgomp.so.1 torch has already loaded, so both share one thread pool.
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, ...: the embedding_bag path runs instead
        _failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning("wina: CPU sparse kernel not built (%s); using embedding_bag", _failed)
    return _module


def failure() -> str | None:
    return _failed


NONE = torch.empty(0)  # the op's "no scale" (TEAL) / "no bias"


def sparse_matvec(x: torch.Tensor, w_t: torch.Tensor, scale: torch.Tensor | None, threshold: float,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """where(|x| * scale >= threshold, x, 0) @ w_t (+ bias) for one token x [K]; w_t [K, N] fp32 contiguous."""
    mod = load()
    assert mod is not None, failure()
    return mod.sparse_matvec(x, w_t, NONE if scale is None else scale, float(threshold),
                             NONE if bias is None else bias)
