// Attention for one new token per row (a decode step) over a fixed-size KV cache:
//
//     out[b, h] = sum_j softmax_j(scale * q[b, h] . k[b, h / G, j]) v[b, h / G, j]   over keys j with valid[b, j]
//
// with G = H / Hkv query heads per KV head; key j of batch entry b lies in row rows[b] of k and v
// (the serving engine's cache pool, read in place: a gather of the rows would copy every key and
// value of the batch each layer and step) or in row b without rows, among its first `keys` slots.
// The compiled decode steps read the whole cache bucket
// under a mask (their shapes are fixed), and Inductor's fusion of the same math recomputed q's bias
// and rotation for every key and kept the masked ones: ~90 us a layer on the 0.5B model at a bucket
// of 256 (docs/benchmarks.md). Here each task is one (row, KV head): its keys and values are read
// once for its G query heads, masked keys are skipped (their probability is exactly 0), and the
// sums are float32 whatever the cache's dtype (float32 or bfloat16).
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "panels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QWEN2_AVX2 1
#endif

namespace {

constexpr int64_t kMaxHeadDim = 256;

#ifdef QWEN2_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) { return qwen2::widen_bf16x8(p); }

// Eight sums side by side: lane g of the result is the sum of the lanes of v[g].
inline __m256 sum_lanes(const __m256 v[8]) {
  const __m256 a = _mm256_hadd_ps(v[0], v[1]), b = _mm256_hadd_ps(v[2], v[3]);
  const __m256 c = _mm256_hadd_ps(v[4], v[5]), d = _mm256_hadd_ps(v[6], v[7]);
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);  // [0..3 low halves, 0..3 high halves]
  const __m256 low = _mm256_permute2f128_ps(ab, cd, 0x20), high = _mm256_permute2f128_ps(ab, cd, 0x31);
  return _mm256_add_ps(low, high);
}

// e^x for x <= 0 (Cephes' expf: x = n ln 2 + r, a degree-5 polynomial in r, times 2^n), within
// 2 ulp of std::exp on this range; below -87 it gives 0, as the float32 exp underflows anyway.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 floor_x = _mm256_set1_ps(-87.f);
  const __m256 underflow = _mm256_cmp_ps(x, floor_x, _CMP_LT_OQ);
  x = _mm256_max_ps(x, floor_x);
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(power)));
}
#endif

// One (row, KV head): scores[g * n + i] = scale * q[g] . key(keys[i]) for its G query heads and n keys.
template <class T>
void scores_of(const float* q, int64_t G, const T* k, int64_t k_stride, const int64_t* keys, int64_t n, int64_t hd,
               float scale, float* scores) {
#ifdef QWEN2_AVX2
  if (hd % 8 == 0) {
    // Eight heads against each key at once, eight independent FMA chains in registers: q is copied
    // eight heads at a time into a buffer padded with zero heads.
    float q8[8 * kMaxHeadDim];
    for (int64_t g0 = 0; g0 < G; g0 += 8) {
      const int64_t heads = std::min<int64_t>(8, G - g0);
      std::fill(q8, q8 + 8 * hd, 0.f);
      std::copy(q + g0 * hd, q + (g0 + heads) * hd, q8);
      for (int64_t i = 0; i < n; ++i) {
        const T* key = k + keys[i] * k_stride;
        __m256 acc[8];
        for (int g = 0; g < 8; ++g) acc[g] = _mm256_setzero_ps();
        for (int64_t c = 0; c < hd; c += 8) {
          const __m256 kc = load8(key + c);
          for (int g = 0; g < 8; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q8 + g * hd + c), kc, acc[g]);
        }
        float sums[8];
        _mm256_storeu_ps(sums, _mm256_mul_ps(sum_lanes(acc), _mm256_set1_ps(scale)));
        for (int64_t g = 0; g < heads; ++g) scores[(g0 + g) * n + i] = sums[g];
      }
    }
    return;
  }
#endif
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < n; ++i) {
      const T* key = k + keys[i] * k_stride;
      float sum = 0.f;
      for (int64_t c = 0; c < hd; ++c) sum += q[g * hd + c] * static_cast<float>(key[c]);
      scores[g * n + i] = sum * scale;
    }
}

// p (n) <- softmax(p), in place.
inline void softmax(float* p, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) top = std::max(top, p[i]);
  float total = 0.f;
  int64_t i = 0;
#ifdef QWEN2_AVX2
  __m256 sum = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + i), _mm256_set1_ps(top)));
    _mm256_storeu_ps(p + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, sum);
  for (float lane : lanes) total += lane;
#endif
  for (; i < n; ++i) total += (p[i] = std::exp(p[i] - top));
  const float inverse = 1.f / total;
  for (int64_t j = 0; j < n; ++j) p[j] *= inverse;
}

// out (hd) += sum_i p[i] * value(keys[i]).
template <class T>
inline void add_weighted_sum(const float* p, const int64_t* keys, int64_t n, const T* v, int64_t v_stride,
                             int64_t hd, float* out) {
#ifdef QWEN2_AVX2
  if (hd % 8 == 0) {
    int64_t c0 = 0;
    for (; c0 + 64 <= hd; c0 += 64) {  // 64 values at a time: eight accumulators in registers
      __m256 acc[8];
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_loadu_ps(out + c0 + 8 * c);
      for (int64_t i = 0; i < n; ++i) {
        const __m256 weight = _mm256_set1_ps(p[i]);
        const T* row = v + keys[i] * v_stride + c0;
        for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(weight, load8(row + 8 * c), acc[c]);
      }
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(out + c0 + 8 * c, acc[c]);
    }
    for (; c0 < hd; c0 += 8) {
      __m256 acc = _mm256_loadu_ps(out + c0);
      for (int64_t i = 0; i < n; ++i)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(p[i]), load8(v + keys[i] * v_stride + c0), acc);
      _mm256_storeu_ps(out + c0, acc);
    }
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    const T* row = v + keys[i] * v_stride;
    for (int64_t c = 0; c < hd; ++c) out[c] += p[i] * static_cast<float>(row[c]);
  }
}

// out (G, hd) = p (G, n) times the values of keys: a chunk of keys at a time, every head's sums
// over it while its values are in L1 (head after head over the whole context would read each value
// G times from farther away: at thousands of keys, most of the kernel's time). bf16 values are
// widened once per chunk into `widened` (chunk * hd floats), not once per head.
inline int64_t chunk_keys(int64_t hd) { return std::max<int64_t>(8, 4096 / hd); }  // 16 KB of float32 values

template <class T>
void weighted_sums(const float* p, const int64_t* keys, int64_t n, int64_t G, const T* v, int64_t v_stride,
                   int64_t hd, float* widened, const int64_t* in_order, float* out) {
  std::fill(out, out + G * hd, 0.f);
  const int64_t chunk = chunk_keys(hd);
  for (int64_t i0 = 0; i0 < n; i0 += chunk) {
    const int64_t m = std::min(chunk, n - i0);
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t g = 0; g < G; ++g) add_weighted_sum(p + g * n + i0, keys + i0, m, v, v_stride, hd, out + g * hd);
    } else {
      for (int64_t i = 0; i < m; ++i) {
        const T* row = v + keys[i0 + i] * v_stride;
        for (int64_t c = 0; c < hd; ++c) widened[i * hd + c] = static_cast<float>(row[c]);
      }
      for (int64_t g = 0; g < G; ++g) add_weighted_sum(p + g * n + i0, in_order, m, widened, hd, hd, out + g * hd);
    }
  }
}

// One (row, KV head) per task: the row's valid keys listed once, the scores of its G query heads,
// their softmax and the weighted sums of values. A row's own key is always valid, so n >= 1.
template <class T>
void attend(const float* q, const at::Tensor& k, const at::Tensor& v, const int64_t* rows, int64_t B, int64_t S,
            const bool* valid, int64_t valid_rows, int64_t G, float scale, float* out) {
  const int64_t Hkv = k.size(1), hd = k.size(3);
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  // At short contexts the tasks are small: below ~64K multiply-adds in all, threads cost more than
  // they save, so one thread takes every task.
  int64_t valid_keys = B * S;
  if (valid) valid_keys = std::count(valid, valid + valid_rows * S, true) * (valid_rows == 1 ? B : 1);
  const int64_t grain = valid_keys * Hkv * G * hd < (1 << 16) ? B * Hkv : 1;
  at::parallel_for(0, B * Hkv, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> keys(S);
    std::vector<float> scores(G * S);
    std::vector<float> widened(std::is_same_v<T, float> ? 0 : chunk_keys(hd) * hd);
    std::vector<int64_t> in_order(chunk_keys(hd));
    for (int64_t i = 0; i < static_cast<int64_t>(in_order.size()); ++i) in_order[i] = i;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const bool* row_valid = valid ? valid + (valid_rows == 1 ? 0 : b) * S : nullptr;
      int64_t n = 0;
      for (int64_t j = 0; j < S; ++j)
        if (!row_valid || row_valid[j]) keys[n++] = j;
      if (n == 0) {  // no key at all: zeros (never the case in a decode step)
        std::fill(out + task * G * hd, out + (task + 1) * G * hd, 0.f);
        continue;
      }
      const int64_t row = rows ? rows[b] : b;
      const T* kh = kp + row * k.stride(0) + h * k.stride(1);
      const T* vh = vp + row * v.stride(0) + h * v.stride(1);
      const float* qh = q + task * G * hd;  // q and out are (B, H, hd), H = Hkv * G
      scores_of(qh, G, kh, k.stride(2), keys.data(), n, hd, scale, scores.data());
      for (int64_t g = 0; g < G; ++g) softmax(scores.data() + g * n, n);
      weighted_sums(scores.data(), keys.data(), n, G, vh, v.stride(2), hd, widened.data(), in_order.data(),
                    out + task * G * hd);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& rows, int64_t keys,
                            const std::optional<at::Tensor>& valid, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes(),
              "decode_attention: q must be (B, H, hd) and k, v (rows, Hkv, slots, hd) alike; got ", q.sizes(), ", ",
              k.sizes(), " and ", v.sizes());
  const int64_t B = q.size(0), Hkv = k.size(1), hd = k.size(3), H = q.size(1), S = keys;
  TORCH_CHECK(q.size(2) == hd && Hkv > 0 && H % Hkv == 0,
              "decode_attention: q must be (", B, ", a multiple of ", Hkv, ", ", hd, "); got ", q.sizes());
  TORCH_CHECK(hd <= kMaxHeadDim, "decode_attention: head_dim ", hd, " is above ", kMaxHeadDim);
  TORCH_CHECK(keys >= 1 && keys <= k.size(2), "decode_attention: keys must be 1 to ", k.size(2),
              " (the slots of k and v); got ", keys);
  TORCH_CHECK(k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "decode_attention: k and v must both be float32 or both bfloat16");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k and v must be contiguous in head_dim");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() &&
                  (!rows.has_value() || rows->device().is_cpu()) && (!valid.has_value() || valid->device().is_cpu()),
              "decode_attention: CPU only (q, k, v, rows and valid)");
  at::Tensor row_index;
  if (rows.has_value()) {
    row_index = rows->contiguous();
    TORCH_CHECK(row_index.scalar_type() == at::kLong && row_index.dim() == 1 && row_index.size(0) == B,
                "decode_attention: rows must be an int64 (", B, ",) tensor; got ", row_index.scalar_type(), " ",
                row_index.sizes());
    const int64_t* r = row_index.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(r[b] >= 0 && r[b] < k.size(0), "decode_attention: rows[", b, "] = ", r[b],
                  " is not a row of k and v (0 to ", k.size(0) - 1, ")");
  } else {
    TORCH_CHECK(k.size(0) == B, "decode_attention: without rows, k and v must have q's ", B, " rows; got ",
                k.size(0));
  }
  at::Tensor mask;
  if (valid.has_value()) {
    mask = valid->contiguous();
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(1) == S &&
                    (mask.size(0) == 1 || mask.size(0) == B),
                "decode_attention: valid must be a bool (1 or ", B, ", ", S, ") tensor; got ", mask.sizes());
  }
  const at::Tensor q32 = q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, H, hd}, q32.options());
  const int64_t* rp = row_index.defined() ? row_index.data_ptr<int64_t>() : nullptr;
  const bool* vp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const int64_t valid_rows = mask.defined() ? mask.size(0) : 0;
  if (k.scalar_type() == at::kFloat)
    attend<float>(q32.data_ptr<float>(), k, v, rp, B, S, vp, valid_rows, H / Hkv, static_cast<float>(scale),
                  out.data_ptr<float>());
  else
    attend<c10::BFloat16>(q32.data_ptr<float>(), k, v, rp, B, S, vp, valid_rows, H / Hkv,
                          static_cast<float>(scale), out.data_ptr<float>());
  return v.scalar_type() == at::kFloat ? out : out.to(v.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen2, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? rows, SymInt keys, Tensor? valid, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwen2, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
