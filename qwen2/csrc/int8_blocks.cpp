// y = x @ W^T with W stored as int8 in blocks of 32 along the input, one float16 scale per block
// (llama.cpp's Q8_0 layout), summed in float32 whatever x's dtype:
//
//     W[n, k] = scales[n, k / 32] * q[n, k]
//
// Decode multiplies one row (or a few: a batch, a speculative draft) by every weight, so the time is
// the weight bytes over the memory bandwidth as long as the int8 -> float32 conversion keeps up;
// several float32 accumulators keep the FMA chains short enough for that. A prompt is compute-bound:
// each block of weights is converted once per tile of up to eight rows of x, and wide inputs are
// walked in slices so that the tile's inputs stay in L1. Measured against dequantising to float32
// and a GEMM, and against torch's per-channel int8 kernel, in docs/benchmarks.md.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QWEN2_AVX2 1
#endif

namespace {

constexpr int64_t kBlock = 32;

#ifdef QWEN2_AVX2
inline __m256 load8(const int8_t* q) {  // 8 int8 weights -> 8 floats
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// T rows of x (row stride K) against one output channel; 4 / T accumulators per row (at least
// one), so that at least four FMA chains run side by side.
template <int T>
inline void dot_rows(const float* x, int64_t K, int64_t blocks, const int8_t* q, const c10::Half* s, float* y,
                     int64_t y_stride, bool add) {
  constexpr int A = T >= 4 ? 1 : 4 / T;
  __m256 acc[T][A];
  for (int r = 0; r < T; ++r)
    for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* qb = q + b * kBlock;
    // A cache line ahead of the hardware prefetcher's pace: 10-13 % faster over a whole step's weights
    if ((b & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(qb + 4096), _MM_HINT_T0);
    const __m256 scale = _mm256_set1_ps(static_cast<float>(s[b]));
    __m256 w[4];
    for (int j = 0; j < 4; ++j) w[j] = _mm256_mul_ps(load8(qb + 8 * j), scale);
    for (int r = 0; r < T; ++r) {
      const float* xb = x + r * K + b * kBlock;
      for (int j = 0; j < 4; ++j) acc[r][j % A] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xb + 8 * j), acc[r][j % A]);
    }
  }
  for (int r = 0; r < T; ++r) {
    __m256 total = acc[r][0];
    for (int a = 1; a < A; ++a) total = _mm256_add_ps(total, acc[r][a]);
    y[r * y_stride] = add ? y[r * y_stride] + hsum(total) : hsum(total);
  }
}
#else
template <int T>
inline void dot_rows(const float* x, int64_t K, int64_t blocks, const int8_t* q, const c10::Half* s, float* y,
                     int64_t y_stride, bool add) {
  for (int r = 0; r < T; ++r) {
    float total = 0.f;
    for (int64_t b = 0; b < blocks; ++b) {
      float block = 0.f;
      for (int64_t k = b * kBlock; k < (b + 1) * kBlock; ++k) block += x[r * K + k] * static_cast<float>(q[k]);
      total += block * static_cast<float>(s[b]);
    }
    y[r * y_stride] = add ? y[r * y_stride] + total : total;
  }
}
#endif

at::Tensor int8_block_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scales.dim() == 2, "int8_block_mm: x, q and scales must be 2-D");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K && K % kBlock == 0, "int8_block_mm: q must be (N, ", K, ") with ", K,
              " divisible by ", kBlock, "; got ", q.sizes());
  TORCH_CHECK(scales.size(0) == N && scales.size(1) == K / kBlock, "int8_block_mm: scales must be (", N, ", ",
              K / kBlock, "); got ", scales.sizes());
  TORCH_CHECK(q.scalar_type() == at::kChar && scales.scalar_type() == at::kHalf,
              "int8_block_mm: q must be int8 and scales float16");
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && scales.device().is_cpu(), "int8_block_mm: CPU only");
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const at::Tensor qc = q.contiguous(), sc = scales.contiguous();
  at::Tensor y = at::empty({M, N}, x32.options());
  const float* xp = x32.data_ptr<float>();
  const int8_t* qp = qc.data_ptr<int8_t>();
  const c10::Half* sp = sc.data_ptr<c10::Half>();
  float* yp = y.data_ptr<float>();
  // Each thread takes runs of kChannels output channels. Within a run, a tile of up to eight rows of
  // x meets every channel of the run one slice of kSlice inputs at a time, so that the tile's slice
  // and the run's weights for it stay in the nearest caches (x from L2 would starve the FMAs).
  constexpr int64_t kChannels = 32, kSlice = 512;
  at::parallel_for(0, (N + kChannels - 1) / kChannels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin * kChannels; n0 < std::min(end * kChannels, N); n0 += kChannels) {
      const int64_t n1 = std::min(n0 + kChannels, N);
      for (int64_t m = 0; m < M;) {
        const int64_t tile = M - m >= 8 ? 8 : M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
        const int64_t slice = tile == 8 && K > 2 * kSlice ? kSlice : K;  // smaller tiles fit in L1 whole
        for (int64_t k0 = 0; k0 < K; k0 += slice) {
          const int64_t blocks = (std::min(k0 + slice, K) - k0) / kBlock;
          const bool add = k0 > 0;
          for (int64_t n = n0; n < n1; ++n) {
            const float* xs = xp + m * K + k0;
            const int8_t* qs = qp + n * K + k0;
            const c10::Half* ss = sp + n * (K / kBlock) + k0 / kBlock;
            float* yn = yp + m * N + n;
            switch (tile) {
              case 8: dot_rows<8>(xs, K, blocks, qs, ss, yn, N, add); break;
              case 4: dot_rows<4>(xs, K, blocks, qs, ss, yn, N, add); break;
              case 2: dot_rows<2>(xs, K, blocks, qs, ss, yn, N, add); break;
              default: dot_rows<1>(xs, K, blocks, qs, ss, yn, N, add);
            }
          }
        }
        m += tile;
      }
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen2, m) {
  m.def("int8_block_mm(Tensor x, Tensor q, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwen2, CPU, m) {
  m.impl("int8_block_mm", &int8_block_mm);
}
