// y = x @ W^T with W stored as int8 in blocks of 32 along the input, one float16 scale per block
// (llama.cpp's Q8_0 layout: 8.5 bits a weight):
//
//     W[n, k] = scales[n, k / 32] * q[n, k]
//
// Converting int8 weights to float32 for FMAs kept decode at ~12.6 GB/s, half this machine's
// bandwidth (docs/benchmarks.md), so products are summed as integers instead: each block of 32
// values of a row of x is rounded to int16 against its own float32 scale,
//
//     x[m, k] ~= dx[m, k / 32] * qx[m, k],   dx = max |x over the block| / 32767,
//
// which keeps x to 1 part in 65534 of its block's largest value (llama.cpp rounds x to int8 for
// Q8_0: most of Q8_0's KL, docs/benchmarks.md), and _mm256_madd_epi16 multiplies pairs of int16
// into int32 sums, exact over a block (at most 32 * 127 * 32767 < 2^31):
//
//     sum_k W[n, k] x[m, k] ~= sum_b scales[n, b] dx[m, b] sum_{k in b} q[n, k] qx[m, k]
//
// Output channels go in panels of 8, so that one 256-bit register holds two weights of each of 8
// channels and a broadcast of two values of x meets all eight in one instruction. Panel p (channels
// 8p..8p+7), block b is 256 bytes: sixteen runs of 16 bytes, run t holding in bytes 2c and 2c + 1
// the weights of channel 8p + c for inputs 32b + 2t and 32b + 2t + 1. Scales are (N, K/32) float16
// in the same order: panel p, block b's eight at [8 (p G + b), 8 (p G + b) + 8). qwen2/quant.py
// (to_panels) makes this layout from plain rows.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "panels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QWEN2_AVX2 1
#endif

namespace {

using qwen2::kBlock;

// T rows of rounded x against one panel (8 output channels), all blocks, written to
// y[r * y_stride + 0..7].
template <int T, class Out>
inline void panel_rows(const int8_t* panel, const c10::Half* scales, const int16_t* qx, const float* dx, int64_t K,
                       Out* y, int64_t y_stride) {
  const int64_t G = K / kBlock;
#ifdef QWEN2_AVX2
  __m256 acc[T];
  for (int r = 0; r < T; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < G; ++b) {
    const int8_t* pb = panel + b * 256;
    // Ahead of the hardware prefetcher's pace (measured on the float32 version: 10-13 % a step)
    for (int line = 0; line < 4; ++line) _mm_prefetch(reinterpret_cast<const char*>(pb + 8192 + 64 * line), _MM_HINT_T0);
    __m256i sums[T];
    for (int r = 0; r < T; ++r) sums[r] = _mm256_setzero_si256();
    for (int t = 0; t < 16; ++t) {
      const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pb + 16 * t)));
      for (int r = 0; r < T; ++r) {
        int32_t pair;  // inputs 2t and 2t + 1 of row r
        std::memcpy(&pair, qx + r * K + b * kBlock + 2 * t, 4);
        sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(w, _mm256_set1_epi32(pair)));
      }
    }
    const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + b * 8)));
    for (int r = 0; r < T; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), _mm256_mul_ps(scale, _mm256_set1_ps(dx[r * G + b])), acc[r]);
  }
  for (int r = 0; r < T; ++r) qwen2::store8(y + r * y_stride, acc[r]);
#else
  for (int r = 0; r < T; ++r) {
    float total[8] = {};
    for (int64_t b = 0; b < G; ++b) {
      const int8_t* pb = panel + b * 256;
      const int16_t* xb = qx + r * K + b * kBlock;
      for (int c = 0; c < 8; ++c) {
        int32_t sum = 0;
        for (int t = 0; t < 16; ++t) sum += pb[16 * t + 2 * c] * xb[2 * t] + pb[16 * t + 2 * c + 1] * xb[2 * t + 1];
        total[c] += static_cast<float>(sum) * (static_cast<float>(scales[b * 8 + c]) * dx[r * G + b]);
      }
    }
    for (int c = 0; c < 8; ++c) y[r * y_stride + c] = static_cast<Out>(total[c]);
  }
#endif
}

#ifdef QWEN2_AVX512
// T rows against panels p and p + 1 at once (AVX-512, panels.h): one 512-bit register holds two
// weights of each of 16 channels, and _mm512_dpwssd_epi32 multiplies pairs of int16 and adds them
// to the int32 sums in one instruction. The same exact sums and the same float32 operations in the
// same order as panel_rows: the results are identical.
template <int T, class Out>
inline void panel_pair_rows(const int8_t* panel, const c10::Half* scales, const int16_t* qx, const float* dx,
                            int64_t K, Out* y, int64_t y_stride) {
  const int64_t G = K / kBlock;
  const int8_t* next = panel + 8 * K;           // panel p + 1
  const c10::Half* next_scales = scales + 8 * G;
  __m512 acc[T];
#pragma GCC unroll 16
  for (int r = 0; r < T; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < G; ++b) {
    const int8_t *pa = panel + b * 256, *pb = next + b * 256;
    qwen2::prefetch_pair<4>(pa, pb, b * 256, 8192, 8 * K);  // as far ahead as panel_rows
    __m512i sums[T];
#pragma GCC unroll 16
    for (int r = 0; r < T; ++r) sums[r] = _mm512_setzero_si512();
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) {
      const __m512i w = _mm512_cvtepi8_epi16(qwen2::join16(pa + 16 * t, pb + 16 * t));
#pragma GCC unroll 16
      for (int r = 0; r < T; ++r) {
        int32_t pair;  // inputs 2t and 2t + 1 of row r
        std::memcpy(&pair, qx + r * K + b * kBlock + 2 * t, 4);
        sums[r] = _mm512_dpwssd_epi32(sums[r], w, _mm512_set1_epi32(pair));
      }
    }
    const __m512 scale = qwen2::widen_halves(scales + b * 8, next_scales + b * 8);
#pragma GCC unroll 16
    for (int r = 0; r < T; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r]), _mm512_mul_ps(scale, _mm512_set1_ps(dx[r * G + b])), acc[r]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < T; ++r) qwen2::store16(y + r * y_stride, acc[r]);
}
#endif

at::Tensor int8_block_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scales.dim() == 2, "int8_block_mm: x, q and scales must be 2-D");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), G = K / kBlock;
  TORCH_CHECK(q.size(1) == K && K % kBlock == 0 && N % 8 == 0, "int8_block_mm: q must be (N, ", K, ") with ", K,
              " divisible by ", kBlock, " and N by 8; got ", q.sizes());
  TORCH_CHECK(scales.size(0) == N && scales.size(1) == G, "int8_block_mm: scales must be (", N, ", ", G, "); got ",
              scales.sizes());
  TORCH_CHECK(q.scalar_type() == at::kChar && scales.scalar_type() == at::kHalf,
              "int8_block_mm: q must be int8 and scales float16");
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && scales.device().is_cpu(), "int8_block_mm: CPU only");
  const at::Tensor qc = q.contiguous(), sc = scales.contiguous();
  const int8_t* qp = qc.data_ptr<int8_t>();
  const c10::Half* sp = sc.data_ptr<c10::Half>();
  return qwen2::with_rows_of(x, N, [&](const auto* xp, auto* yp) {
    qwen2::Workspace work;
    int16_t* qxp = work.get<int16_t>(0, M * K);
    float* dxp = work.get<float>(1, M * G);
    qwen2::round_x_in_blocks(xp, qxp, dxp, static_cast<float*>(nullptr), M, K);
    const auto single = [&](auto tile, int64_t p, int64_t m) {
      panel_rows<decltype(tile)::value>(qp + p * 8 * K, sp + p * 8 * G, qxp + m * K, dxp + m * G, K,
                                        yp + m * N + 8 * p, N);
    };
#ifdef QWEN2_AVX512
    qwen2::for_each_panel_pair_tile(N, M, [&](auto tile, int64_t p, int64_t m) {
      panel_pair_rows<decltype(tile)::value>(qp + p * 8 * K, sp + p * 8 * G, qxp + m * K, dxp + m * G, K,
                                             yp + m * N + 8 * p, N);
    }, single);
#else
    qwen2::for_each_panel_tile(N, M, single);
#endif
  });
}

}  // namespace

std::string instruction_set() { return qwen2::instruction_set(); }

TORCH_LIBRARY_FRAGMENT(qwen2, m) {
  m.def("int8_block_mm(Tensor x, Tensor q, Tensor scales) -> Tensor");
  m.def("instruction_set() -> str", &instruction_set);
}

TORCH_LIBRARY_IMPL(qwen2, CPU, m) {
  m.impl("int8_block_mm", &int8_block_mm);
}
