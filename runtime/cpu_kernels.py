"""CPU sparse matvec: one C++ op that tests the threshold and accumulates only the active weight rows.

Decoding one token on the CPU is bound by memory bandwidth: a dense matvec streams the whole weight. Torch has no op
that reads just the rows of the active input channels without overheads of its own — `embedding_bag` with
per-sample weights reads them but runs one bag on one thread, gather + matmul copies them first, and the mask,
`nonzero` and indexing cost a few dispatches per call (docs/BENCHMARKS.md measures each). `sparse_matvec` does
the threshold test, the compaction and the accumulation in one call, over input-major weights, eight active rows at
a time so that several memory streams are in flight, into an accumulator that stays in L1. The intra-op threads
(`at::parallel_for`) split the output columns of long rows, or the active rows themselves when rows are short.

The op is compiled on first use with `torch.utils.cpp_extension.load_inline` (needs a C++ compiler and `ninja`;
the build is cached under `TORCH_EXTENSIONS_DIR`). `load()` returns None when it cannot be built, and the caller
falls back to `embedding_bag`.
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
            functions=["sparse_matvec"],
            extra_cflags=["-O3", "-march=native"],
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
