// What our CPU kernels share: output channels in panels of 8 (one 256-bit register of float32
// results), and the walk over them; bf16 widened to float32; x and y in the caller's dtype, and the
// per-call working memory.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

// AVX-512 with its integer dot products (VNNI): the quantized kernels take two panels (16 channels,
// one 512-bit register) and up to nine rows of x at once, and one instruction multiplies and adds
// what took two or three (docs/benchmarks.md, fifteenth round). Built with -march=native, so it is
// on exactly where the CPU has it; QWEN2_KERNEL_AVX512=0 builds the AVX2 kernels instead.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__) && defined(__F16C__)
#define QWEN2_AVX512 1
#endif

namespace qwen2 {

// Which instructions the library was built for ("avx512-vnni", "avx2" or "scalar"), for run files.
inline const char* instruction_set() {
#if defined(QWEN2_AVX512)
  return "avx512-vnni";
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  return "avx2";
#else
  return "scalar";
#endif
}

#if defined(__AVX2__)
// Eight bf16 values at p as float32: a bf16 is the top half of a float32, so a shift widens it.
inline __m256 widen_bf16x8(const c10::BFloat16* p) {
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}
#endif

#if defined(__AVX2__)
// An empty instruction that claims to change v, so v is summed in the order written. Integer sums
// may be reassociated, and GCC turns a tile's four rows of running sums into trees of all of a
// block's products, which spill registers to the stack: four rows of the int4 kernel cost 2.1x one
// row, 1.3x without the spills (docs/benchmarks.md, fourteenth round).
inline void keep_in_register(__m256i& v) {
#if defined(__GNUC__)
  asm("" : "+v"(v));  // "v": any vector register, the 32 of AVX-512 included
#endif
}
#endif

#if defined(QWEN2_AVX512)
// The 16 bytes at a then the 16 at b, as one register (two panels' runs side by side).
inline __m256i join16(const void* a, const void* b) {
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(a))),
                                 _mm_loadu_si128(static_cast<const __m128i*>(b)), 1);
}

// Two panels' eight float16 values each (scales of one block) as 16 float32.
inline __m512 widen_halves(const c10::Half* a, const c10::Half* b) { return _mm512_cvtph_ps(join16(a, b)); }

// Lines cache lines `distance` bytes ahead in each of a pair's two streams, a and b being `offset`
// bytes into panels p and p + 1 (each panel_bytes long): past a panel's end its stream goes on in
// panel p + 2 or p + 3, where the walk goes next (a single panel's kernel prefetches as far ahead
// in its one stream).
template <int Lines>
inline void prefetch_pair(const void* a, const void* b, int64_t offset, int64_t distance, int64_t panel_bytes) {
  const int64_t ahead = offset + distance < panel_bytes ? distance : distance + panel_bytes;
  for (int line = 0; line < Lines; ++line) {
    _mm_prefetch(static_cast<const char*>(a) + ahead + 64 * line, _MM_HINT_T0);
    _mm_prefetch(static_cast<const char*>(b) + ahead + 64 * line, _MM_HINT_T0);
  }
}
#endif

#if defined(__AVX2__)
// Eight float32 results to y, rounded to y's type (bf16: to nearest even, as torch's .to does).
inline void store8(float* y, __m256 v) { _mm256_storeu_ps(y, v); }
inline void store8(c10::BFloat16* y, __m256 v) {
  alignas(32) float f[8];
  _mm256_store_ps(f, v);
  for (int c = 0; c < 8; ++c) y[c] = c10::BFloat16(f[c]);
}
#endif

#if defined(QWEN2_AVX512)
// Sixteen float32 results (two panels' eight) to y, rounded to y's type as store8 does.
inline void store16(float* y, __m512 v) { _mm512_storeu_ps(y, v); }
inline void store16(c10::BFloat16* y, __m512 v) {
  store8(y, _mm512_castps512_ps256(v));
  store8(y + 8, _mm512_extractf32x8_ps(v, 1));
}
#endif

// A product's x and y in the dtype the model runs in (float32 or bfloat16), read and written as
// they are: a decode step makes ~100 products of one row each, and converting x to float32 and y
// back as tensors cost each one two ATen calls, ~5-10 us, more than a small product itself
// (docs/benchmarks.md). Another dtype (float16) goes through float32 copies. `body(x, y)` gets
// typed pointers to contiguous rows.
template <class Body>
at::Tensor with_rows_of(const at::Tensor& x, int64_t N, const Body& body) {
  const auto dtype = x.scalar_type();
  if (dtype != at::kFloat && dtype != at::kBFloat16) {
    return with_rows_of(x.to(at::kFloat), N, body).to(dtype);
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({x.size(0), N}, xc.options());
  if (dtype == at::kFloat) {
    body(xc.data_ptr<float>(), y.data_ptr<float>());
  } else {
    body(xc.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>());
  }
  return y;
}

// Working memory of one call (rounded x, its scales), reused by the calling thread's next call
// while it is small (an ATen allocation per product cost ~1-2 us each, a decode step makes ~100);
// a prompt's larger buffers are allocated per call and let go.
class Workspace {
 public:
  template <class T>
  T* get(int slot, int64_t count) {
    constexpr size_t kKept = size_t{1} << 20;  // bytes a slot keeps between calls
    const size_t bytes = static_cast<size_t>(count) * sizeof(T) + 64;
    if (bytes > kKept) {
      own_[slot] = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
      return align<T>(own_[slot].data_ptr<uint8_t>());
    }
    std::vector<uint8_t>& buffer = kept(slot);
    if (buffer.size() < bytes) buffer.resize(bytes);
    return align<T>(buffer.data());
  }

 private:
  static constexpr int kSlots = 3;
  static std::vector<uint8_t>& kept(int slot) {
    thread_local std::vector<uint8_t> buffers[kSlots];
    return buffers[slot];
  }
  template <class T>
  static T* align(uint8_t* p) {
    return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
  }
  at::Tensor own_[kSlots];
};

// x as float32: itself, or widened into the workspace's slot 0.
inline const float* as_float(const float* x, int64_t, Workspace&) { return x; }
inline const float* as_float(const c10::BFloat16* x, int64_t count, Workspace& work) {
  float* out = work.get<float>(0, count);
  at::parallel_for(0, count, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = static_cast<float>(x[i]);
  });
  return out;
}

constexpr int64_t kBlock = 32;  // inputs per scale of the quantized kernels
constexpr int64_t kPanel = 8;   // output channels a panel
constexpr int64_t kTile = 4;    // rows of x that meet a panel's weights at once
constexpr int64_t kPairTile = 9;  // rows of x that meet a pair of panels at once (AVX-512: 32 registers): a
                                  // speculative verification of 8 guesses in one tile

// x (M, K) float32 or bf16 -> qx (M, K) of Level (int8 or int16), with dx (M, K / 32) float32 the scale of
// each block of 32, and, where xsum is given, each block's float32 sum of x. The scale is
// max(Level) / max |x| (rounded once, in float32) and levels round half to even, so torch
// reproduces qx exactly (tests/helpers.py, round_x_in_blocks).
template <class In, class Level>
void round_x_in_blocks(const In* x, Level* qx, float* dx, float* xsum, int64_t M, int64_t K) {
  constexpr float kLevels = static_cast<float>(std::numeric_limits<Level>::max());
  at::parallel_for(0, M * (K / kBlock), 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float xb[kBlock];
      for (int k = 0; k < kBlock; ++k) xb[k] = static_cast<float>(x[i * kBlock + k]);
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

// Calls rows(std::integral_constant<int, T>, p, m) for every tile of T <= 4 rows of x against panel
// p, starting at row m. T is a compile-time constant for the kernel's unrolled loops.
template <class Rows>
void for_each_tile(int64_t p, int64_t M, const Rows& rows) {
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

// Calls rows(std::integral_constant<int, T>, p, m) for every panel p of the N / 8 and every tile of
// T <= 4 rows of x starting at row m: each thread takes runs of four panels (32 channels), and a
// panel meets x four rows at a time, so that its weights are widened once per four rows and the
// accumulators stay in registers.
template <class Rows>
void for_each_panel_tile(int64_t N, int64_t M, const Rows& rows) {
  at::parallel_for(0, N / kPanel, 4, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) for_each_tile(p, M, rows);
  });
}

// From four rows of x: calls pair(std::integral_constant<int, T>, p, m) for panels p and p + 1
// together, every even p, and every tile of 4 <= T <= 9 rows of x starting at row m, the tiles as
// even as they go (10 rows: 5 + 5, not 9 + 1, since a tile's rows are independent chains of sums
// and a lone row waits on each of its own); a last odd panel goes to single(...) as in
// for_each_panel_tile. Each thread takes runs of two pairs (32 channels). Below four rows,
// for_each_panel_tile(N, M, single): a pair reads two streams of weights at once, and one or two
// rows (decode) ran 10-30 % slower that way, where four rows ran as fast and eight or nine 1.5-2x faster
// (docs/benchmarks.md, fifteenth round).
constexpr int64_t kPairRows = 4;

template <class Pair, class Single>
void for_each_panel_pair_tile(int64_t N, int64_t M, const Pair& pair, const Single& single) {
  if (M < kPairRows) return for_each_panel_tile(N, M, single);
  const int64_t panels = N / kPanel, tiles = (M + kPairTile - 1) / kPairTile;  // each of 4..9 rows
  at::parallel_for(0, (panels + 1) / 2, 2, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p = 2 * i;
      if (p + 1 == panels) {
        for_each_tile(p, M, single);
        continue;
      }
      for (int64_t m = 0, t = 0; m < M; ++t) {
        const int64_t tile = M / tiles + (t < M % tiles);
        switch (tile) {
          case 9: pair(std::integral_constant<int, 9>{}, p, m); break;
          case 8: pair(std::integral_constant<int, 8>{}, p, m); break;
          case 7: pair(std::integral_constant<int, 7>{}, p, m); break;
          case 6: pair(std::integral_constant<int, 6>{}, p, m); break;
          case 5: pair(std::integral_constant<int, 5>{}, p, m); break;
          default: pair(std::integral_constant<int, 4>{}, p, m);
        }
        m += tile;
      }
    }
  });
}

}  // namespace qwen2
