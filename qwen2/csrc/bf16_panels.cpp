// y = x @ W^T with W bf16, summed in float32, for CPUs without bf16 math (no AVX-512 BF16, no AMX),
// where torch converts bf16 products as it goes, several times slower than float32
// (docs/benchmarks.md), and where a prompt's float32 copy of the weights cost more than its product.
//
// Output channels go in panels of 8: panel p (channels 8p..8p+7) is K runs of 8 bf16 weights, run k
// holding input k of each of the 8 channels, so that one load, widened to float32 by a shift,
// meets a broadcast of x[k] in one FMA for all eight. qwen2/upcast.py (to_panels) makes this layout.
// Rows of x go four at a time per panel (the panel's weights are widened once per four rows), each
// with two FMA chains side by side; a lone row (decode) gets eight.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "panels.h"

#include <algorithm>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QWEN2_AVX2 1
#endif

namespace {

constexpr int64_t kChains = 8;  // K must be a multiple: the most FMA chains a row gets

template <int T, class Out>
inline void panel_rows(const c10::BFloat16* panel, const float* x, int64_t K, Out* y, int64_t y_stride) {
#ifdef QWEN2_AVX2
  constexpr int A = T >= 4 ? 2 : T == 1 ? 8 : 4;
  // Loops over rows and chains are unrolled from the start (#pragma GCC unroll): unrolled only
  // late, GCC kept acc on the stack and stored it every step, and four rows cost 1.8x one row
  // instead of 1.0x (docs/benchmarks.md, fourteenth round).
  __m256 acc[T][A];
#pragma GCC unroll 4
  for (int r = 0; r < T; ++r)
#pragma GCC unroll 8
    for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += A) {
    const c10::BFloat16* run = panel + k * 8;
#pragma GCC unroll 4
    for (int line = 0; line < A / 4 + 1; ++line)  // 4 KB ahead (see int8_blocks.cpp)
      _mm_prefetch(reinterpret_cast<const char*>(run + 2048 + 32 * line), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int a = 0; a < A; ++a) {
      const __m256 w = qwen2::widen_bf16x8(run + 8 * a);
#pragma GCC unroll 4
      for (int r = 0; r < T; ++r) acc[r][a] = _mm256_fmadd_ps(w, _mm256_broadcast_ss(x + r * K + k + a), acc[r][a]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < T; ++r) {
    __m256 sum = acc[r][0];
#pragma GCC unroll 8
    for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[r][a]);
    qwen2::store8(y + r * y_stride, sum);
  }
#else
  for (int r = 0; r < T; ++r) {
    float total[8] = {};
    for (int64_t k = 0; k < K; ++k)
      for (int c = 0; c < 8; ++c) total[c] += static_cast<float>(panel[k * 8 + c]) * x[r * K + k];
    for (int c = 0; c < 8; ++c) y[r * y_stride + c] = static_cast<Out>(total[c]);
  }
#endif
}

at::Tensor bf16_panel_mm(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "bf16_panel_mm: x and w must be 2-D");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && K % kChains == 0 && N % 8 == 0, "bf16_panel_mm: w must be (N, ", K, ") with ", K,
              " divisible by ", kChains, " and N by 8; got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "bf16_panel_mm: w must be bfloat16");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "bf16_panel_mm: CPU only");
  const at::Tensor wc = w.contiguous();
  const c10::BFloat16* wp = wc.data_ptr<c10::BFloat16>();
  return qwen2::with_rows_of(x, N, [&](const auto* xp, auto* yp) {
    qwen2::Workspace work;
    const float* x32 = qwen2::as_float(xp, M * K, work);
    qwen2::for_each_panel_tile(N, M, [&](auto tile, int64_t p, int64_t m) {
      panel_rows<decltype(tile)::value>(wp + p * 8 * K, x32 + m * K, K, yp + m * N + 8 * p, N);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen2, m) {
  m.def("bf16_panel_mm(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwen2, CPU, m) {
  m.impl("bf16_panel_mm", &bf16_panel_mm);
}
