// y = x @ W^T with W stored as int4 in blocks of 32 along the input, each block with a float16
// scale and a float16 minimum (llama.cpp's Q4_1 layout: 5 bits a weight):
//
//     W[n, k] = scales[n, k / 32] * q[n, k] + mins[n, k / 32],   q in [0, 15]
//
// Output channels go in panels of 8, so that one 256-bit register holds four levels of each of 8
// channels and a broadcast of four values of x meets all eight in one instruction (the layout of
// llama.cpp's repacked Q4_0 GEMM). Panel p (channels 8p..8p+7), block b is 128 bytes: four runs of
// 32 bytes, run s holding in byte 4c + j (channel 8p + c, j < 4) the level of input 32b + 8s + j in
// its low nibble and of input 32b + 8s + 4 + j in its high nibble. Scales and minimums are (N, K/32)
// float16 in the same order: panel p, block b's eight at [8 (p G + b), 8 (p G + b) + 8).
//
// Converting nibbles to float32 costs more than reading them (measured: a float32 version of this
// kernel was only 5-10 % faster than torch's int4 kernel), so, as llama.cpp does, x is rounded too:
// each block of 32 values of a row of x to int8 against its own float32 scale,
//
//     x[m, k] ~= dx[m, k / 32] * qx[m, k],   dx = max |x over the block| / 127,
//
// and a block's products are summed as integers: _mm256_maddubs_epi16 multiplies the four levels of
// each of a panel's 8 channels by four values of x (unsigned levels times signed x, pairs summed
// into int16: at most 2 * 15 * 127, no saturation), 32 products an instruction:
//
//     sum_k W[n, k] x[m, k] ~= sum_b scales[n, b] dx[m, b] sum_{k in b} q[n, k] qx[m, k]
//                              + sum_b mins[n, b] xsum[m, b]
//
// where xsum is the exact float32 sum of x over the block (llama.cpp uses dx * sum qx).
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "panels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QWEN2_AVX2 1
#endif

namespace {

using qwen2::kBlock;

#ifdef QWEN2_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#endif

// T rows of quantized x against panel `panel` (8 output channels), all blocks, written to
// y[r * y_stride + 0..7]. Within a block, products of levels (<= 15) and x (|qx| <= 127) are
// summed as int16 over its 32 inputs (at most 8 * 2 * 15 * 127 = 30480: no overflow), then to
// int32 and float once per block.
template <int T, class Out>
inline void panel_rows(const uint8_t* panel, const c10::Half* scales, const c10::Half* mins, const int8_t* qx,
                       const float* dx, const float* xsum, int64_t K, Out* y, int64_t y_stride) {
  const int64_t G = K / kBlock;
#ifdef QWEN2_AVX2
  __m256 acc[T];
  for (int r = 0; r < T; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < G; ++b) {
    const uint8_t* pb = panel + b * 128;
    _mm_prefetch(reinterpret_cast<const char*>(pb + 4096), _MM_HINT_T0);  // see int8_blocks.cpp
    _mm_prefetch(reinterpret_cast<const char*>(pb + 4096 + 64), _MM_HINT_T0);
    __m256i sums[T];
    for (int r = 0; r < T; ++r) sums[r] = _mm256_setzero_si256();
    for (int s = 0; s < 4; ++s) {
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + 32 * s));
      const __m256i first = _mm256_and_si256(bytes, low4), second = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
      for (int r = 0; r < T; ++r) {
        const int8_t* xs = qx + r * K + b * kBlock + 8 * s;
        int32_t x0, x1;
        std::memcpy(&x0, xs, 4), std::memcpy(&x1, xs + 4, 4);
        sums[r] = _mm256_add_epi16(sums[r], _mm256_maddubs_epi16(first, _mm256_set1_epi32(x0)));
        sums[r] = _mm256_add_epi16(sums[r], _mm256_maddubs_epi16(second, _mm256_set1_epi32(x1)));
        qwen2::keep_in_register(sums[r]);
      }
    }
    const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + b * 8)));
    const __m256 minimum = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + b * 8)));
    for (int r = 0; r < T; ++r) {
      const __m256 dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(sums[r], ones));
      acc[r] = _mm256_fmadd_ps(dots, _mm256_mul_ps(scale, _mm256_set1_ps(dx[r * G + b])), acc[r]);
      acc[r] = _mm256_fmadd_ps(minimum, _mm256_set1_ps(xsum[r * G + b]), acc[r]);
    }
  }
  for (int r = 0; r < T; ++r) qwen2::store8(y + r * y_stride, acc[r]);
#else
  for (int r = 0; r < T; ++r) {
    float total[8] = {};
    for (int64_t b = 0; b < G; ++b) {
      const uint8_t* pb = panel + b * 128;
      const int8_t* xb = qx + r * K + b * kBlock;
      for (int c = 0; c < 8; ++c) {
        int32_t sum = 0;
        for (int s = 0; s < 4; ++s)
          for (int j = 0; j < 4; ++j) {
            const uint8_t byte = pb[32 * s + 4 * c + j];
            sum += (byte & 15) * xb[8 * s + j] + (byte >> 4) * xb[8 * s + 4 + j];
          }
        total[c] += static_cast<float>(sum) * static_cast<float>(scales[b * 8 + c]) * dx[r * G + b]
                    + static_cast<float>(mins[b * 8 + c]) * xsum[r * G + b];
      }
    }
    for (int c = 0; c < 8; ++c) y[r * y_stride + c] = static_cast<Out>(total[c]);
  }
#endif
}

#ifdef QWEN2_AVX512
// T rows against panels p and p + 1 at once (AVX-512, panels.h): one 512-bit register holds four
// levels of each of 16 channels, and _mm512_dpbusd_epi32 multiplies four levels by four values of x
// and adds them to an int32 sum in one instruction (panel_rows: two, and a widening per block). The
// integer sums are exact either way and the float32 operations are panel_rows' in its order: the
// results are identical.
template <int T, class Out>
inline void panel_pair_rows(const uint8_t* panel, const c10::Half* scales, const c10::Half* mins, const int8_t* qx,
                            const float* dx, const float* xsum, int64_t K, Out* y, int64_t y_stride) {
  const int64_t G = K / kBlock;
  const uint8_t* next = panel + 8 * (K / 2);  // panel p + 1
  const c10::Half *next_scales = scales + 8 * G, *next_mins = mins + 8 * G;
  __m512 acc[T];
#pragma GCC unroll 16
  for (int r = 0; r < T; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(15);
  for (int64_t b = 0; b < G; ++b) {
    const uint8_t *pa = panel + b * 128, *pb = next + b * 128;
    qwen2::prefetch_pair<2>(pa, pb, b * 128, 4096, 4 * K);  // as far ahead as panel_rows
    __m512i sums[T];
#pragma GCC unroll 16
    for (int r = 0; r < T; ++r) sums[r] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      const __m512i bytes = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pa + 32 * s))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + 32 * s)), 1);
      const __m512i first = _mm512_and_si512(bytes, low4), second = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
#pragma GCC unroll 16
      for (int r = 0; r < T; ++r) {
        const int8_t* xs = qx + r * K + b * kBlock + 8 * s;
        int32_t x0, x1;
        std::memcpy(&x0, xs, 4), std::memcpy(&x1, xs + 4, 4);
        sums[r] = _mm512_dpbusd_epi32(sums[r], first, _mm512_set1_epi32(x0));
        sums[r] = _mm512_dpbusd_epi32(sums[r], second, _mm512_set1_epi32(x1));
      }
    }
    const __m512 scale = qwen2::widen_halves(scales + b * 8, next_scales + b * 8);
    const __m512 minimum = qwen2::widen_halves(mins + b * 8, next_mins + b * 8);
#pragma GCC unroll 16
    for (int r = 0; r < T; ++r) {
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r]), _mm512_mul_ps(scale, _mm512_set1_ps(dx[r * G + b])), acc[r]);
      acc[r] = _mm512_fmadd_ps(minimum, _mm512_set1_ps(xsum[r * G + b]), acc[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < T; ++r) qwen2::store16(y + r * y_stride, acc[r]);
}
#endif

// Weights (N, K) float32 -> levels packed two a byte (N, K / 2), float16 scales and minimums
// (N, K / 32). Per block, the scale and minimum that minimise the squared error, each input's error
// weighted by its importance a[k] (all 1 when none is given): min..max in 15 steps, and 21 candidate
// scales around it, each with the weighted least-squares scale and minimum for its levels (llama.cpp's
// search for Q4_K, make_qkx2_quants, which weights by an importance matrix the same way). On the
// real 0.5B model the search halves the KL of plain min..max (docs/benchmarks.md); it costs ~2 s at
// load, where torch ops took minutes. The chosen scale and minimum are rounded to float16 before the
// levels are set against them. With every a[k] = 1 the sums are the unweighted ones bit for bit.
void quantize_block(const float* w, const float* a, uint8_t* levels, c10::Half* scale_out, c10::Half* min_out) {
  float lo = w[0], hi = w[0];
  for (int k = 1; k < kBlock; ++k) lo = std::min(lo, w[k]), hi = std::max(hi, w[k]);
  float best_scale = (hi - lo) / 15.f, best_min = lo, best_error = INFINITY;
  auto error_of = [&](float scale, float minimum) {
    float error = 0.f;
    for (int k = 0; k < kBlock; ++k) {
      const float level = scale > 0.f ? std::min(15.f, std::max(0.f, std::nearbyint((w[k] - minimum) / scale))) : 0.f;
      const float d = level * scale + minimum - w[k];
      error += a[k] * d * d;
    }
    return error;
  };
  if (hi > lo) {
    best_error = error_of(best_scale, best_min);
    float sa = 0.f, sw = 0.f;
    for (int k = 0; k < kBlock; ++k) sa += a[k], sw += a[k] * w[k];
#ifdef QWEN2_AVX2
    __m256 wv[4], av[4];
    for (int j = 0; j < 4; ++j) wv[j] = _mm256_loadu_ps(w + 8 * j), av[j] = _mm256_loadu_ps(a + 8 * j);
    const __m256 low = _mm256_set1_ps(lo), zero = _mm256_setzero_ps(), fifteen = _mm256_set1_ps(15.f);
#endif
    for (int i = 0; i <= 20; ++i) {
      const float inverse = (14.f + 0.1f * i) / (hi - lo);
      float sq = 0.f, sqq = 0.f, sqw = 0.f, scale, minimum, error = 0.f;
#ifdef QWEN2_AVX2
      __m256 q[4], vq = zero, vqq = zero, vqw = zero;
      for (int j = 0; j < 4; ++j) {
        const __m256 t = _mm256_mul_ps(_mm256_sub_ps(wv[j], low), _mm256_set1_ps(inverse));
        q[j] = _mm256_min_ps(fifteen, _mm256_max_ps(zero, _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
        const __m256 aq = _mm256_mul_ps(av[j], q[j]);
        vq = _mm256_add_ps(vq, aq), vqq = _mm256_fmadd_ps(aq, q[j], vqq), vqw = _mm256_fmadd_ps(aq, wv[j], vqw);
      }
      sq = hsum(vq), sqq = hsum(vqq), sqw = hsum(vqw);
#else
      float q[kBlock];
      for (int k = 0; k < kBlock; ++k) {
        q[k] = std::min(15.f, std::max(0.f, std::nearbyint((w[k] - lo) * inverse)));
        sq += a[k] * q[k], sqq += a[k] * q[k] * q[k], sqw += a[k] * q[k] * w[k];
      }
#endif
      const float det = sa * sqq - sq * sq;
      if (det <= 0.f) continue;
      scale = (sa * sqw - sq * sw) / det, minimum = (sw - scale * sq) / sa;
      if (!(scale > 0.f)) continue;
#ifdef QWEN2_AVX2
      __m256 ve = zero;
      for (int j = 0; j < 4; ++j) {
        const __m256 d = _mm256_sub_ps(_mm256_fmadd_ps(q[j], _mm256_set1_ps(scale), _mm256_set1_ps(minimum)), wv[j]);
        ve = _mm256_fmadd_ps(_mm256_mul_ps(av[j], d), d, ve);
      }
      error = hsum(ve);
#else
      for (int k = 0; k < kBlock; ++k) {
        const float d = q[k] * scale + minimum - w[k];
        error += a[k] * d * d;
      }
#endif
      if (error < best_error) best_error = error, best_scale = scale, best_min = minimum;
    }
  }
  const c10::Half scale16(best_scale), min16(best_min);
  const float scale = static_cast<float>(scale16) > 0.f ? static_cast<float>(scale16) : 1.f;
  const float minimum = static_cast<float>(min16);
  *scale_out = c10::Half(scale);
  *min_out = min16;
  for (int k = 0; k < kBlock; ++k)
    levels[k] = static_cast<uint8_t>(std::min(15.f, std::max(0.f, std::nearbyint((w[k] - minimum) / scale))));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int4_blocks(const at::Tensor& weight,
                                                                    const std::optional<at::Tensor>& importance) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) % kBlock == 0 && weight.device().is_cpu(),
              "quantize_int4_blocks: weight must be a 2-D CPU tensor with inputs divisible by ", kBlock, "; got ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) % 8 == 0, "quantize_int4_blocks: outputs must be a multiple of 8; got ", weight.size(0));
  const int64_t N = weight.size(0), K = weight.size(1), G = K / kBlock;
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const at::Tensor a = importance ? importance->to(at::kFloat).contiguous() : at::ones({K}, w.options());
  TORCH_CHECK(a.dim() == 1 && a.size(0) == K && a.device().is_cpu(),
              "quantize_int4_blocks: importance must be (", K, ",) on the CPU, one value per input; got ", a.sizes());
  TORCH_CHECK(a.ge(0).all().item<bool>() && a.isfinite().all().item<bool>(),
              "quantize_int4_blocks: importance must be finite and >= 0");
  const float* ap = a.data_ptr<float>();
  at::Tensor packed = at::empty({N, K / 2}, w.options().dtype(at::kByte));
  at::Tensor scales = at::empty({N, G}, w.options().dtype(at::kHalf)), mins = at::empty({N, G}, scales.options());
  const float* wp = w.data_ptr<float>();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  c10::Half *sp = scales.data_ptr<c10::Half>(), *mp = mins.data_ptr<c10::Half>();
  at::parallel_for(0, N * G, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / G, b = i % G, panel = n / 8, c = n % 8, at = (panel * G + b) * 8 + c;
      uint8_t levels[kBlock];
      quantize_block(wp + i * kBlock, ap + b * kBlock, levels, sp + at, mp + at);
      uint8_t* pb = pp + (panel * G + b) * 128;  // see the layout at the top
      for (int s = 0; s < 4; ++s)
        for (int j = 0; j < 4; ++j) pb[32 * s + 4 * c + j] = levels[8 * s + j] | (levels[8 * s + 4 + j] << 4);
    }
  });
  return {packed, scales, mins};
}

at::Tensor int4_block_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& mins) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scales.dim() == 2 && mins.dim() == 2,
              "int4_block_mm: x, q, scales and mins must be 2-D");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), G = K / kBlock;
  TORCH_CHECK(K % kBlock == 0 && q.size(1) * 2 == K && N % 8 == 0, "int4_block_mm: q must be (N, ", K / 2,
              "), two levels a byte, with ", K, " divisible by ", kBlock, " and N by 8; got ", q.sizes());
  TORCH_CHECK(scales.size(0) == N && scales.size(1) == G && mins.sizes() == scales.sizes(),
              "int4_block_mm: scales and mins must be (", N, ", ", G, "); got ", scales.sizes(), " and ", mins.sizes());
  TORCH_CHECK(q.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf && mins.scalar_type() == at::kHalf,
              "int4_block_mm: q must be uint8, scales and mins float16");
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && scales.device().is_cpu() && mins.device().is_cpu(),
              "int4_block_mm: CPU only");
  const at::Tensor qc = q.contiguous(), sc = scales.contiguous(), mc = mins.contiguous();
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const c10::Half *sp = sc.data_ptr<c10::Half>(), *mp = mc.data_ptr<c10::Half>();
  return qwen2::with_rows_of(x, N, [&](const auto* xp, auto* yp) {
    qwen2::Workspace work;
    int8_t* qxp = work.get<int8_t>(0, M * K);
    float* dxp = work.get<float>(1, M * G);
    float* xsp = work.get<float>(2, M * G);
    qwen2::round_x_in_blocks(xp, qxp, dxp, xsp, M, K);
    const auto single = [&](auto tile, int64_t p, int64_t m) {
      panel_rows<decltype(tile)::value>(qp + p * 8 * (K / 2), sp + p * 8 * G, mp + p * 8 * G, qxp + m * K,
                                        dxp + m * G, xsp + m * G, K, yp + m * N + 8 * p, N);
    };
#ifdef QWEN2_AVX512
    qwen2::for_each_panel_pair_tile(N, M, [&](auto tile, int64_t p, int64_t m) {
      panel_pair_rows<decltype(tile)::value>(qp + p * 8 * (K / 2), sp + p * 8 * G, mp + p * 8 * G, qxp + m * K,
                                             dxp + m * G, xsp + m * G, K, yp + m * N + 8 * p, N);
    }, single);
#else
    qwen2::for_each_panel_tile(N, M, single);
#endif
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen2, m) {
  m.def("int4_block_mm(Tensor x, Tensor q, Tensor scales, Tensor mins) -> Tensor");
  m.def("quantize_int4_blocks(Tensor weight, Tensor? importance=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qwen2, CPU, m) {
  m.impl("int4_block_mm", &int4_block_mm);
  m.impl("quantize_int4_blocks", &quantize_int4_blocks);
}
