// Forward of tiles whose queries all see one window (float32 accumulation, AVX2+FMA or
// AVX-512, as the build's -march allows).
//
// Where a window covers its whole dilation group (NAT's last stage: a 7x7 map with kernel 7;
// DiNAT's dilated layers on maps of 7 x dilation), every query of a tile attends the same keys:
// the unit is a small dense attention, O = softmax(Q K^T + bias) V, with K and V in L1. The
// 2x2 blocks of block_fwd.h cover 64 query slots for the 49 queries of a 7x7 map and redo their
// setup (offsets, masks) per block; here the tile's queries go through GEMM-style micro-kernels
// kSharedQ at a time (8 with AVX-512, 6 with AVX2; the last block takes the remainder):
//
//   logits  S[NQ][keys] = B[NQ][keys] + Q[NQ][D] . Kt[D][keys]: keys transposed once per unit,
//           so 16 (8) keys are one vector; NQ queries x 2 vectors of keys in registers, which
//           start from the gathered bias rows B (or 0); slots past the window are -inf;
//   softmax per query over its row (exact: a row is at most `kSharedMaxKeys` logits);
//   output  O[NQ][Dv] = P[NQ][keys] . V[keys][Dv], NQ queries x 2 vectors of features.
//
// Measured on NAT-Tiny's stage 4 (batch 8, 16 heads, head_dim 32; one thread of the 2-core VM,
// private harness, load ~5-7): 1.49 ms against 1.92 ms for the 2x2 blocks (AVX-512 build).
// Results are computed in a fixed order per query: independent of threads and tiling.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "block_fwd.h"
#include "na_kernels.h"

namespace natjax {

#if NATJAX_AVX2

#if defined(__AVX512F__)
// AVX-512: 16 keys (features) per vector, 8 queries x 32 keys in 16 of the 32 registers.
// Measured 1.57x the AVX2 FMA rate on the 2-core VM (one core, independent FMA chains).
constexpr int kSharedQ = 8;
constexpr int64_t kSharedLanes = 16;
#else
constexpr int kSharedQ = 6;  // 6 queries x 16 keys in 12 of the 16 AVX2 registers
constexpr int64_t kSharedLanes = 8;
#endif
constexpr int64_t kSharedMaxKeys = 512;  // window size (keys) served by this path

// Logit slots per query: the window padded to whole vectors.
inline int64_t shared_slots(int64_t nk) {
  return (nk + kSharedLanes - 1) / kSharedLanes * kSharedLanes;
}

// Whether every query of the unit's tile has the unit's key halo as its window.
inline bool tile_shares_window(const Geometry& g, const Unit& un) {
  for (int a = 0; a < kAxes; ++a) {
    const AxisTables& ax = g.axis[a];
    for (int64_t u = 0; u < un.qr[a].count; ++u) {
      const int64_t i = un.qr[a].start + ax.dilation * u;
      if (ax.win_start[i] != un.kh[a].start || ax.win_count[i] != un.kh[a].count) return false;
    }
  }
  return true;
}

#if defined(__AVX512F__)

// S[i][0 : 16 nv] += sum_c q[i][c] kt[c][0 : 16 nv], i < NQ (S starts as the bias).
template <int NQ>
inline void shared_qk(const float* q, int64_t ldq, int64_t dim, const float* kt, int64_t ldt,
                      int64_t nv, float* s, int64_t lds) {
  int64_t v = 0;
  for (; v + 2 <= nv; v += 2) {
    __m512 a[NQ][2];
    for (int i = 0; i < NQ; ++i) {
      a[i][0] = _mm512_loadu_ps(s + i * lds + 16 * v);
      a[i][1] = _mm512_loadu_ps(s + i * lds + 16 * v + 16);
    }
    const float* k = kt + 16 * v;
    for (int64_t c = 0; c < dim; ++c, k += ldt) {
      const __m512 x = _mm512_loadu_ps(k), y = _mm512_loadu_ps(k + 16);
      for (int i = 0; i < NQ; ++i) {
        const __m512 w = _mm512_set1_ps(q[i * ldq + c]);
        a[i][0] = _mm512_fmadd_ps(w, x, a[i][0]);
        a[i][1] = _mm512_fmadd_ps(w, y, a[i][1]);
      }
    }
    for (int i = 0; i < NQ; ++i) {
      _mm512_storeu_ps(s + i * lds + 16 * v, a[i][0]);
      _mm512_storeu_ps(s + i * lds + 16 * v + 16, a[i][1]);
    }
  }
  if (v < nv) {
    __m512 a[NQ];
    for (int i = 0; i < NQ; ++i) a[i] = _mm512_loadu_ps(s + i * lds + 16 * v);
    const float* k = kt + 16 * v;
    for (int64_t c = 0; c < dim; ++c, k += ldt) {
      const __m512 x = _mm512_loadu_ps(k);
      for (int i = 0; i < NQ; ++i)
        a[i] = _mm512_fmadd_ps(_mm512_set1_ps(q[i * ldq + c]), x, a[i]);
    }
    for (int i = 0; i < NQ; ++i) _mm512_storeu_ps(s + i * lds + 16 * v, a[i]);
  }
}

// acc[i][0 : len] = sum_{j < n} p[i][j] vrows[j][0 : len], i < NQ (len a multiple of 8).
template <int NQ>
inline void shared_pv(const float* p, int64_t ldp, const float* vrows, int64_t ldv, int64_t n,
                      int64_t len, float* acc, int64_t lda) {
  int64_t f = 0;
  for (; f + 32 <= len; f += 32) {
    __m512 a[NQ][2];
    for (int i = 0; i < NQ; ++i) a[i][0] = a[i][1] = _mm512_setzero_ps();
    const float* r = vrows + f;
    for (int64_t j = 0; j < n; ++j, r += ldv) {
      const __m512 x = _mm512_loadu_ps(r), y = _mm512_loadu_ps(r + 16);
      for (int i = 0; i < NQ; ++i) {
        const __m512 w = _mm512_set1_ps(p[i * ldp + j]);
        a[i][0] = _mm512_fmadd_ps(w, x, a[i][0]);
        a[i][1] = _mm512_fmadd_ps(w, y, a[i][1]);
      }
    }
    for (int i = 0; i < NQ; ++i) {
      _mm512_storeu_ps(acc + i * lda + f, a[i][0]);
      _mm512_storeu_ps(acc + i * lda + f + 16, a[i][1]);
    }
  }
  for (; f < len; f += 8) {  // 8 or 16 features left: 8 at a time
    __m256 a[NQ];
    for (int i = 0; i < NQ; ++i) a[i] = _mm256_setzero_ps();
    const float* r = vrows + f;
    for (int64_t j = 0; j < n; ++j, r += ldv) {
      const __m256 x = _mm256_loadu_ps(r);
      for (int i = 0; i < NQ; ++i)
        a[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + i * ldp + j), x, a[i]);
    }
    for (int i = 0; i < NQ; ++i) _mm256_storeu_ps(acc + i * lda + f, a[i]);
  }
}

// The zero-masked forms of a few AVX-512 intrinsics, all lanes on (the same instructions):
// GCC 12's unmasked ones start from _mm512_undefined_*, which -Wall flags once inlined.
constexpr __mmask16 kAll16 = 0xFFFF;
inline __m512 max512(__m512 a, __m512 b) { return _mm512_maskz_max_ps(kAll16, a, b); }
inline __m512 min512(__m512 a, __m512 b) { return _mm512_maskz_min_ps(kAll16, a, b); }

// exp(x) for 16 float32 lanes: exp256's range reduction and polynomial, lane for lane.
inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f), hi = _mm512_set1_ps(88.0f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = min512(max512(x, lo), hi);
  const __m512 n = _mm512_maskz_roundscale_ps(
      kAll16, _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512i e = _mm512_maskz_slli_epi32(
      kAll16, _mm512_add_epi32(_mm512_maskz_cvtps_epi32(kAll16, n), _mm512_set1_epi32(127)), 23);
  p = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), p);
}

// The max / sum of 16 lanes by halving: 4 dependent steps instead of a chain of 15 scalar ones
// (which took ~10% of shared_block's time). Not _mm512_reduce_*: GCC 12 warns as above.
template <int Half>
inline __m256 half(__m512 v) {
  return _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xFF, _mm512_castps_pd(v), Half));
}
inline float hmax16(__m512 v) {
  const __m256 a = _mm256_max_ps(half<0>(v), half<1>(v));
  const __m128 b = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_max_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_max_ss(c, _mm_movehdup_ps(c)));
}
inline float hsum16(__m512 v) {
  const __m256 a = _mm256_add_ps(half<0>(v), half<1>(v));
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
}

// In place: s[0 : n] = exp(s - max(s)) (n a multiple of 16); *m = the max; returns the sum.
inline float shared_softmax_row(float* s, int64_t n, float* m) {
  __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) mv = max512(mv, _mm512_loadu_ps(s + j));
  *m = hmax16(mv);
  const __m512 sub = _mm512_set1_ps(*m);
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), sub));
    _mm512_storeu_ps(s + j, e);
    total = _mm512_add_ps(total, e);
  }
  return hsum16(total);
}

#else  // AVX2

// In place: s[0 : n] = exp(s - max(s)) (n a multiple of 8); *m = the max; returns the sum.
inline float shared_softmax_row(float* s, int64_t n, float* m) {
  *m = block_max(s, n);
  return exp_sub(s, m, 0, s, n);
}

// S[i][0 : 8 nv] += sum_c q[i][c] kt[c][0 : 8 nv], i < NQ (S starts as the bias).
template <int NQ>
inline void shared_qk(const float* q, int64_t ldq, int64_t dim, const float* kt, int64_t ldt,
                      int64_t nv, float* s, int64_t lds) {
  int64_t v = 0;
  for (; v + 2 <= nv; v += 2) {
    __m256 a[NQ][2];
    for (int i = 0; i < NQ; ++i) {
      a[i][0] = _mm256_loadu_ps(s + i * lds + 8 * v);
      a[i][1] = _mm256_loadu_ps(s + i * lds + 8 * v + 8);
    }
    const float* k = kt + 8 * v;
    for (int64_t c = 0; c < dim; ++c, k += ldt) {
      const __m256 x = _mm256_loadu_ps(k), y = _mm256_loadu_ps(k + 8);
      for (int i = 0; i < NQ; ++i) {
        const __m256 w = _mm256_broadcast_ss(q + i * ldq + c);
        a[i][0] = _mm256_fmadd_ps(w, x, a[i][0]);
        a[i][1] = _mm256_fmadd_ps(w, y, a[i][1]);
      }
    }
    for (int i = 0; i < NQ; ++i) {
      _mm256_storeu_ps(s + i * lds + 8 * v, a[i][0]);
      _mm256_storeu_ps(s + i * lds + 8 * v + 8, a[i][1]);
    }
  }
  if (v < nv) {
    __m256 a[NQ];
    for (int i = 0; i < NQ; ++i) a[i] = _mm256_loadu_ps(s + i * lds + 8 * v);
    const float* k = kt + 8 * v;
    for (int64_t c = 0; c < dim; ++c, k += ldt) {
      const __m256 x = _mm256_loadu_ps(k);
      for (int i = 0; i < NQ; ++i)
        a[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(q + i * ldq + c), x, a[i]);
    }
    for (int i = 0; i < NQ; ++i) _mm256_storeu_ps(s + i * lds + 8 * v, a[i]);
  }
}

// acc[i][0 : len] = sum_{j < n} p[i][j] vrows[j][0 : len], i < NQ (len a multiple of 8).
template <int NQ>
inline void shared_pv(const float* p, int64_t ldp, const float* vrows, int64_t ldv, int64_t n,
                      int64_t len, float* acc, int64_t lda) {
  int64_t f = 0;
  for (; f + 16 <= len; f += 16) {
    __m256 a[NQ][2];
    for (int i = 0; i < NQ; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
    const float* r = vrows + f;
    for (int64_t j = 0; j < n; ++j, r += ldv) {
      const __m256 x = _mm256_loadu_ps(r), y = _mm256_loadu_ps(r + 8);
      for (int i = 0; i < NQ; ++i) {
        const __m256 w = _mm256_broadcast_ss(p + i * ldp + j);
        a[i][0] = _mm256_fmadd_ps(w, x, a[i][0]);
        a[i][1] = _mm256_fmadd_ps(w, y, a[i][1]);
      }
    }
    for (int i = 0; i < NQ; ++i) {
      _mm256_storeu_ps(acc + i * lda + f, a[i][0]);
      _mm256_storeu_ps(acc + i * lda + f + 8, a[i][1]);
    }
  }
  if (f < len) {  // 8 features left
    __m256 a[NQ];
    for (int i = 0; i < NQ; ++i) a[i] = _mm256_setzero_ps();
    const float* r = vrows + f;
    for (int64_t j = 0; j < n; ++j, r += ldv) {
      const __m256 x = _mm256_loadu_ps(r);
      for (int i = 0; i < NQ; ++i)
        a[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + i * ldp + j), x, a[i]);
    }
    for (int i = 0; i < NQ; ++i) _mm256_storeu_ps(acc + i * lda + f, a[i]);
  }
}

#endif  // AVX-512 / AVX2

// Scratch of the shared-window forward (per thread, reused across calls).
struct SharedScratch {
  std::vector<float> q, s, acc;
  std::vector<int64_t> rows;
  std::vector<Window> windows;
};

inline SharedScratch& shared_scratch() {
  thread_local SharedScratch s;
  return s;
}

// d[0 : n] = s[0 : n] for a short run (a window row of the bias): one masked load and store
// where it fits a vector (the per-element copy with a division per row, before, took a third of
// shared_block's time on 7x7 maps: perf annotate of ffi/bench/fwd_kernels.cc).
inline void copy_run(const float* s, int64_t n, float* d) {
#if defined(__AVX512F__)
  if (n <= 16) {
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    _mm512_mask_storeu_ps(d, m, _mm512_maskz_loadu_ps(m, s));
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) d[j] = s[j];
}

// s[0 : lds] = the logits' starting values for a query whose window is the shared one: its bias
// over the window (rows of w.c[2] values; 0 without a bias), -inf in the slots past the nk keys.
inline void start_shared_logits(const Geometry& g, const float* bias, const Window& w,
                                int64_t nk, int64_t lds, float* s) {
  if (g.has_rpb) {
    float* d = s;
    for (int64_t x0 = 0; x0 < w.c[0]; ++x0)
      for (int64_t x1 = 0; x1 < w.c[1]; ++x1, d += w.c[2])
        copy_run(bias + w.bias_row(x0, x1), w.c[2], d);
  } else {
    std::fill(s, s + nk, 0.f);
  }
  std::fill(s + nk, s + lds, -std::numeric_limits<float>::infinity());
}

// Calls f(std::integral_constant<int, NQ>) with NQ = n (1 <= n <= kSharedQ): the micro-kernels
// take their block height as a template argument.
template <class F>
inline void with_block_height(int64_t n, F&& f) {
  switch (n) {
#if defined(__AVX512F__)
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
#endif
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// One block of NQ <= kSharedQ queries (rows[i], windows w[i], scaled q rows at q + i * dl)
// over the shared window.
template <typename T, int NQ>
void shared_block(const Geometry& g, const FwdArgs<T, float>& args, const float* kt, int64_t ldt,
                  const View<float>& V, int64_t nk, const float* bias, const Window* w,
                  const int64_t* rows, const float* q, SharedScratch& s) {
  const int64_t dl = pad_lanes(g.head_dim), dvl = pad_lanes(g.value_dim);
  const int64_t lds = shared_slots(nk);
  for (int i = 0; i < NQ; ++i) start_shared_logits(g, bias, w[i], nk, lds, s.s.data() + i * lds);
  shared_qk<NQ>(q, dl, g.head_dim, kt, ldt, lds / kSharedLanes, s.s.data(), lds);
  float m[NQ], l[NQ];
  for (int i = 0; i < NQ; ++i) {
    float* si = s.s.data() + i * lds;
    l[i] = shared_softmax_row(si, lds, &m[i]);
  }
  shared_pv<NQ>(s.s.data(), lds, V.base, V.s2, nk, dvl, s.acc.data(), dvl);
  for (int i = 0; i < NQ; ++i) {
    Softmax<float> sm;
    sm.m = m[i];
    sm.l = l[i];
    finish_query(g, sm, s.acc.data() + i * dvl, args.out + rows[i] * g.value_dim,
                 args.lse + rows[i]);
  }
}

// Prefetch hints for the rows ([B, N, nheads, dim] layout) of `box`: they are 2 * heads * dim
// bytes apart, a stride the hardware prefetchers do not follow, and the unit reads them all
// at once (issuing every miss first overlaps them).
template <typename T>
void prefetch_box(const Geometry& g, const T* src, int64_t b, int64_t head, int64_t nheads,
                  int64_t dim, const Range box[kAxes]) {
  for (int64_t x0 = 0; x0 < box[0].count; ++x0)
    for (int64_t x1 = 0; x1 < box[1].count; ++x1)
      for (int64_t x2 = 0; x2 < box[2].count; ++x2) {
        const int64_t p = g.flat(box[0].start + g.axis[0].dilation * x0,
                                 box[1].start + g.axis[1].dilation * x1,
                                 box[2].start + g.axis[2].dilation * x2);
        prefetch_row(src + ((b * g.tokens + p) * nheads + head) * dim, dim);
      }
}

// The forward of one work unit whose queries all see its key halo (tile_shares_window), with
// at most kSharedMaxKeys keys whose transposed rows fit kBlockHaloBytes. Returns whether it read
// a NaN/inf q, k or v element. `pack_keys` packs the keys transposed, in box_transposed's layout,
// recording non-finite reads in its last argument (strip_fwd.h's StripPackKeys: register
// transposes, measured faster than box_transposed's scalar ones).
template <typename T, class PackKeys>
bool forward_unit_shared(const Geometry& g, const FwdArgs<T, float>& args, const Unit& un,
                         const PackKeys& pack_keys) {
  const int64_t b = un.b, kvh = un.kvh;
  const Range* qr = un.qr;
  const Range* kh = un.kh;
  Scratch<float>& s = thread_scratch<float>();
  BlockScratch& bs = block_scratch();
  SharedScratch& ss = shared_scratch();
  const int64_t dl = pad_lanes(g.head_dim), dvl = pad_lanes(g.value_dim);
  const int64_t nk = box_volume(kh), group = g.group_size();
  prefetch_box(g, args.k, b, kvh, g.kv_heads, g.head_dim, kh);
  prefetch_box(g, args.v, b, kvh, g.kv_heads, g.value_dim, kh);
  prefetch_box(g, args.q, b, kvh * group, g.heads, g.head_dim, qr);
  // Rows of V packed densely, one after the other in window order (no gaps between rows).
  bool seen = false;
  const View<float> V = box_view(g, args.v, b, kvh, g.kv_heads, g.value_dim, kh, dvl, s.v,
                                 Read::kInput, &seen);
  int64_t ldt = 0;
  const float* kt = pack_keys(g, args.k, b, kvh, g.kv_heads, g.head_dim, kh, &ldt, bs.kt, seen);
  const float scale = static_cast<float>(g.scale);
  ss.s.resize(kSharedQ * shared_slots(nk));
  ss.acc.resize(kSharedQ * dvl);
  box_positions(g, qr, s.order);
  const int64_t nq = static_cast<int64_t>(s.order.size());
  ss.windows.resize(nq);
  for (int64_t t = 0; t < nq; ++t) ss.windows[t] = Window(g, s.order[t].p, kh);
  ss.rows.resize(nq);
  ss.q.resize(nq * dl);
  for (int64_t hh = 0; hh < group; ++hh) {
    const int64_t h = kvh * group + hh;
    const float* bias = padded_bias(g, args.rpb, h, s.bias);
    // The head's q rows, scaled, packed first: one stream of independent loads (loaded block
    // by block, each block waited for its rows: 20% of the time at 7x7, prefetch or not).
    for (int64_t t = 0; t < nq; ++t) {
      const int64_t* i = s.order[t].p;
      ss.rows[t] = (b * g.tokens + g.flat(i[0], i[1], i[2])) * g.heads + h;
      load_row(args.q + ss.rows[t] * g.head_dim, g.head_dim, scale, ss.q.data() + t * dl, dl,
               Read::kInput, &seen);
    }
    if (hh + 1 < group) prefetch_box(g, args.q, b, h + 1, g.heads, g.head_dim, qr);
    for (int64_t t = 0; t < nq; t += kSharedQ) {
      const Window* w = ss.windows.data() + t;
      const int64_t* rows = ss.rows.data() + t;
      const float* q = ss.q.data() + t * dl;
      // The next block's out rows: its stores would otherwise wait for the lines.
      for (int64_t u = t + kSharedQ; u < std::min(nq, t + 2 * kSharedQ); ++u)
        prefetch_row(args.out + ss.rows[u] * g.value_dim, g.value_dim);
      with_block_height(std::min<int64_t>(kSharedQ, nq - t), [&](auto nq_block) {
        shared_block<T, decltype(nq_block)::value>(g, args, kt, ldt, V, nk, bias, w, rows, q, ss);
      });
    }
  }
  trim_scratch(s);
  if (bs.kt.capacity() * sizeof(float) > (size_t{8} << 20)) std::vector<float>().swap(bs.kt);
  return seen;
}

#endif  // NATJAX_AVX2

}  // namespace natjax
