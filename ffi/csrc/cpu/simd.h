// Vector primitives of the CPU kernels, on "rows": `n` vectors of `len` values at a fixed
// stride (consecutive keys or queries along the innermost spatial axis).
//
// Generic templates (any accumulation type, any CPU; the compiler vectorises them as it can)
// plus AVX2+FMA float32 specialisations, compiled when the build's -march provides them
// (CMake picks -march at build time; see CMakeLists.txt). The AVX2 versions need `len` to be a
// multiple of 8 and, for `row_logits`, 8 readable bias values from `bias` on. Every output is
// computed by one thread in a fixed order, so results do not depend on threads or tiling.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NATJAX_AVX2 1
#else
#define NATJAX_AVX2 0
#endif

namespace natjax {

constexpr int64_t kLanes = 8;  // logit rows are padded to multiples of this

inline int64_t pad_lanes(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// out[j] = <x, p[j*stride : +len]> (+ bias[j]) for j < n; out[j] = fill for n <= j < pad(n).
template <typename A>
inline void row_logits(const A* x, const A* p, int64_t stride, int64_t n, int64_t len,
                       const A* bias, A fill, A* out) {
  for (int64_t j = 0; j < n; ++j) {
    const A* r = p + j * stride;
    A s = 0;
    for (int64_t c = 0; c < len; ++c) s += x[c] * r[c];
    out[j] = bias ? s + bias[j] : s;
  }
  for (int64_t j = n; j < pad_lanes(n); ++j) out[j] = fill;
}

// acc[0:len] += sum_{j < n} coef[j] * p[j*stride : +len].
template <typename A>
inline void row_axpy(A* acc, const A* coef, const A* p, int64_t stride, int64_t n,
                     int64_t len) {
  for (int64_t j = 0; j < n; ++j) {
    const A* r = p + j * stride;
    const A w = coef[j];
    for (int64_t c = 0; c < len; ++c) acc[c] += w * r[c];
  }
}

// max of s[0:n] (n a multiple of kLanes).
template <typename A>
inline A block_max(const A* s, int64_t n) {
  A m = -std::numeric_limits<A>::infinity();
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// p[j] = exp(s[j] - sub[j * sub_step]) for j < n (n a multiple of kLanes); returns sum_j p[j].
// exp(-inf) = 0: padded lanes drop out.
template <typename A>
inline A exp_sub(const A* s, const A* sub, int64_t sub_step, A* p, int64_t n) {
  A total = 0;
  for (int64_t j = 0; j < n; ++j) {
    p[j] = std::exp(s[j] - sub[j * sub_step]);
    total += p[j];
  }
  return total;
}


// Two queries over one run of `n` keys (their windows' union). Query a's window is the lanes
// [a_off, a_off + a_cnt) of the run, with bias bias_a[j] for run position j (any value outside
// its window: those lanes get -inf); likewise b. Outputs padded to pad(n) like row_logits.
template <typename A>
inline void row_logits2(const A* xa, const A* xb, const A* p, int64_t stride, int64_t n,
                        int64_t len, const A* bias_a, const A* bias_b, int64_t a_off,
                        int64_t a_cnt, int64_t b_off, int64_t b_cnt, A fill, A* out_a,
                        A* out_b) {
  row_logits(xa, p, stride, n, len, bias_a, fill, out_a);
  row_logits(xb, p, stride, n, len, bias_b, fill, out_b);
  for (int64_t j = 0; j < pad_lanes(n); ++j) {
    if (j < a_off || j >= a_off + a_cnt) out_a[j] = fill;
    if (j < b_off || j >= b_off + b_cnt) out_b[j] = fill;
  }
}

// dst[j*stride : +len] += c[j] * x for j < n (the transpose of row_axpy).
template <typename A>
inline void row_scatter(A* dst, int64_t stride, int64_t n, int64_t len, const A* c, const A* x) {
  for (int64_t j = 0; j < n; ++j) {
    A* r = dst + j * stride;
    for (int64_t k = 0; k < len; ++k) r[k] += c[j] * x[k];
  }
}

// dst[j*stride : +len] += ca[j] * xa + cb[j] * xb for j < n (each row loaded/stored once).
template <typename A>
inline void row_scatter2(A* dst, int64_t stride, int64_t n, int64_t len, const A* ca,
                         const A* xa, const A* cb, const A* xb) {
  for (int64_t j = 0; j < n; ++j) {
    A* r = dst + j * stride;
    for (int64_t k = 0; k < len; ++k) r[k] += ca[j] * xa[k] + cb[j] * xb[k];
  }
}

// acc_a += sum_j ca[j] * row_j and acc_b += sum_j cb[j] * row_j, sharing the row loads.
template <typename A>
inline void row_axpy2(A* acc_a, A* acc_b, const A* ca, const A* cb, const A* p, int64_t stride,
                      int64_t n, int64_t len) {
  row_axpy(acc_a, ca, p, stride, n, len);
  row_axpy(acc_b, cb, p, stride, n, len);
}

#if NATJAX_AVX2

// Lane k of the result = horizontal sum of a[k].
inline __m256 hsum8(const __m256 a[8]) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]);
  const __m256 t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]);
  const __m256 t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1);
  const __m256 u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                       _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Lanes [0, n) set, n in [0, 8].
inline __m256 lane_mask(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx));
}

template <>
inline void row_logits<float>(const float* x, const float* p, int64_t stride, int64_t n,
                              int64_t len, const float* bias, float fill, float* out) {
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    const int64_t nb = n - j0 < 8 ? n - j0 : 8;
    const float* r[8];
    for (int k = 0; k < 8; ++k)  // a short block repeats its last row (lanes masked below)
      r[k] = p + (j0 + (k < nb ? k : nb - 1)) * stride;
    __m256 acc[8];
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
    for (int64_t c = 0; c < len; c += 8) {
      const __m256 xc = _mm256_loadu_ps(x + c);
      for (int k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(xc, _mm256_loadu_ps(r[k] + c), acc[k]);
    }
    __m256 s = hsum8(acc);
    if (bias) s = _mm256_add_ps(s, _mm256_loadu_ps(bias + j0));
    if (nb < 8) s = _mm256_blendv_ps(_mm256_set1_ps(fill), s, lane_mask(nb));
    _mm256_storeu_ps(out + j0, s);
  }
}

template <>
inline void row_axpy<float>(float* acc, const float* coef, const float* p, int64_t stride,
                            int64_t n, int64_t len) {
  int64_t c0 = 0;
  // 32 values at a time: 4 accumulators x two rows per step (8 independent FMA chains).
  for (; c0 + 32 <= len; c0 += 32) {
    __m256 a[4], b[4];
    for (int i = 0; i < 4; ++i) {
      a[i] = _mm256_loadu_ps(acc + c0 + 8 * i);
      b[i] = _mm256_setzero_ps();
    }
    const float* r = p + c0;
    int64_t j = 0;
    for (; j + 2 <= n; j += 2, r += 2 * stride) {
      const __m256 w0 = _mm256_broadcast_ss(coef + j);
      const __m256 w1 = _mm256_broadcast_ss(coef + j + 1);
      for (int i = 0; i < 4; ++i) {
        a[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(r + 8 * i), a[i]);
        b[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(r + stride + 8 * i), b[i]);
      }
    }
    if (j < n) {
      const __m256 w0 = _mm256_broadcast_ss(coef + j);
      for (int i = 0; i < 4; ++i) a[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(r + 8 * i), a[i]);
    }
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(acc + c0 + 8 * i, _mm256_add_ps(a[i], b[i]));
  }
  for (; c0 < len; c0 += 8) {
    __m256 a = _mm256_loadu_ps(acc + c0), b = _mm256_setzero_ps();
    const float* r = p + c0;
    int64_t j = 0;
    for (; j + 2 <= n; j += 2, r += 2 * stride) {
      a = _mm256_fmadd_ps(_mm256_broadcast_ss(coef + j), _mm256_loadu_ps(r), a);
      b = _mm256_fmadd_ps(_mm256_broadcast_ss(coef + j + 1), _mm256_loadu_ps(r + stride), b);
    }
    if (j < n) a = _mm256_fmadd_ps(_mm256_broadcast_ss(coef + j), _mm256_loadu_ps(r), a);
    _mm256_storeu_ps(acc + c0, _mm256_add_ps(a, b));
  }
}

template <>
inline float block_max<float>(const float* s, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float r = lanes[0];
  for (int k = 1; k < 8; ++k) r = lanes[k] > r ? lanes[k] : r;
  return r;
}

// exp(x) for float32 lanes: x = n*ln2 + r with |r| <= ln2/2, exp(r) by its degree-7 Taylor
// polynomial (truncation error < 1e-8 relative), scaled by 2^n through the exponent bits.
// Inputs below -87.3 (and -inf) give 0; the kernels pass logits minus a running max or lse.
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
  // 2^n via the exponent field: n in [-126, 127] after the clamp.
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  p = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(under, p);
}

template <>
inline float exp_sub<float>(const float* s, const float* sub, int64_t sub_step, float* p,
                            int64_t n) {
  __m256 total = _mm256_setzero_ps();
  const __m256 m0 = _mm256_broadcast_ss(sub);
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 m = sub_step ? _mm256_loadu_ps(sub + j) : m0;
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
    _mm256_storeu_ps(p + j, e);
    total = _mm256_add_ps(total, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, total);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}


// Lanes k of the result = horizontal sums of a[k], k < 4.
inline __m128 hsum4(const __m256 a[4]) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

// Lanes j of the 8-lane block at run position j0 that lie in [off, off + cnt).
inline __m256 window_mask(int64_t j0, int64_t off, int64_t cnt) {
  const __m256i idx = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                       _mm256_set1_epi32(static_cast<int>(j0 - off)));
  const __m256i lo = _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(-1));
  const __m256i hi = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cnt)), idx);
  return _mm256_castsi256_ps(_mm256_and_si256(lo, hi));
}

template <>
inline void row_logits2<float>(const float* xa, const float* xb, const float* p, int64_t stride,
                               int64_t n, int64_t len, const float* bias_a, const float* bias_b,
                               int64_t a_off, int64_t a_cnt, int64_t b_off, int64_t b_cnt,
                               float fill, float* out_a, float* out_b) {
  const __m256 filler = _mm256_set1_ps(fill);
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    __m128 half_a[2], half_b[2];
    for (int h = 0; h < 2; ++h) {  // 4 keys x 2 queries: 8 accumulators, keys loaded once
      const float* r[4];
      for (int k = 0; k < 4; ++k) {
        const int64_t j = j0 + 4 * h + k;
        r[k] = p + (j < n ? j : n - 1) * stride;
      }
      __m256 aa[4], ab[4];
      for (int k = 0; k < 4; ++k) aa[k] = ab[k] = _mm256_setzero_ps();
      for (int64_t c = 0; c < len; c += 8) {
        const __m256 qa = _mm256_loadu_ps(xa + c), qb = _mm256_loadu_ps(xb + c);
        for (int k = 0; k < 4; ++k) {
          const __m256 kv = _mm256_loadu_ps(r[k] + c);
          aa[k] = _mm256_fmadd_ps(qa, kv, aa[k]);
          ab[k] = _mm256_fmadd_ps(qb, kv, ab[k]);
        }
      }
      half_a[h] = hsum4(aa);
      half_b[h] = hsum4(ab);
    }
    __m256 sa = _mm256_insertf128_ps(_mm256_castps128_ps256(half_a[0]), half_a[1], 1);
    __m256 sb = _mm256_insertf128_ps(_mm256_castps128_ps256(half_b[0]), half_b[1], 1);
    if (bias_a) sa = _mm256_add_ps(sa, _mm256_loadu_ps(bias_a + j0));
    if (bias_b) sb = _mm256_add_ps(sb, _mm256_loadu_ps(bias_b + j0));
    _mm256_storeu_ps(out_a + j0, _mm256_blendv_ps(filler, sa, window_mask(j0, a_off, a_cnt)));
    _mm256_storeu_ps(out_b + j0, _mm256_blendv_ps(filler, sb, window_mask(j0, b_off, b_cnt)));
  }
}

template <>
inline void row_axpy2<float>(float* acc_a, float* acc_b, const float* ca, const float* cb,
                             const float* p, int64_t stride, int64_t n, int64_t len) {
  int64_t c0 = 0;
  for (; c0 + 32 <= len; c0 += 32) {  // 4 x 2 accumulators, each row loaded once
    __m256 a[4], b[4];
    for (int i = 0; i < 4; ++i) {
      a[i] = _mm256_loadu_ps(acc_a + c0 + 8 * i);
      b[i] = _mm256_loadu_ps(acc_b + c0 + 8 * i);
    }
    const float* r = p + c0;
    for (int64_t j = 0; j < n; ++j, r += stride) {
      const __m256 wa = _mm256_broadcast_ss(ca + j), wb = _mm256_broadcast_ss(cb + j);
      for (int i = 0; i < 4; ++i) {
        const __m256 v = _mm256_loadu_ps(r + 8 * i);
        a[i] = _mm256_fmadd_ps(wa, v, a[i]);
        b[i] = _mm256_fmadd_ps(wb, v, b[i]);
      }
    }
    for (int i = 0; i < 4; ++i) {
      _mm256_storeu_ps(acc_a + c0 + 8 * i, a[i]);
      _mm256_storeu_ps(acc_b + c0 + 8 * i, b[i]);
    }
  }
  for (; c0 < len; c0 += 8) {
    __m256 a = _mm256_loadu_ps(acc_a + c0), b = _mm256_loadu_ps(acc_b + c0);
    const float* r = p + c0;
    for (int64_t j = 0; j < n; ++j, r += stride) {
      const __m256 v = _mm256_loadu_ps(r);
      a = _mm256_fmadd_ps(_mm256_broadcast_ss(ca + j), v, a);
      b = _mm256_fmadd_ps(_mm256_broadcast_ss(cb + j), v, b);
    }
    _mm256_storeu_ps(acc_a + c0, a);
    _mm256_storeu_ps(acc_b + c0, b);
  }
}

template <>
inline void row_scatter<float>(float* dst, int64_t stride, int64_t n, int64_t len,
                               const float* c, const float* x) {
  for (int64_t j = 0; j < n; ++j) {
    float* r = dst + j * stride;
    const __m256 w = _mm256_broadcast_ss(c + j);
    for (int64_t k = 0; k < len; k += 8)
      _mm256_storeu_ps(r + k, _mm256_fmadd_ps(w, _mm256_loadu_ps(x + k), _mm256_loadu_ps(r + k)));
  }
}

template <>
inline void row_scatter2<float>(float* dst, int64_t stride, int64_t n, int64_t len,
                                const float* ca, const float* xa, const float* cb,
                                const float* xb) {
  if (len == 32) {  // the common head_dim: both query rows stay in registers
    __m256 a[4], b[4];
    for (int i = 0; i < 4; ++i) {
      a[i] = _mm256_loadu_ps(xa + 8 * i);
      b[i] = _mm256_loadu_ps(xb + 8 * i);
    }
    for (int64_t j = 0; j < n; ++j) {
      float* r = dst + j * stride;
      const __m256 wa = _mm256_broadcast_ss(ca + j), wb = _mm256_broadcast_ss(cb + j);
      for (int i = 0; i < 4; ++i) {
        const __m256 t = _mm256_fmadd_ps(wa, a[i], _mm256_loadu_ps(r + 8 * i));
        _mm256_storeu_ps(r + 8 * i, _mm256_fmadd_ps(wb, b[i], t));
      }
    }
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    float* r = dst + j * stride;
    const __m256 wa = _mm256_broadcast_ss(ca + j), wb = _mm256_broadcast_ss(cb + j);
    for (int64_t k = 0; k < len; k += 8) {
      const __m256 t = _mm256_fmadd_ps(wa, _mm256_loadu_ps(xa + k), _mm256_loadu_ps(r + k));
      _mm256_storeu_ps(r + k, _mm256_fmadd_ps(wb, _mm256_loadu_ps(xb + k), t));
    }
  }
}

#endif  // NATJAX_AVX2

}  // namespace natjax
