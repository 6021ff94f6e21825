// What our CPU kernels share: output channels in panels of 8 (one 256-bit register of float32
// results), and the walk over them; bf16 widened to float32.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace qwen2 {

#if defined(__AVX2__)
// Eight bf16 values at p as float32: a bf16 is the top half of a float32, so a shift widens it.
inline __m256 widen_bf16x8(const c10::BFloat16* p) {
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}
#endif

constexpr int64_t kBlock = 32;  // inputs per scale of the quantized kernels
constexpr int64_t kPanel = 8;   // output channels a panel
constexpr int64_t kTile = 4;    // rows of x that meet a panel's weights at once

// x (M, K) float32 -> qx (M, K) of Level (int8 or int16), with dx (M, K / 32) float32 the scale of
// each block of 32, and, where xsum is given, each block's float32 sum of x. The scale is
// max(Level) / max |x| (rounded once, in float32) and levels round half to even, so torch
// reproduces qx exactly (tests/helpers.py, round_x_in_blocks).
template <class Level>
void round_x_in_blocks(const float* x, Level* qx, float* dx, float* xsum, int64_t M, int64_t K) {
  constexpr float kLevels = static_cast<float>(std::numeric_limits<Level>::max());
  at::parallel_for(0, M * (K / kBlock), 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xb = x + i * kBlock;
      Level* qb = qx + i * kBlock;
      float amax = 0.f;
      for (int k = 0; k < kBlock; ++k) amax = std::max(amax, std::fabs(xb[k]));
      if (xsum) {
        float sum = 0.f;
        for (int k = 0; k < kBlock; ++k) sum += xb[k];
        xsum[i] = sum;
      }
      const float inverse = amax > 0.f ? kLevels / amax : 0.f;
      for (int k = 0; k < kBlock; ++k) qb[k] = static_cast<Level>(std::nearbyint(xb[k] * inverse));
      dx[i] = amax / kLevels;
    }
  });
}

// Calls rows(std::integral_constant<int, T>, p, m) for every panel p of the N / 8 and every tile of
// T <= 4 rows of x starting at row m: each thread takes runs of four panels (32 channels), and a
// panel meets x four rows at a time, so that its weights are widened once per four rows and the
// accumulators stay in registers. T is a compile-time constant for the kernel's unrolled loops.
template <class Rows>
void for_each_panel_tile(int64_t N, int64_t M, const Rows& rows) {
  at::parallel_for(0, N / kPanel, 4, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t m = 0; m < M;) {
        const int64_t tile = std::min<int64_t>(M - m, kTile);
        switch (tile) {
          case 4: rows(std::integral_constant<int, 4>{}, p, m); break;
          case 3: rows(std::integral_constant<int, 3>{}, p, m); break;
          case 2: rows(std::integral_constant<int, 2>{}, p, m); break;
          default: rows(std::integral_constant<int, 1>{}, p, m);
        }
        m += tile;
      }
    }
  });
}

}  // namespace qwen2
