// Vector primitives of the CPU kernels, on packed rows (one key/query per row, `ld` values,
// zero-padded to a multiple of kLanes).
//
// Generic templates (any accumulation type, any CPU; the compiler vectorises them as it can)
// plus AVX2+FMA float32 specialisations, compiled when the build's -march provides them
// (CMake picks -march at build time; see CMakeLists.txt). Each output is computed by one thread
// in a fixed order, so results do not depend on the thread count or the tiling.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NATJAX_AVX2 1
#else
#define NATJAX_AVX2 0
#endif

namespace natjax {

constexpr int64_t kLanes = 8;  // row padding (one AVX register of float32)

inline int64_t pad_lanes(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// out[j] = <x, base[idx[j] * ld : +ld]>, j < n.
template <typename A>
inline void dot_rows(const A* x, const A* base, int64_t ld, const int32_t* idx, int64_t n,
                     A* out) {
  for (int64_t j = 0; j < n; ++j) {
    const A* r = base + static_cast<int64_t>(idx[j]) * ld;
    A s = 0;
    for (int64_t c = 0; c < ld; ++c) s += x[c] * r[c];
    out[j] = s;
  }
}

// acc[0:ld] += sum_j coef[j] * base[idx[j] * ld : +ld].
template <typename A>
inline void axpy_rows(A* acc, const A* coef, const A* base, int64_t ld, const int32_t* idx,
                      int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const A* r = base + static_cast<int64_t>(idx[j]) * ld;
    const A w = coef[j];
    for (int64_t c = 0; c < ld; ++c) acc[c] += w * r[c];
  }
}

// p[j] = exp(s[j] - sub[j]); returns sum_j p[j]. `sub` may be a single value (sub_step 0).
template <typename A>
inline A exp_sub(const A* s, const A* sub, int64_t sub_step, A* p, int64_t n) {
  A total = 0;
  for (int64_t j = 0; j < n; ++j) {
    p[j] = std::exp(s[j] - sub[j * sub_step]);
    total += p[j];
  }
  return total;
}

template <typename A>
inline A max_of(const A* s, int64_t n) {
  A m = s[0];
  for (int64_t j = 1; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

#if NATJAX_AVX2

// Sums of 8 vectors, lane k of the result = horizontal sum of a[k].
inline __m256 hsum8(const __m256 a[8]) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]);
  const __m256 t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]);
  const __m256 t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1);
  const __m256 u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

template <>
inline void dot_rows<float>(const float* x, const float* base, int64_t ld, const int32_t* idx,
                            int64_t n, float* out) {
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    const int64_t nb = n - j0 < 8 ? n - j0 : 8;
    const float* r[8];
    for (int k = 0; k < 8; ++k)  // a short tail block repeats its last row (results dropped)
      r[k] = base + static_cast<int64_t>(idx[j0 + (k < nb ? k : nb - 1)]) * ld;
    __m256 acc[8];
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
    for (int64_t c = 0; c < ld; c += 8) {
      const __m256 xc = _mm256_loadu_ps(x + c);
      for (int k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(xc, _mm256_loadu_ps(r[k] + c), acc[k]);
    }
    const __m256 s = hsum8(acc);
    if (nb == 8) {
      _mm256_storeu_ps(out + j0, s);
    } else {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, s);
      for (int64_t k = 0; k < nb; ++k) out[j0 + k] = tmp[k];
    }
  }
}

template <>
inline void axpy_rows<float>(float* acc, const float* coef, const float* base, int64_t ld,
                             const int32_t* idx, int64_t n) {
  int64_t c0 = 0;
  // Blocks of 32 values: 4 accumulators, two rows per step (8 independent FMA chains).
  for (; c0 + 32 <= ld; c0 += 32) {
    __m256 a[4], b[4];
    for (int i = 0; i < 4; ++i) {
      a[i] = _mm256_loadu_ps(acc + c0 + 8 * i);
      b[i] = _mm256_setzero_ps();
    }
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) {
      const float* r0 = base + static_cast<int64_t>(idx[j]) * ld + c0;
      const float* r1 = base + static_cast<int64_t>(idx[j + 1]) * ld + c0;
      const __m256 w0 = _mm256_broadcast_ss(coef + j);
      const __m256 w1 = _mm256_broadcast_ss(coef + j + 1);
      for (int i = 0; i < 4; ++i) {
        a[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(r0 + 8 * i), a[i]);
        b[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(r1 + 8 * i), b[i]);
      }
    }
    if (j < n) {
      const float* r0 = base + static_cast<int64_t>(idx[j]) * ld + c0;
      const __m256 w0 = _mm256_broadcast_ss(coef + j);
      for (int i = 0; i < 4; ++i) a[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(r0 + 8 * i), a[i]);
    }
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(acc + c0 + 8 * i, _mm256_add_ps(a[i], b[i]));
  }
  for (; c0 < ld; c0 += 8) {
    __m256 a = _mm256_loadu_ps(acc + c0), b = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) {
      const float* r0 = base + static_cast<int64_t>(idx[j]) * ld + c0;
      const float* r1 = base + static_cast<int64_t>(idx[j + 1]) * ld + c0;
      a = _mm256_fmadd_ps(_mm256_broadcast_ss(coef + j), _mm256_loadu_ps(r0), a);
      b = _mm256_fmadd_ps(_mm256_broadcast_ss(coef + j + 1), _mm256_loadu_ps(r1), b);
    }
    if (j < n)
      a = _mm256_fmadd_ps(_mm256_broadcast_ss(coef + j),
                          _mm256_loadu_ps(base + static_cast<int64_t>(idx[j]) * ld + c0), a);
    _mm256_storeu_ps(acc + c0, _mm256_add_ps(a, b));
  }
}

// exp(x) for float32 lanes: x = n*ln2 + r with |r| <= ln2/2, exp(r) by its degree-7 Taylor
// polynomial (truncation error < 1e-8 relative), scaled by 2^n through the exponent bits.
// Inputs below -87.3 flush to 0 (the kernels only pass finite logits minus their maximum).
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  // 2^n: n in [-126, 127] after the clamp (n = -127 only with `under`, zeroed below).
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  p = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(under, p);
}

template <>
inline float exp_sub<float>(const float* s, const float* sub, int64_t sub_step, float* p,
                            int64_t n) {
  __m256 total = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 m = sub_step ? _mm256_loadu_ps(sub + j) : _mm256_broadcast_ss(sub);
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
    _mm256_storeu_ps(p + j, e);
    total = _mm256_add_ps(total, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, total);
  float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
              ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  if (j < n) {
    alignas(32) float in[8] = {0}, out[8];
    for (int64_t k = 0; k < n - j; ++k) in[k] = s[j + k] - sub[(j + k) * sub_step];
    _mm256_store_ps(out, exp256(_mm256_load_ps(in)));
    for (int64_t k = 0; k < n - j; ++k) {
      p[j + k] = out[k];
      sum += out[k];
    }
  }
  return sum;
}

#endif  // NATJAX_AVX2

}  // namespace natjax
