// Forward by strips: the vector lanes run over queries, not over keys or features.
//
// A strip is up to N queries (N = 8 with AVX2, 16 with AVX-512) that are consecutive along the
// innermost axis of one tile row (in dilation-group coordinates). They share their windows along
// the outer axes, and along the innermost axis lane i's window starts at halo position
// `base + o[i]` with 0 <= o[i] < N: for NATTEN's windows o = 0, 1, ..., N-1 away from the
// borders (each query's window is its neighbour's shifted by one key) and a clamped run at the
// borders. With the key halo packed transposed (feature c of halo position p at kt[c * ld + p]),
// key t of every lane's window is one vector:
//
//   K_t[lanes] = permute(load(kt + c * ld + row + base + t), o)   (no permute where o = 0..N-1)
//
// so for each feature c the logits of the whole strip at key t are one FMA with the strip's
// transposed q (q[c][lanes], scaled): no horizontal sums, no gathers, and every key row is
// loaded once for N queries. The per-query kernels (na_kernels.h) spend a horizontal sum per
// logit, and the 2x2 blocks of block_fwd.h waste the union of windows (~23% for 7x7 windows);
// here only lanes past the end of a tile row are idle. Bias rows are shared the same way (the
// bias index of lane i is `rb + ob[i] + t`, or one broadcast value where all lanes agree), the
// masks are `t < count[i]` (causal axes and clamped maps).
//
//   logits  S[row][t][lanes]: per window row, NJ <= 8 keys in registers, 1 + NJ loads per NJ
//           FMAs (the q vector and NJ key vectors);
//   softmax per lane over chunks of window rows (running max and sum; a chunk is at most
//           kStripVecs vectors, so the logits stay in L1);
//   output  O[c][lanes] += P[row][t][lanes] * V_t[c][lanes], 8 features per pass, V packed
//           transposed like K.
//
// Lanes whose windows do not fit one load (o or the bias offsets spanning N or more: strides of
// N or more) split the strip; a strip can be one query (its lanes all equal). Results are
// computed in a fixed order per query: independent of threads, tiling and strip boundaries up
// to the order of the per-row reductions (deterministic for a given shape).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "block_fwd.h"
#include "na_kernels.h"
#include "shared_fwd.h"

// GCC 12 reports its own AVX-512 permute intrinsics (an undefined pass-through operand) as
// maybe-uninitialized when they are inlined here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace natjax {

#if NATJAX_AVX2

// log(m) for m in [0.75, 1.5) on the lanes of L (L::log_ge1): 2 atanh(s), s = (m - 1) / (m + 1),
// |s| <= 0.2, to s^11 (truncation < 1e-9 relative: float32 rounding dominates).
template <class L>
inline typename L::V log_mantissa(typename L::V m) {
  const typename L::V s = L::div(L::sub(m, L::set1(1.f)), L::add(m, L::set1(1.f)));
  const typename L::V s2 = L::mul(s, s);
  typename L::V p = L::set1(1.f / 11);
  for (float c : {1.f / 9, 1.f / 7, 1.f / 5, 1.f / 3, 1.f}) p = L::fma(p, s2, L::set1(c));
  return L::mul(L::add(s, s), p);
}

// 8 float32 lanes (AVX2 + FMA).
struct Lanes8 {
  using V = __m256;
  using I = __m256i;
  static constexpr int N = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V div_one(V a) { return _mm256_div_ps(_mm256_set1_ps(1.f), a); }
  static V perm(V v, I idx) { return _mm256_permutevar8x32_ps(v, idx); }
  static I load_idx(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  // x where t < cnt (per lane), else -inf.
  static V window(V x, int32_t t, I cnt) {
    const V keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(cnt, _mm256_set1_epi32(t)));
    return _mm256_blendv_ps(set1(-std::numeric_limits<float>::infinity()), x, keep);
  }
  static V exp(V x) { return exp256(x); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  // log(x) for finite x >= 1 (softmax denominators: a sum of exps, one of them exp(0)).
  static V log_ge1(V x) {
    const __m256i xi = _mm256_castps_si256(x);
    __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(127));
    V m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(xi, _mm256_set1_epi32(0x7fffff)),
                                              _mm256_set1_epi32(0x3f800000)));  // [1, 2)
    const V big = _mm256_cmp_ps(m, set1(1.5f), _CMP_GE_OQ);  // -> [0.75, 1), one more power
    m = _mm256_blendv_ps(m, mul(m, set1(0.5f)), big);
    e = _mm256_sub_epi32(e, _mm256_castps_si256(big));  // big lanes are -1 as integers
    return fma(_mm256_cvtepi32_ps(e), set1(0.69314718056f), log_mantissa<Lanes8>(m));
  }
  // First n (< N) elements from p, zeros after; and the store of the first n.
  static V load_n(const float* p, int64_t n) {
    return n >= N ? loadu(p) : _mm256_maskload_ps(p, _mm256_castps_si256(lane_mask(n)));
  }
  static void store_n(float* p, V x, int64_t n) {
    if (n >= N)
      storeu(p, x);
    else
      _mm256_maskstore_ps(p, _mm256_castps_si256(lane_mask(n)), x);
  }
  // In-place transpose of the 8 x 8 block r[row][lane].
  static void transpose(V r[N]) {
    V t[8], u[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {
      u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
      u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
      u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
      r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
      r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
  }
  // Lanes seen non-finite (finite() accumulates them; any() reads them).
  using M = __m256;
  static M no_bad() { return _mm256_setzero_ps(); }
  static bool any(M m) { return _mm256_movemask_ps(m) != 0; }
  // x, or 0 where x is NaN or +-inf (Read::kInput); such lanes are added to `bad`.
  static V finite(V x, M& bad) {
    const V a = _mm256_andnot_ps(_mm256_set1_ps(-0.f), x);
    const V ok = _mm256_cmp_ps(a, _mm256_set1_ps(std::numeric_limits<float>::max()), _CMP_LE_OQ);
    bad = _mm256_or_ps(bad, _mm256_andnot_ps(ok, _mm256_castsi256_ps(_mm256_set1_epi32(-1))));
    return _mm256_and_ps(x, ok);
  }
};

#if defined(__AVX512F__)
// 16 float32 lanes (AVX-512F).
struct Lanes16 {
  using V = __m512;
  using I = __m512i;
  static constexpr int N = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V div_one(V a) { return _mm512_div_ps(_mm512_set1_ps(1.f), a); }
  static V perm(V v, I idx) { return _mm512_permutexvar_ps(idx, v); }
  static I load_idx(const int32_t* p) { return _mm512_loadu_si512(p); }
  static V window(V x, int32_t t, I cnt) {
    const __mmask16 keep = _mm512_cmpgt_epi32_mask(cnt, _mm512_set1_epi32(t));
    return _mm512_mask_blend_ps(keep, set1(-std::numeric_limits<float>::infinity()), x);
  }
  static V exp(V x) { return exp512(x); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V log_ge1(V x) {
    // x = m * 2^e with m in [0.75, 1.5): e = floor(log2(x * 4/3)).
    const V e = _mm512_maskz_getexp_ps(0xFFFF, _mm512_mul_ps(x, set1(4.f / 3)));
    const V m = _mm512_maskz_scalef_ps(0xFFFF, x, _mm512_sub_ps(zero(), e));  // maskz: no undefined inputs (GCC 12 -Wuninitialized)
    return fma(e, set1(0.69314718056f), log_mantissa<Lanes16>(m));
  }
  static V load_n(const float* p, int64_t n) {
    return n >= N ? loadu(p) : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  }
  static void store_n(float* p, V x, int64_t n) {
    if (n >= N)
      storeu(p, x);
    else
      _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), x);
  }
  // In-place transpose of the 16 x 16 block r[row][lane]: 2x2 blocks of elements, of pairs,
  // of 128-bit quarters, then of 256-bit halves.
  static void transpose(V r[N]) {
    V t[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
      r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
      r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
      r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 4; ++j) {
        t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
        t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xDD);
      }
    for (int j = 0; j < 8; ++j) {
      r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
      r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
    }
  }
  using M = __mmask16;
  static M no_bad() { return 0; }
  static bool any(M m) { return m != 0; }
  static V finite(V x, M& bad) {
    const V a = _mm512_abs_ps(x);
    const __mmask16 ok = _mm512_cmp_ps_mask(a, _mm512_set1_ps(std::numeric_limits<float>::max()), _CMP_LE_OQ);
    bad = static_cast<__mmask16>(bad | static_cast<__mmask16>(~ok));
    return _mm512_maskz_mov_ps(ok, x);
  }
};
using StripLanes = Lanes16;
#else
using StripLanes = Lanes8;
#endif

constexpr int64_t kStripVecs = 256;  // logit vectors per softmax chunk (8-16 KiB, in L1)
constexpr int kStripKeys = 8;        // keys per QK micro-kernel call
constexpr int kStripFeatures = 8;    // features per PV micro-kernel call

// One strip: its queries' windows relative to the key halo, for one query head.
struct Strip {
  static constexpr int kMax = 16;
  alignas(64) int32_t o[kMax];    // lane's window start along the innermost axis, minus base
  alignas(64) int32_t ob[kMax];   // lane's bias start along the innermost axis, minus rb
  alignas(64) int32_t cnt[kMax];  // lane's key count along the innermost axis
  int64_t row0 = 0;               // flat [B, N, H] row of lane 0; lane i's is row0 + i * step
  int64_t step = 0;
  int64_t u0 = 0;                  // lane 0's index along the tile's innermost axis
  int nl = 0;
  int64_t base = 0, rb = 0, cmax = 0;
  bool perm_k = false, perm_b = false, masked = false;
  Window w;  // the outer axes' window (shared by the lanes) and lane 0's innermost one
};

// s[t][lanes] = sum_c qt[c][lanes] * K_t[c][lanes], t < NJ; `k` points at key 0 of the run.
template <class L, int NJ, bool P>
inline void strip_qk(const float* qt, int64_t dim, const float* k, int64_t ldk, typename L::I o,
                     float* s) {
  typename L::V acc[NJ];
  for (int t = 0; t < NJ; ++t) acc[t] = L::zero();
  for (int64_t c = 0; c < dim; ++c, k += ldk) {
    const typename L::V q = L::loadu(qt + c * L::N);
    for (int t = 0; t < NJ; ++t) {
      typename L::V x = L::loadu(k + t);
      if constexpr (P) x = L::perm(x, o);
      acc[t] = L::fma(q, x, acc[t]);
    }
  }
  for (int t = 0; t < NJ; ++t) L::storeu(s + t * L::N, acc[t]);
}

template <class L, bool P>
inline void strip_qk_run(const float* qt, int64_t dim, const float* k, int64_t ldk,
                         typename L::I o, int64_t n, float* s) {
  for (int64_t t0 = 0; t0 < n; t0 += kStripKeys) {
    const float* kk = k + t0;
    float* ss = s + t0 * L::N;
    switch (std::min<int64_t>(kStripKeys, n - t0)) {
      case 1: strip_qk<L, 1, P>(qt, dim, kk, ldk, o, ss); break;
      case 2: strip_qk<L, 2, P>(qt, dim, kk, ldk, o, ss); break;
      case 3: strip_qk<L, 3, P>(qt, dim, kk, ldk, o, ss); break;
      case 4: strip_qk<L, 4, P>(qt, dim, kk, ldk, o, ss); break;
      case 5: strip_qk<L, 5, P>(qt, dim, kk, ldk, o, ss); break;
      case 6: strip_qk<L, 6, P>(qt, dim, kk, ldk, o, ss); break;
      case 7: strip_qk<L, 7, P>(qt, dim, kk, ldk, o, ss); break;
      default: strip_qk<L, 8, P>(qt, dim, kk, ldk, o, ss); break;
    }
  }
}

// acc[c][lanes] += sum_rows sum_t p[row][t][lanes] * V_t[c][lanes], c < NC; `vt` points at
// feature 0 of the block, `voff[r]` is row r's run offset (halo position of key 0).
template <class L, int NC, bool P>
inline void strip_pv(const float* p, int64_t nrows, int64_t n, const float* vt, int64_t ldv,
                     const int64_t* voff, typename L::I o, float* acc) {
  typename L::V a[NC];
  for (int c = 0; c < NC; ++c) a[c] = L::loadu(acc + c * L::N);
  for (int64_t r = 0; r < nrows; ++r) {
    const float* pr = p + r * n * L::N;
    const float* vr = vt + voff[r];
    for (int64_t t = 0; t < n; ++t) {
      const typename L::V w = L::loadu(pr + t * L::N);
      for (int c = 0; c < NC; ++c) {
        typename L::V x = L::loadu(vr + c * ldv + t);
        if constexpr (P) x = L::perm(x, o);
        a[c] = L::fma(w, x, a[c]);
      }
    }
  }
  for (int c = 0; c < NC; ++c) L::storeu(acc + c * L::N, a[c]);
}

template <class L, bool P>
inline void strip_pv_all(const float* p, int64_t nrows, int64_t n, const float* vt, int64_t ldv,
                         int64_t dim, const int64_t* voff, typename L::I o, float* acc) {
  for (int64_t c0 = 0; c0 < dim; c0 += kStripFeatures) {
    const float* v = vt + c0 * ldv;
    float* a = acc + c0 * L::N;
    switch (std::min<int64_t>(kStripFeatures, dim - c0)) {
      case 1: strip_pv<L, 1, P>(p, nrows, n, v, ldv, voff, o, a); break;
      case 2: strip_pv<L, 2, P>(p, nrows, n, v, ldv, voff, o, a); break;
      case 3: strip_pv<L, 3, P>(p, nrows, n, v, ldv, voff, o, a); break;
      case 4: strip_pv<L, 4, P>(p, nrows, n, v, ldv, voff, o, a); break;
      case 5: strip_pv<L, 5, P>(p, nrows, n, v, ldv, voff, o, a); break;
      case 6: strip_pv<L, 6, P>(p, nrows, n, v, ldv, voff, o, a); break;
      case 7: strip_pv<L, 7, P>(p, nrows, n, v, ldv, voff, o, a); break;
      default: strip_pv<L, 8, P>(p, nrows, n, v, ldv, voff, o, a); break;
    }
  }
}

// Several tile rows at once (kStripRows, consecutive along the second axis): their windows share
// most key rows, so each key vector loaded feeds every row's strip (R FMAs per load instead of
// one: the single-row kernels above are load-bound). Key rows outside a tile row's window still
// run through the kernels for that row, into a discarded buffer (QK) or with p = 0 (PV: exact,
// the packed values are finite).
#if defined(__AVX512F__)
constexpr int kStripRows = 3;      // 3 rows x 7 keys (QK) or 8 features (PV) in 32 registers
constexpr int kRowsKeys = 7;
constexpr int kRowsFeatures = 8;
#else
constexpr int kStripRows = 2;      // 2 rows x 6 keys or 6 features in 16 registers
constexpr int kRowsKeys = 6;
constexpr int kRowsFeatures = 6;
#endif
constexpr int64_t kRowsMaxVecs = 1024;  // logit vectors per tile row for this path (exact softmax)

// s[r][t][lanes] = sum_c qt[r][c][lanes] * K_t[c][lanes], r < R, t < NJ.
template <class L, int R, int NJ, bool P>
inline void strip_qk_rows(const float* const* qt, int64_t dim, const float* k, int64_t ldk,
                          typename L::I o, float* const* s) {
  typename L::V acc[R][NJ];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NJ; ++t) acc[r][t] = L::zero();
  for (int64_t c = 0; c < dim; ++c, k += ldk) {
    typename L::V q[R];
    for (int r = 0; r < R; ++r) q[r] = L::loadu(qt[r] + c * L::N);
    for (int t = 0; t < NJ; ++t) {
      typename L::V x = L::loadu(k + t);
      if constexpr (P) x = L::perm(x, o);
      for (int r = 0; r < R; ++r) acc[r][t] = L::fma(q[r], x, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NJ; ++t) L::storeu(s[r] + t * L::N, acc[r][t]);
}

template <class L, int R, bool P, int NJ = kRowsKeys>
inline void strip_qk_rows_n(int nj, const float* const* qt, int64_t dim, const float* k,
                            int64_t ldk, typename L::I o, float* const* s) {
  if (nj == NJ) return strip_qk_rows<L, R, NJ, P>(qt, dim, k, ldk, o, s);
  if constexpr (NJ > 1) strip_qk_rows_n<L, R, P, NJ - 1>(nj, qt, dim, k, ldk, o, s);
}

// acc[r][c][lanes] += sum over key rows kr, t: p[kr][r][t][lanes] * V_t[c][lanes], c < NC.
template <class L, int R, int NC, bool P>
inline void strip_pv_rows(const float* const* p, int64_t nkr, int64_t n, const float* vt,
                          int64_t ldv, const int64_t* voff, typename L::I o, float* const* acc) {
  typename L::V a[R][NC];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) a[r][c] = L::loadu(acc[r] + c * L::N);
  for (int64_t kr = 0; kr < nkr; ++kr) {
    const float* const* pk = p + kr * R;
    const float* v = vt + voff[kr];
    for (int64_t t = 0; t < n; ++t) {
      typename L::V w[R];
      for (int r = 0; r < R; ++r) w[r] = L::loadu(pk[r] + t * L::N);
      for (int c = 0; c < NC; ++c) {
        typename L::V x = L::loadu(v + c * ldv + t);
        if constexpr (P) x = L::perm(x, o);
        for (int r = 0; r < R; ++r) a[r][c] = L::fma(w[r], x, a[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NC; ++c) L::storeu(acc[r] + c * L::N, a[r][c]);
}

template <class L, int R, bool P, int NC = kRowsFeatures>
inline void strip_pv_rows_n(int nc, const float* const* p, int64_t nkr, int64_t n,
                            const float* vt, int64_t ldv, const int64_t* voff, typename L::I o,
                            float* const* acc) {
  if (nc == NC) return strip_pv_rows<L, R, NC, P>(p, nkr, n, vt, ldv, voff, o, acc);
  if constexpr (NC > 1) strip_pv_rows_n<L, R, P, NC - 1>(nc, p, nkr, n, vt, ldv, voff, o, acc);
}

// A tile row: its outer axes' window and the flat position of its first query.
struct StripRow {
  Window w;
  int64_t flat;
};

// Scratch of the strip forward (per thread, reused across calls).
struct StripScratch {
  std::vector<float> kt, vt, qt, s, acc, bias;
  std::vector<float> zero, dummy;
  std::vector<int64_t> koff;
  std::vector<float*> pk;  // per (key row, tile row): its logit row, or null (then zeros)
  std::vector<Strip> strips;
  std::vector<StripRow> rows;
  bool nonfinite = false;  // the unit read a NaN/inf q, k or v element
};

inline StripScratch& strip_scratch() {
  thread_local StripScratch s;
  return s;
}

// The packed halo of a unit: K and V transposed (feature-major runs of halo positions).
struct StripHalo {
  const float* kt;
  const float* vt;
  int64_t ldk, ldv, n1, n2;
};

// The strip's q rows (row0 + i * step, i < nl) transposed and scaled into qt[c][lanes]; idle
// lanes repeat the last real query.
template <class L, typename T>
inline void strip_load_q(const Geometry& g, const FwdArgs<T, float>& args, int64_t row0,
                         int64_t step, int nl, float* qt, bool& nonfinite) {
  constexpr int N = L::N;
  const int64_t dim = g.head_dim;
  const float scale = static_cast<float>(g.scale);
  const T* q0 = args.q + row0 * dim;
  if constexpr (std::is_same_v<T, float>) {
    // N features of the N rows at a time, transposed in registers.
    const typename L::V sc = L::set1(scale);
    typename L::M bad = L::no_bad();
    for (int64_t c0 = 0; c0 < dim; c0 += N) {
      const int64_t nc = std::min<int64_t>(N, dim - c0);
      typename L::V r[N];
      for (int i = 0; i < N; ++i)
        r[i] = L::finite(L::load_n(q0 + std::min(i, nl - 1) * step * dim + c0, nc), bad);
      L::transpose(r);
      for (int64_t c = 0; c < nc; ++c) L::storeu(qt + (c0 + c) * N, L::mul(r[c], sc));
    }
    nonfinite |= L::any(bad);
  } else {
    for (int i = 0; i < N; ++i) {
      const T* q = q0 + std::min(i, nl - 1) * step * dim;
      uint32_t bad = 0;
      for (int64_t c = 0; c < dim; ++c) {
        const float y = to_float(q[c]);
        bad |= nonfinite_bits(y);
        qt[c * N + i] = finite_or_zero(y) * scale;
      }
      nonfinite |= top_bit(bad);
    }
  }
}

// Writes the strip's out rows (acc[c][lanes] / l) and lse (m + log l) for its nl real lanes.
template <class L, typename T>
inline void strip_finish(const Geometry& g, const FwdArgs<T, float>& args, int64_t row0,
                         int64_t step, int nl, const float* acc, typename L::V m,
                         typename L::V l) {
  constexpr int N = L::N;
  const int64_t vdim = g.value_dim;
  alignas(64) float lse[N], ll[N];
  L::storeu(lse, L::add(m, L::log_ge1(l)));
  L::storeu(ll, l);
  T* out0 = args.out + row0 * vdim;
  if constexpr (std::is_same_v<T, float>) {
    const typename L::V inv = L::div_one(l);
    for (int64_t c0 = 0; c0 < vdim; c0 += N) {
      const int64_t nc = std::min<int64_t>(N, vdim - c0);
      typename L::V r[N];
      for (int c = 0; c < N; ++c) r[c] = c < nc ? L::mul(L::loadu(acc + (c0 + c) * N), inv) : L::zero();
      L::transpose(r);
      for (int i = 0; i < nl; ++i) L::store_n(out0 + i * step * vdim + c0, r[i], nc);
    }
  } else {
    for (int i = 0; i < nl; ++i) {
      T* out = out0 + i * step * vdim;
      const float inv = 1.f / ll[i];
      for (int64_t c = 0; c < vdim; ++c) out[c] = from_float<T>(acc[c * N + i] * inv);
    }
  }
  for (int i = 0; i < nl; ++i) args.lse[row0 + i * step] = lse[i];
}

// The keys (or values) of the halo `box`, transposed like box_transposed (block_fwd.h): feature
// c of halo position p at pack[c * ld + p], non-finite elements as 0. For float32 inputs, N
// positions x N features at a time through a register transpose (the scalar packing took a
// fifth of the strip forward's time on 56x56 maps).
template <class L, typename T>
const float* strip_pack(const Geometry& g, const T* src, int64_t b, int64_t head, int64_t nheads,
                        int64_t dim, const Range box[kAxes], int64_t* ld, std::vector<float>& pack,
                        bool& nonfinite) {
  if constexpr (!std::is_same_v<T, float>) {
    return box_transposed(g, src, b, head, nheads, dim, box, ld, pack, &nonfinite);
  } else {
    typename L::M bad = L::no_bad();
    constexpr int N = L::N;
    const int64_t vol = box_volume(box);
    int64_t l = pad_lanes(vol) + 16;
    if (l % 256 == 0) l += 8;
    *ld = l;
    pack.resize(dim * l);
    for (int64_t c = 0; c < dim; ++c) std::fill(pack.data() + c * l + vol, pack.data() + (c + 1) * l, 0.f);
    const int64_t n2 = box[2].count, step2 = g.axis[2].dilation * nheads * dim;
    int64_t p = 0;
    for (int64_t x0 = 0; x0 < box[0].count; ++x0)
      for (int64_t x1 = 0; x1 < box[1].count; ++x1, p += n2) {
        const float* row = src + ((b * g.tokens + g.flat(box[0].start + g.axis[0].dilation * x0,
                                                          box[1].start + g.axis[1].dilation * x1,
                                                          box[2].start)) * nheads + head) * dim;
        for (int64_t u0 = 0; u0 < n2; u0 += N) {
          const int64_t nu = std::min<int64_t>(N, n2 - u0);
          for (int64_t c0 = 0; c0 < dim; c0 += N) {
            const int64_t nc = std::min<int64_t>(N, dim - c0);
            typename L::V r[N];
            for (int i = 0; i < N; ++i)
              r[i] = i < nu ? L::finite(L::load_n(row + (u0 + i) * step2 + c0, nc), bad) : L::zero();
            L::transpose(r);
            for (int64_t c = 0; c < nc; ++c) L::store_n(pack.data() + (c0 + c) * l + p + u0, r[c], nu);
          }
        }
      }
    nonfinite |= L::any(bad);
    return pack.data();
  }
}

// One strip of one head: writes its queries' out rows and lse.
template <class L, typename T>
void forward_strip(const Geometry& g, const FwdArgs<T, float>& args, const StripHalo& hk,
                   const float* bias, const Strip& st, StripScratch& ss) {
  using V = typename L::V;
  constexpr int N = L::N;
  const int64_t dim = g.head_dim, vdim = g.value_dim, n = st.cmax;
  ss.qt.resize(dim * N);
  strip_load_q<L, T>(g, args, st.row0, st.step, st.nl, ss.qt.data(), ss.nonfinite);
  const Window& w = st.w;
  const int64_t nrows = w.rows();
  const int64_t per_chunk = std::max<int64_t>(1, kStripVecs / n);
  ss.s.resize(std::min(per_chunk, nrows) * n * N);
  ss.koff.resize(nrows);
  ss.acc.assign(vdim * N, 0.f);
  for (int64_t r = 0; r < nrows; ++r) {
    const int64_t x0 = r / w.c[1], x1 = r % w.c[1];
    ss.koff[r] = ((w.o[0] + x0) * hk.n1 + (w.o[1] + x1)) * hk.n2 + st.base;
  }
  const typename L::I o = L::load_idx(st.o), ob = L::load_idx(st.ob), cnt = L::load_idx(st.cnt);
  const V neg_inf = L::set1(-std::numeric_limits<float>::infinity());
  V m = neg_inf, l = L::zero();
  for (int64_t r0 = 0; r0 < nrows; r0 += per_chunk) {
    const int64_t nr = std::min(per_chunk, nrows - r0);
    V mc = neg_inf;
    for (int64_t rr = 0; rr < nr; ++rr) {
      const int64_t r = r0 + rr;
      float* s = ss.s.data() + rr * n * N;
      const float* k = hk.kt + ss.koff[r];
      if (st.perm_k)
        strip_qk_run<L, true>(ss.qt.data(), dim, k, hk.ldk, o, n, s);
      else
        strip_qk_run<L, false>(ss.qt.data(), dim, k, hk.ldk, o, n, s);
      // Bias row of this window row (rb + t along the innermost axis), then the lane masks.
      const float* br = nullptr;
      if (g.has_rpb) {
        const int64_t x0 = r / w.c[1], x1 = r % w.c[1];
        br = bias + ((w.r[0] + x0) * w.rd1 + (w.r[1] + x1)) * w.rd2 + st.rb;
      }
      for (int64_t t = 0; t < n; ++t) {
        V x = L::loadu(s + t * N);
        if (br) x = L::add(x, st.perm_b ? L::perm(L::loadu(br + t), ob) : L::set1(br[t]));
        if (st.masked) x = L::window(x, static_cast<int32_t>(t), cnt);
        mc = L::max(mc, x);
        L::storeu(s + t * N, x);
      }
    }
    // Online softmax over chunks (every lane has >= 1 key per row, so mc is finite).
    const V m_new = L::max(m, mc);
    if (r0 > 0) {
      const V alpha = L::exp(L::sub(m, m_new));
      l = L::mul(l, alpha);
      for (int64_t c = 0; c < vdim; ++c)
        L::storeu(ss.acc.data() + c * N, L::mul(L::loadu(ss.acc.data() + c * N), alpha));
    }
    m = m_new;
    float* s = ss.s.data();
    for (int64_t j = 0; j < nr * n; ++j) {
      const V p = L::exp(L::sub(L::loadu(s + j * N), m));
      l = L::add(l, p);
      L::storeu(s + j * N, p);
    }
    const int64_t* voff = ss.koff.data() + r0;
    if (st.perm_k)
      strip_pv_all<L, true>(s, nr, n, hk.vt, hk.ldv, vdim, voff, o, ss.acc.data());
    else
      strip_pv_all<L, false>(s, nr, n, hk.vt, hk.ldv, vdim, voff, o, ss.acc.data());
  }
  strip_finish<L, T>(g, args, st.row0, st.step, st.nl, ss.acc.data(), m, l);
}

// R tile rows (`rows`, consecutive along the second axis, one first-axis position) of one strip
// column and head, exact softmax (every row's window fits kRowsMaxVecs logit vectors).
template <class L, int R, typename T>
void forward_strip_rows(const Geometry& g, const FwdArgs<T, float>& args, const StripHalo& hk,
                        const float* bias, const Strip& st, const StripRow* rows,
                        const int64_t* row0, StripScratch& ss) {
  using V = typename L::V;
  constexpr int N = L::N;
  const int64_t dim = g.head_dim, vdim = g.value_dim, n = st.cmax;
  const int64_t nvec = n * N;  // floats per window row of logits
  const Window& w0 = rows[0].w;
  int64_t lo = w0.o[1], hi = w0.o[1] + w0.c[1], maxrows = 0;
  for (int r = 0; r < R; ++r) {
    lo = std::min(lo, rows[r].w.o[1]);
    hi = std::max(hi, rows[r].w.o[1] + rows[r].w.c[1]);
    maxrows = std::max(maxrows, rows[r].w.rows());
  }
  const int64_t span = hi - lo, nkr = w0.c[0] * span;
  ss.qt.resize(R * dim * N);
  ss.s.resize(R * maxrows * nvec);
  ss.acc.assign(R * vdim * N, 0.f);
  ss.zero.assign(pad_lanes(n) * N, 0.f);
  ss.dummy.resize(pad_lanes(n) * N);
  ss.koff.resize(nkr);
  ss.pk.resize(nkr * R);
  const float* qt[R];
  float* sr[R];
  float* acc[R];
  for (int r = 0; r < R; ++r) {
    float* q = ss.qt.data() + r * dim * N;
    strip_load_q<L, T>(g, args, row0[r], st.step, st.nl, q, ss.nonfinite);
    qt[r] = q;
    sr[r] = ss.s.data() + r * maxrows * nvec;
    acc[r] = ss.acc.data() + r * vdim * N;
  }
  // Key rows of the union: (first-axis row y0, second-axis halo row k1); per tile row, the
  // logit row it fills (or none).
  for (int64_t kr = 0; kr < nkr; ++kr) {
    const int64_t y0 = kr / span, k1 = lo + kr % span;
    ss.koff[kr] = ((w0.o[0] + y0) * hk.n1 + k1) * hk.n2 + st.base;
    for (int r = 0; r < R; ++r) {
      const Window& w = rows[r].w;
      const int64_t y1 = k1 - w.o[1];
      ss.pk[kr * R + r] = (y1 >= 0 && y1 < w.c[1]) ? sr[r] + (y0 * w.c[1] + y1) * nvec : nullptr;
    }
  }
  const typename L::I o = L::load_idx(st.o), ob = L::load_idx(st.ob), cnt = L::load_idx(st.cnt);
  for (int64_t kr = 0; kr < nkr; ++kr) {
    const float* k = hk.kt + ss.koff[kr];
    for (int64_t t0 = 0; t0 < n; t0 += kRowsKeys) {
      float* sp[R];
      for (int r = 0; r < R; ++r) {
        float* d = ss.pk[kr * R + r];
        sp[r] = (d ? d : ss.dummy.data()) + t0 * N;
      }
      const int nj = static_cast<int>(std::min<int64_t>(kRowsKeys, n - t0));
      if (st.perm_k)
        strip_qk_rows_n<L, R, true>(nj, qt, dim, k + t0, hk.ldk, o, sp);
      else
        strip_qk_rows_n<L, R, false>(nj, qt, dim, k + t0, hk.ldk, o, sp);
    }
  }
  // Bias, masks and the exact softmax of each tile row.
  const V neg_inf = L::set1(-std::numeric_limits<float>::infinity());
  V m[R], l[R];
  for (int r = 0; r < R; ++r) {
    const Window& w = rows[r].w;
    V mx = neg_inf;
    for (int64_t wr = 0; wr < w.rows(); ++wr) {
      float* s = sr[r] + wr * nvec;
      const float* br = nullptr;
      if (g.has_rpb)
        br = bias + ((w.r[0] + wr / w.c[1]) * w.rd1 + (w.r[1] + wr % w.c[1])) * w.rd2 + st.rb;
      for (int64_t t = 0; t < n; ++t) {
        V x = L::loadu(s + t * N);
        if (br) x = L::add(x, st.perm_b ? L::perm(L::loadu(br + t), ob) : L::set1(br[t]));
        if (st.masked) x = L::window(x, static_cast<int32_t>(t), cnt);
        mx = L::max(mx, x);
        L::storeu(s + t * N, x);
      }
    }
    V sum = L::zero();
    float* s = sr[r];
    for (int64_t j = 0; j < w.rows() * n; ++j) {
      const V p = L::exp(L::sub(L::loadu(s + j * N), mx));
      sum = L::add(sum, p);
      L::storeu(s + j * N, p);
    }
    m[r] = mx;
    l[r] = sum;
  }
  for (auto& p : ss.pk)
    if (!p) p = ss.zero.data();
  for (int64_t c0 = 0; c0 < vdim; c0 += kRowsFeatures) {
    float* ap[R];
    for (int r = 0; r < R; ++r) ap[r] = acc[r] + c0 * N;
    const int nc = static_cast<int>(std::min<int64_t>(kRowsFeatures, vdim - c0));
    if (st.perm_k)
      strip_pv_rows_n<L, R, true>(nc, ss.pk.data(), nkr, n, hk.vt + c0 * hk.ldv, hk.ldv,
                                  ss.koff.data(), o, ap);
    else
      strip_pv_rows_n<L, R, false>(nc, ss.pk.data(), nkr, n, hk.vt + c0 * hk.ldv, hk.ldv,
                                   ss.koff.data(), o, ap);
  }
  for (int r = 0; r < R; ++r) strip_finish<L, T>(g, args, row0[r], st.step, st.nl, acc[r], m[r], l[r]);
}

// The forward of one work unit by strips along the innermost axis.
// Returns whether the unit read a non-finite q, k or v element.
template <typename T>
bool forward_unit_strips(const Geometry& g, const FwdArgs<T, float>& args, const Unit& un) {
  using L = StripLanes;
  constexpr int N = L::N;
  StripScratch& ss = strip_scratch();
  const int64_t group = g.group_size(), b = un.b, kvh = un.kvh;
  const Range* qr = un.qr;
  const Range* kh = un.kh;
  StripHalo hk;
  ss.nonfinite = false;
  hk.kt = strip_pack<L, T>(g, args.k, b, kvh, g.kv_heads, g.head_dim, kh, &hk.ldk, ss.kt,
                           ss.nonfinite);
  hk.vt = strip_pack<L, T>(g, args.v, b, kvh, g.kv_heads, g.value_dim, kh, &hk.ldv, ss.vt,
                           ss.nonfinite);
  hk.n1 = kh[1].count;
  hk.n2 = kh[2].count;
  // The strips along the innermost axis: the same for every row and head of the tile.
  ss.strips.clear();
  {
    int64_t p[kAxes] = {qr[0].start, qr[1].start, 0};
    Window lane[N];
    for (int64_t u = 0; u < qr[2].count;) {
      // Greedy: as many consecutive queries as fit one load (offsets spanning < N).
      Strip st;
      int nl = 0;
      int64_t olo = 0, ohi = 0, blo = 0, bhi = 0;
      while (nl < N && u + nl < qr[2].count) {
        p[2] = qr[2].start + g.axis[2].dilation * (u + nl);
        const Window wi(g, p, kh);
        const int64_t nlo = nl ? std::min(olo, wi.o[2]) : wi.o[2];
        const int64_t nhi = nl ? std::max(ohi, wi.o[2]) : wi.o[2];
        const int64_t nblo = nl ? std::min(blo, wi.r[2]) : wi.r[2];
        const int64_t nbhi = nl ? std::max(bhi, wi.r[2]) : wi.r[2];
        if (nl && (nhi - nlo >= N || nbhi - nblo >= N)) break;
        olo = nlo, ohi = nhi, blo = nblo, bhi = nbhi;
        lane[nl++] = wi;
      }
      st.nl = nl;
      st.u0 = u;
      st.base = olo;
      st.rb = blo;
      // Idle lanes (past the tile row) take the last query's counts and read any key of the
      // loaded vector (o = i keeps the identity permutation where the real lanes have it);
      // their results are dropped.
      for (int i = 0; i < N; ++i) {
        const Window& wi = lane[std::min(i, nl - 1)];
        st.o[i] = i < nl ? static_cast<int32_t>(wi.o[2] - olo) : i;
        st.ob[i] = i < nl ? static_cast<int32_t>(wi.r[2] - blo) : 0;
        st.cnt[i] = static_cast<int32_t>(wi.c[2]);
        st.cmax = std::max<int64_t>(st.cmax, wi.c[2]);
        st.perm_k |= st.o[i] != i;
        st.perm_b |= st.ob[i] != 0;
      }
      for (int i = 0; i < N; ++i) st.masked |= st.cnt[i] != st.cmax;
      ss.strips.push_back(st);
      u += nl;
    }
  }
  // The outer axes' window of each tile row.
  ss.rows.clear();
  for (int64_t x0 = 0; x0 < qr[0].count; ++x0)
    for (int64_t x1 = 0; x1 < qr[1].count; ++x1) {
      const int64_t p[kAxes] = {qr[0].start + g.axis[0].dilation * x0,
                                qr[1].start + g.axis[1].dilation * x1, qr[2].start};
      ss.rows.push_back({Window(g, p, kh), g.flat(p[0], p[1], p[2])});
    }
  // Rows innermost: consecutive rows of one strip column share all but one window row of
  // keys, which then stay in L1.
  const int64_t step = g.axis[2].dilation * g.heads;
  for (int64_t hh = 0; hh < group; ++hh) {
    const int64_t h = kvh * group + hh;
    const float* bias = padded_bias(g, args.rpb, h, ss.bias);
    for (Strip& st : ss.strips) {
      st.step = step;
      const bool rows_fit = st.cmax * ss.rows[0].w.c[0] * g.axis[1].max_window <= kRowsMaxVecs;
      const int64_t n1q = qr[1].count;
      for (size_t i = 0; i < ss.rows.size();) {
        // Up to kStripRows rows of one first-axis position (rows are x0-major, x1 fastest).
        const int64_t left = n1q - static_cast<int64_t>(i % n1q);
        const int nr = rows_fit ? static_cast<int>(std::min<int64_t>(kStripRows, left)) : 1;
        int64_t r0[kStripRows];
        for (int r = 0; r < nr; ++r)
          r0[r] = (b * g.tokens + ss.rows[i + r].flat) * g.heads + h + st.u0 * step;
        const StripRow* rw = &ss.rows[i];
        if (nr == 3)
          forward_strip_rows<L, std::min(3, kStripRows), T>(g, args, hk, bias, st, rw, r0, ss);
        else if (nr == 2)
          forward_strip_rows<L, 2, T>(g, args, hk, bias, st, rw, r0, ss);
        else if (rows_fit)
          forward_strip_rows<L, 1, T>(g, args, hk, bias, st, rw, r0, ss);
        else {
          st.w = rw->w;
          st.row0 = r0[0];
          forward_strip<L, T>(g, args, hk, bias, st, ss);
        }
        i += nr;
      }
    }
  }
  for (auto* buf : {&ss.kt, &ss.vt})
    if (buf->capacity() * sizeof(float) > (size_t{8} << 20)) std::vector<float>().swap(*buf);
  return ss.nonfinite;
}

// strip_pack as forward_unit_shared's key packer (register transposes: the scalar
// box_transposed took 16% of the shared-window kernel's time on 7x7 maps).
struct StripPackKeys {
  template <typename T>
  const float* operator()(const Geometry& g, const T* src, int64_t b, int64_t head,
                          int64_t nheads, int64_t dim, const Range box[kAxes], int64_t* ld,
                          std::vector<float>& pack, bool& seen) const {
    return strip_pack<StripLanes, T>(g, src, b, head, nheads, dim, box, ld, pack, seen);
  }
};

// The float32 forward of one work unit on AVX2: shared-window tiles by shared_fwd.h, other tiles
// by strips, but for single rows shorter than one strip (block_fwd.h). The choice depends on
// shapes only (deterministic results).
// Returns whether the unit read a non-finite q, k or v element.
template <typename T>
bool forward_unit_avx2(const Geometry& g, const FwdArgs<T, float>& args, int64_t unit) {
  const Unit un = decode_unit(g, unit);
  const int64_t nk = box_volume(un.kh);
  if (nk <= kSharedMaxKeys && nk * g.head_dim * int64_t{sizeof(float)} <= kBlockHaloBytes &&
      tile_shares_window(g, un)) {
    return forward_unit_shared<T>(g, args, un, StripPackKeys{});
  }
  // Strips measured 1.3-1.9x the per-query/blocked kernels on 2-D and 3-D tiles, where tile
  // rows share key loads (forward_strip_rows), and 1.1-2.0x on single rows (1-D maps: kernel 7
  // to 31, head_dim 16 to 128, dilation 1 to 16) but 0.7x on rows shorter than a strip, where
  // lanes idle (1-D 64 with dilation 8: groups of 8 queries, AVX-512; ffi/bench/fwd_kernels.cc,
  // idle machine). -DNATJAX_FFI_NO_STRIPS builds the per-query/blocked choice, for benchmarks.
#ifndef NATJAX_FFI_NO_STRIPS
  if (un.qr[1].count >= 2 || un.qr[2].count >= StripLanes::N)
    return forward_unit_strips<T>(g, args, un);
#endif
  return forward_unit_blocked<T>(g, args, un);
}

#endif  // NATJAX_AVX2

}  // namespace natjax

#pragma GCC diagnostic pop
