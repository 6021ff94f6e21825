// y = x @ W^T + bias with W bf16 in its plain (N, K) order and x bf16, on CPUs that multiply bf16
// themselves (AVX-512 BF16): the decode, verification and short-prompt products of a bf16 model.
//
// A decode step reads every weight once and does little else, so it runs at the memory's pace only
// if the product streams the weights and nothing more; torch's bf16 product (oneDNN) reached 22-26 GB/s
// for one row of x where this kernel streams ~40 GB/s, and Inductor's pre-packed oneDNN product keeps a
// second, packed copy of the weights (docs/benchmarks.md, sixteenth round). Here each output channel is
// one dot product along the weights' row: _mm512_dpbf16_ps multiplies 32 pairs of bf16 exactly and adds
// them to 16 float32 sums, four channels at a time (four streams of the weights, one after another in
// memory), each against up to kDotRows rows of x (a decode step; a speculative verification), or a
// short prompt's rows kDotRows at a time. More rows (a prompt past kTiledRows) are compute-bound,
// where oneDNN's blocked GEMM is the faster one: those go to at::linear, so the one operator serves
// every row count and the weights keep one (plain) copy.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define QWEN2_BF16_DOT 1
#endif

namespace {

// Rows of x a call takes through the dot products: a decode step's one per sequence, and the engine's
// speculative verifications (qwen2/steps.py: VERIFY_WIDTH 4, WIDE_VERIFY_WIDTH 9).
constexpr int64_t kDotRows = 9;
// Up to here a short prompt's rows go through the dot products too, kDotRows at a time against weights
// the first tile brought into cache; past it oneDNN's blocked GEMM is faster. Over the 0.5B model's
// layers (715 MB): 10 rows 20 ms against oneDNN's 31, 16 rows 26 / 33, 24 rows 35 / 39, 32 rows
// 48 / 46 (docs/benchmarks.md, seventeenth round).
constexpr int64_t kTiledRows = 24;
constexpr int64_t kStep = 32;     // inputs one instruction takes: K must be a multiple
constexpr int64_t kChannels = 4;  // output channels at once (four streams of the weights): N must be a multiple
// One or two rows of x: the hardware prefetcher follows the four streams on its own (a software
// prefetch made one row's pass over the 0.5B model's weights 15-20 % slower; two channels at once or
// eight were slower too). Three rows and more do 3-9x the multiplies per byte, and with the prefetcher
// alone four rows took 2.0-2.2x one row's time; prefetching each stream 1 KB ahead (to L1) and 16 KB
// ahead (to L2) brings four rows to ~1.15x and nine to ~1.25x (docs/benchmarks.md, seventeenth round).
constexpr int kPrefetchFromRows = 3;
constexpr int64_t kNearAhead = 1024, kFarAhead = 16384;  // bytes

#ifdef QWEN2_BF16_DOT
// The four channels' sums at once, [sum a[0], .., sum a[3]]: three rounds of adds across the four
// registers (10 instructions) in place of four separate reductions (~32).
inline __m128 sum_each(const __m512 a[4]) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
  // each 128-bit lane: [a0, a1, a2, a3], partial sums of that lane's elements
  const __m512 lanes = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(lanes), _mm512_extractf32x8_ps(lanes, 1));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// Channels [n, n + kChannels) of T rows of x, to the same rows of y (rows N apart).
template <int T>
inline void dot_group(const c10::BFloat16* w, const c10::BFloat16* x, const c10::BFloat16* bias, int64_t K, int64_t N,
                      int64_t n, c10::BFloat16* y) {
  const c10::BFloat16* row = w + n * K;  // kChannels rows of K, one after another
  __m512 acc[T][kChannels];
#pragma GCC unroll 16
  for (int r = 0; r < T; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < kChannels; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kStep) {
    __m512bh weights[kChannels];
#pragma GCC unroll 4
    for (int c = 0; c < kChannels; ++c) {
      const char* at = reinterpret_cast<const char*>(row + c * K + k);
      if constexpr (T >= kPrefetchFromRows) {
        _mm_prefetch(at + kNearAhead, _MM_HINT_T0);
        _mm_prefetch(at + kFarAhead, _MM_HINT_T1);
      }
      weights[c] = (__m512bh)_mm512_loadu_si512(at);
    }
#pragma GCC unroll 16
    for (int r = 0; r < T; ++r) {
      const __m512bh xs = (__m512bh)_mm512_loadu_si512(x + r * K + k);
#pragma GCC unroll 4
      for (int c = 0; c < kChannels; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], weights[c], xs);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < T; ++r) {
    alignas(16) float sums[kChannels];
    _mm_store_ps(sums, sum_each(acc[r]));
#pragma GCC unroll 4
    for (int c = 0; c < kChannels; ++c)
      y[r * N + n + c] = c10::BFloat16(sums[c] + (bias ? static_cast<float>(bias[n + c]) : 0.f));
  }
}

// body(std::integral_constant<int, M>) for M = 1..kDotRows: the row count as a template argument.
template <int T = kDotRows, class Body>
inline void with_row_count(int64_t M, const Body& body) {
  if constexpr (T > 0) {
    if (M == T) return body(std::integral_constant<int, T>{});
    with_row_count<T - 1>(M, body);
  }
}

// Channels [n0, n1) (multiples of kChannels) of all M rows of x. Past kDotRows rows (a short prompt),
// each group of channels meets the rows kDotRows at a time, its weights read from memory by the
// first tile and from cache by the others.
void dot_rows(int64_t M, const c10::BFloat16* w, const c10::BFloat16* x, const c10::BFloat16* bias, int64_t K,
              int64_t N, int64_t n0, int64_t n1, c10::BFloat16* y) {
  if (M <= kDotRows) {  // one tile: its row count picked once for the range, not per group of channels
    with_row_count(M, [&](auto rows) {
      for (int64_t n = n0; n < n1; n += kChannels) dot_group<decltype(rows)::value>(w, x, bias, K, N, n, y);
    });
    return;
  }
  for (int64_t n = n0; n < n1; n += kChannels)
    for (int64_t r = 0; r < M; r += kDotRows)
      with_row_count(std::min(kDotRows, M - r), [&](auto rows) {
        dot_group<decltype(rows)::value>(w, x + r * K, bias, K, N, n, y + r * N);
      });
}
#endif

bool dot_fits(const at::Tensor& x, const at::Tensor& w) {
#ifdef QWEN2_BF16_DOT
  return x.dim() == 2 && w.dim() == 2 && x.size(0) <= kTiledRows && x.size(1) == w.size(1) && w.size(1) % kStep == 0 &&
         w.size(0) % kChannels == 0 && x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 &&
         x.device().is_cpu() && w.device().is_cpu();
#else
  return false;
#endif
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "bf16_linear: x must be (M, K) and w (N, K); got ",
              x.sizes(), " and ", w.sizes());
  if (!dot_fits(x, w) || (bias && (bias->scalar_type() != at::kBFloat16 || bias->numel() != w.size(0)))) {
    return at::linear(x, w, bias);
  }
#ifdef QWEN2_BF16_DOT
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, xc.options());
  const c10::BFloat16 *xp = xc.data_ptr<c10::BFloat16>(), *wp = wc.data_ptr<c10::BFloat16>();
  const c10::BFloat16* bp = bias ? bc.data_ptr<c10::BFloat16>() : nullptr;
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  at::parallel_for(0, N / kChannels, 16, [&](int64_t begin, int64_t end) {
    dot_rows(M, wp, xp, bp, K, N, begin * kChannels, end * kChannels, yp);
  });
  return y;
#else
  return at::linear(x, w, bias);
#endif
}

bool bf16_dot_available() {
#ifdef QWEN2_BF16_DOT
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen2, m) {
  m.def("bf16_linear(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  m.def("bf16_dot_available() -> bool", &bf16_dot_available);
}

TORCH_LIBRARY_IMPL(qwen2, CPU, m) {
  m.impl("bf16_linear", &bf16_linear);
}
