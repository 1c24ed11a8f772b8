// Register-blocked forward for float32 accumulation on AVX2+FMA: blocks of up to 4 queries.
//
// The per-query kernels (na_kernels.h) compute each logit as a dot product with a horizontal
// sum, and each key row is loaded for at most two queries: 10-25% of the FMA peak. Here a block
// of up to 4 neighbouring queries (2x2 along the two innermost axes, 1x4 for 1-D maps) is served
// at once from the *union* of their windows, a box of keys, GEMM-style:
//
//   logits  S[4][slots] = Q[4][D] . Kt[D][slots]: keys transposed once per unit (Kt, one row
//           per feature), so 8 keys are one vector and no horizontal sums are needed; the
//           micro-kernel keeps 4 queries x 16 keys in 8 accumulators (2 loads + 4 broadcasts
//           per 8 FMAs);
//   softmax per query over its slots (exact, the block's logits fit in L1), keys outside the
//           query's own window masked to -inf (exp gives 0), bias added by masked loads;
//   output  O[4][Dv] = P[4][slots] . V[slots][Dv], 4 queries x 16 features per pass.
//
// For NAT's 7x7 windows a 2x2 block's union is 8x8 keys (77% of the slots useful); where every
// window covers the whole map (NAT's last stage, or dilation groups as small as the kernel) all
// blocks share one window and only lane padding is wasted. Blocks whose union exceeds
// `kBlockSlots` are served one query at a time (the per-query path when even one is too big).
// Results are computed in a fixed order per query: independent of threads and tiling.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "na_kernels.h"

namespace natjax {

#if NATJAX_AVX2

constexpr int64_t kBlockQ = 4;        // queries per block
constexpr int64_t kBlockSlots = 1024;  // logit slots per query (4 KiB; 16 KiB per block)
// Blocks are used for tiles whose transposed keys take at most this much (L1 is 32-48 KiB).
// Measured (single-thread CPU time, old and new kernel in one process, 2-core VM at load
// 10-14, batch 8, float32, head_dim 32, kernel 7; transposed halo sizes in brackets): blocks
// 1.02-1.29x faster than the per-query kernel on 7x7 [6 KiB], 8x8 [8], 14x14 [24], 16x16 [32]
// maps and DiNAT's 7x7 dilation groups at 56x56 [6]; 1.04-1.13x on 28x28 [70] and 1.02-1.05x
// on 12^3 (kernel 5) [90], but 0.80-0.97x on 56x56 [91] and 0.69-0.97x on 1-D 2048 [65].
constexpr int64_t kBlockHaloBytes = 32 * 1024;

// The keys of `box` (non-finite elements read as 0, `Read::kInput`), transposed: feature c of
// halo position p at kt[c * ld + p]. `ld` leaves 16 readable floats past the last position (the
// micro-kernel's vectors may cross the end of a row: those lanes are masked) and is kept off
// multiples of 1 KiB (L1 set aliasing between the feature rows). `*seen` (when given) is set
// if an element read is NaN or +-inf.
template <typename T>
const float* box_transposed(const Geometry& g, const T* src, int64_t b, int64_t head,
                            int64_t nheads, int64_t dim, const Range box[kAxes], int64_t* ld,
                            std::vector<float>& pack, bool* seen = nullptr) {
  uint32_t bad = 0;  // nonfinite_bits of what was read
  const int64_t vol = box_volume(box);
  int64_t l = pad_lanes(vol) + 16;
  if (l % 256 == 0) l += 8;
  *ld = l;
  pack.assign(dim * l, 0.f);
  // 16 positions at a time: each feature row then gets one whole 64-byte line per chunk
  // (position by position, every write would touch a different line of a buffer beyond L1).
  constexpr int64_t kChunkPos = 16;
  const T* rows[kChunkPos];
  int64_t p = 0, n = 0;
  auto flush = [&] {
    for (int64_t c = 0; c < dim; ++c) {
      float* d = pack.data() + c * l + p;
      for (int64_t t = 0; t < n; ++t) {
        const float y = to_float(rows[t][c]);
        bad |= nonfinite_bits(y);
        d[t] = finite_or_zero(y);
      }
    }
    p += n;
    n = 0;
  };
  for (int64_t x0 = 0; x0 < box[0].count; ++x0) {
    const int64_t p0 = box[0].start + g.axis[0].dilation * x0;
    for (int64_t x1 = 0; x1 < box[1].count; ++x1) {
      const int64_t p1 = box[1].start + g.axis[1].dilation * x1;
      for (int64_t x2 = 0; x2 < box[2].count; ++x2) {
        const int64_t p2 = box[2].start + g.axis[2].dilation * x2;
        rows[n++] = src + ((b * g.tokens + g.flat(p0, p1, p2)) * nheads + head) * dim;
        if (n == kChunkPos) flush();
      }
    }
  }
  flush();
  if (seen) *seen |= top_bit(bad);
  return pack.data();
}

// S[i * lds + 8v : +8] = sum_c q[i * ldq + c] * kt[c * ldt + off[v] : +8], i < 4, v < nv.
inline void qk_block(const float* q, int64_t ldq, int64_t dim, const float* kt, int64_t ldt,
                     const int64_t* off, int64_t nv, float* s, int64_t lds) {
  int64_t v = 0;
  for (; v + 2 <= nv; v += 2) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0,
           d1 = a0;
    const float* k0 = kt + off[v];
    const float* k1 = kt + off[v + 1];
    for (int64_t c = 0; c < dim; ++c, k0 += ldt, k1 += ldt) {
      const __m256 x = _mm256_loadu_ps(k0), y = _mm256_loadu_ps(k1);
      __m256 w = _mm256_broadcast_ss(q + c);
      a0 = _mm256_fmadd_ps(w, x, a0);
      a1 = _mm256_fmadd_ps(w, y, a1);
      w = _mm256_broadcast_ss(q + ldq + c);
      b0 = _mm256_fmadd_ps(w, x, b0);
      b1 = _mm256_fmadd_ps(w, y, b1);
      w = _mm256_broadcast_ss(q + 2 * ldq + c);
      c0 = _mm256_fmadd_ps(w, x, c0);
      c1 = _mm256_fmadd_ps(w, y, c1);
      w = _mm256_broadcast_ss(q + 3 * ldq + c);
      d0 = _mm256_fmadd_ps(w, x, d0);
      d1 = _mm256_fmadd_ps(w, y, d1);
    }
    float* o = s + 8 * v;
    _mm256_storeu_ps(o, a0);
    _mm256_storeu_ps(o + 8, a1);
    _mm256_storeu_ps(o + lds, b0);
    _mm256_storeu_ps(o + lds + 8, b1);
    _mm256_storeu_ps(o + 2 * lds, c0);
    _mm256_storeu_ps(o + 2 * lds + 8, c1);
    _mm256_storeu_ps(o + 3 * lds, d0);
    _mm256_storeu_ps(o + 3 * lds + 8, d1);
  }
  if (v < nv) {
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    const float* k0 = kt + off[v];
    for (int64_t f = 0; f < dim; ++f, k0 += ldt) {
      const __m256 x = _mm256_loadu_ps(k0);
      a = _mm256_fmadd_ps(_mm256_broadcast_ss(q + f), x, a);
      b = _mm256_fmadd_ps(_mm256_broadcast_ss(q + ldq + f), x, b);
      c = _mm256_fmadd_ps(_mm256_broadcast_ss(q + 2 * ldq + f), x, c);
      d = _mm256_fmadd_ps(_mm256_broadcast_ss(q + 3 * ldq + f), x, d);
    }
    float* o = s + 8 * v;
    _mm256_storeu_ps(o, a);
    _mm256_storeu_ps(o + lds, b);
    _mm256_storeu_ps(o + 2 * lds, c);
    _mm256_storeu_ps(o + 3 * lds, d);
  }
}

// acc[i * lda + c] = sum_r sum_{j < n[r]} p[i * lds + slot[r] + j] * vrow(r, j)[c], i < 4,
// c < len (a multiple of 8); row r's keys start at vp[r], `stride` apart.
inline void pv_block(const float* p, int64_t lds, const float* const* vp, const int64_t* slot,
                     const int64_t* n, int64_t rows, int64_t stride, int64_t len, float* acc,
                     int64_t lda) {
  int64_t c0 = 0;
  for (; c0 + 16 <= len; c0 += 16) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0v = a0, c1 = a0, d0 = a0,
           d1 = a0;
    for (int64_t r = 0; r < rows; ++r) {
      const float* v = vp[r] + c0;
      const float* w = p + slot[r];
      for (int64_t j = 0; j < n[r]; ++j, v += stride, ++w) {
        const __m256 x = _mm256_loadu_ps(v), y = _mm256_loadu_ps(v + 8);
        __m256 t = _mm256_broadcast_ss(w);
        a0 = _mm256_fmadd_ps(t, x, a0);
        a1 = _mm256_fmadd_ps(t, y, a1);
        t = _mm256_broadcast_ss(w + lds);
        b0 = _mm256_fmadd_ps(t, x, b0);
        b1 = _mm256_fmadd_ps(t, y, b1);
        t = _mm256_broadcast_ss(w + 2 * lds);
        c0v = _mm256_fmadd_ps(t, x, c0v);
        c1 = _mm256_fmadd_ps(t, y, c1);
        t = _mm256_broadcast_ss(w + 3 * lds);
        d0 = _mm256_fmadd_ps(t, x, d0);
        d1 = _mm256_fmadd_ps(t, y, d1);
      }
    }
    float* o = acc + c0;
    _mm256_storeu_ps(o, a0);
    _mm256_storeu_ps(o + 8, a1);
    _mm256_storeu_ps(o + lda, b0);
    _mm256_storeu_ps(o + lda + 8, b1);
    _mm256_storeu_ps(o + 2 * lda, c0v);
    _mm256_storeu_ps(o + 2 * lda + 8, c1);
    _mm256_storeu_ps(o + 3 * lda, d0);
    _mm256_storeu_ps(o + 3 * lda + 8, d1);
  }
  if (c0 < len) {  // 8 features left
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    for (int64_t r = 0; r < rows; ++r) {
      const float* v = vp[r] + c0;
      const float* w = p + slot[r];
      for (int64_t j = 0; j < n[r]; ++j, v += stride, ++w) {
        const __m256 x = _mm256_loadu_ps(v);
        a = _mm256_fmadd_ps(_mm256_broadcast_ss(w), x, a);
        b = _mm256_fmadd_ps(_mm256_broadcast_ss(w + lds), x, b);
        c = _mm256_fmadd_ps(_mm256_broadcast_ss(w + 2 * lds), x, c);
        d = _mm256_fmadd_ps(_mm256_broadcast_ss(w + 3 * lds), x, d);
      }
    }
    float* o = acc + c0;
    _mm256_storeu_ps(o, a);
    _mm256_storeu_ps(o + lda, b);
    _mm256_storeu_ps(o + 2 * lda, c);
    _mm256_storeu_ps(o + 3 * lda, d);
  }
}

// A block of queries: their windows and flat [B, N, H] rows.
struct Block {
  Window w[kBlockQ];
  int64_t rows[kBlockQ];
  int64_t nq = 0;
};

// Scratch of the blocked forward (per thread, reused across calls).
struct BlockScratch {
  std::vector<Block> blocks;
  std::vector<float> kt, q, s, acc;
  std::vector<int64_t> off, slot, n;
  std::vector<const float*> vp;
};

inline BlockScratch& block_scratch() {
  thread_local BlockScratch s;
  return s;
}

// The union of the windows of `nq` queries (halo coordinates): per axis [lo, hi).
struct Union {
  int64_t lo[kAxes], hi[kAxes];
  int64_t rows() const { return (hi[0] - lo[0]) * (hi[1] - lo[1]); }
  int64_t width() const { return pad_lanes(hi[2] - lo[2]); }
  int64_t slots() const { return rows() * width(); }
};

inline Union window_union(const Window* w, int64_t nq) {
  Union u;
  for (int a = 0; a < kAxes; ++a) {
    u.lo[a] = w[0].o[a];
    u.hi[a] = w[0].o[a] + w[0].c[a];
    for (int64_t i = 1; i < nq; ++i) {
      u.lo[a] = std::min(u.lo[a], w[i].o[a]);
      u.hi[a] = std::max(u.hi[a], w[i].o[a] + w[i].c[a]);
    }
  }
  return u;
}

// One block: queries `rows[i]` (flat [B, N, H] row indices, nq <= 4) with windows `w[i]` inside
// the key halo (`K` row-major for the layout, `kt`/`ldt` transposed, `V` row-major).
template <typename T>
void forward_block(const Geometry& g, const FwdArgs<T, float>& args, const View<float>& V,
                   const float* kt, int64_t ldt, const int64_t halo_s1, const int64_t halo_s0,
                   const float* bias, const Window* w, const int64_t* rows, int64_t nq,
                   const Union& u, BlockScratch& s, bool* seen) {
  const int64_t dl = pad_lanes(g.head_dim), dvl = pad_lanes(g.value_dim);
  const int64_t W = u.width(), nrows = u.rows(), lds = u.slots();
  const int64_t n1 = u.hi[1] - u.lo[1], n2 = u.hi[2] - u.lo[2];
  const float scale = static_cast<float>(g.scale);
  s.q.assign(kBlockQ * dl, 0.f);
  for (int64_t i = 0; i < nq; ++i)
    load_row(args.q + rows[i] * g.head_dim, g.head_dim, scale, s.q.data() + i * dl, dl,
             Read::kInput, seen);
  // Vector offsets into kt (halo positions) of each union row's 8-key groups.
  const int64_t nv = W / 8;
  s.off.resize(nrows * nv);
  s.slot.resize(nrows);
  s.n.resize(nrows);
  s.vp.resize(nrows);
  for (int64_t r = 0; r < nrows; ++r) {
    const int64_t x0 = u.lo[0] + r / n1, x1 = u.lo[1] + r % n1;
    const int64_t base = x0 * halo_s0 + x1 * halo_s1 + u.lo[2];
    for (int64_t v = 0; v < nv; ++v) s.off[r * nv + v] = base + 8 * v;
    s.slot[r] = r * W;
    s.n[r] = n2;
    s.vp[r] = V.at(x0, x1, u.lo[2]);
  }
  s.s.resize(kBlockQ * lds);
  qk_block(s.q.data(), dl, g.head_dim, kt, ldt, s.off.data(), nrows * nv, s.s.data(), lds);
  // Mask, bias, softmax per query (exact: the whole block fits).
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  float l_sum[kBlockQ] = {}, m_max[kBlockQ] = {};  // set for the nq queries used
  for (int64_t i = 0; i < kBlockQ; ++i) {
    float* si = s.s.data() + i * lds;
    if (i >= nq) {
      std::fill(si, si + lds, 0.f);
      continue;
    }
    const Window& wi = w[i];
    const int64_t off2 = wi.o[2] - u.lo[2];
    __m256 m = neg_inf;
    for (int64_t r = 0; r < nrows; ++r) {
      const int64_t y0 = u.lo[0] + r / n1 - wi.o[0], y1 = u.lo[1] + r % n1 - wi.o[1];
      float* sr = si + r * W;
      if (y0 < 0 || y0 >= wi.c[0] || y1 < 0 || y1 >= wi.c[1]) {
        for (int64_t j = 0; j < W; j += 8) _mm256_storeu_ps(sr + j, neg_inf);
        continue;
      }
      const float* br = g.has_rpb ? bias + wi.bias_row(y0, y1) - off2 : nullptr;
      for (int64_t j = 0; j < W; j += 8) {
        const __m256 mask = window_mask(j, off2, wi.c[2]);
        __m256 x = _mm256_loadu_ps(sr + j);
        if (br) x = _mm256_add_ps(x, _mm256_maskload_ps(br + j, _mm256_castps_si256(mask)));
        x = _mm256_blendv_ps(neg_inf, x, mask);
        m = _mm256_max_ps(m, x);
        _mm256_storeu_ps(sr + j, x);
      }
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m);
    float mx = lanes[0];
    for (int k = 1; k < 8; ++k) mx = std::max(mx, lanes[k]);
    m_max[i] = mx;
    l_sum[i] = exp_sub(si, &mx, 0, si, lds);
  }
  s.acc.resize(kBlockQ * dvl);
  pv_block(s.s.data(), lds, s.vp.data(), s.slot.data(), s.n.data(), nrows, V.s2, dvl,
           s.acc.data(), dvl);
  for (int64_t i = 0; i < nq; ++i) {
    Softmax<float> sm;
    sm.m = m_max[i];
    sm.l = l_sum[i];
    finish_query(g, sm, s.acc.data() + i * dvl, args.out + rows[i] * g.value_dim,
                 args.lse + rows[i]);
  }
}


// The forward of one work unit (batch, kv head, tile) by blocks; see the top of this file.
// Returns whether it read a NaN/inf q, k or v element.
template <typename T>
bool forward_unit_blocked(const Geometry& g, const FwdArgs<T, float>& args, const Unit& un) {
  Scratch<float>& s = thread_scratch<float>();
  BlockScratch& bs = block_scratch();
  const int64_t group = g.group_size(), b = un.b, kvh = un.kvh;
  const int64_t dl = pad_lanes(g.head_dim), dvl = pad_lanes(g.value_dim);
  const Range* qr = un.qr;
  const Range* kh = un.kh;
  // Where the blocks pay (kBlockHaloBytes): tiles of several rows whose transposed keys stay
  // in L1; elsewhere the per-query kernel.
  if (qr[1].count < 2 || box_volume(kh) * g.head_dim * int64_t{sizeof(float)} > kBlockHaloBytes)
    return forward_unit<T, float>(g, args, un);
  bool seen = false;
  const View<float> V = box_view(g, args.v, b, kvh, g.kv_heads, g.value_dim, kh, dvl, s.v,
                                 Read::kInput, &seen);
  int64_t ldt = 0;
  const float* kt =
      box_transposed(g, args.k, b, kvh, g.kv_heads, g.head_dim, kh, &ldt, bs.kt, &seen);
  const int64_t halo_s1 = kh[2].count, halo_s0 = kh[1].count * kh[2].count;
  // Row-major keys only for queries whose window alone exceeds kBlockSlots (packed on demand).
  View<float> K;
  bool have_k = false;
  const int64_t cap = chunk_capacity(g);
  s.logit.resize(cap);
  s.p.resize(cap);
  s.rowq.resize(dl);
  s.acc.resize(dvl);
  // 2x2 blocks along the two innermost axes; 1x4 when the tile has one row.
  const int64_t b1 = qr[1].count >= 2 ? 2 : 1, b2 = kBlockQ / b1;
  const float scale = static_cast<float>(g.scale);
  for (int64_t hh = 0; hh < group; ++hh) {
    const int64_t h = kvh * group + hh;
    const float* bias = padded_bias(g, args.rpb, h, s.bias);
    // The tile's blocks first, so that each block can prefetch the next one's q and out rows
    // (rows of one head are heads x head_dim apart: the hardware prefetchers miss them).
    bs.blocks.clear();
    for (int64_t x0 = 0; x0 < qr[0].count; ++x0)
      for (int64_t x1 = 0; x1 < qr[1].count; x1 += b1)
        for (int64_t x2 = 0; x2 < qr[2].count; x2 += b2) {
          Block blk;
          for (int64_t y1 = x1; y1 < std::min(x1 + b1, qr[1].count); ++y1)
            for (int64_t y2 = x2; y2 < std::min(x2 + b2, qr[2].count); ++y2) {
              const int64_t p[kAxes] = {qr[0].start + g.axis[0].dilation * x0,
                                        qr[1].start + g.axis[1].dilation * y1,
                                        qr[2].start + g.axis[2].dilation * y2};
              blk.w[blk.nq] = Window(g, p, kh);
              blk.rows[blk.nq++] = (b * g.tokens + g.flat(p[0], p[1], p[2])) * g.heads + h;
            }
          bs.blocks.push_back(blk);
        }
    for (size_t bi = 0; bi < bs.blocks.size(); ++bi) {
      if (bi + 1 < bs.blocks.size()) {
        const Block& next = bs.blocks[bi + 1];
        for (int64_t i = 0; i < next.nq; ++i) {
          prefetch_row(args.q + next.rows[i] * g.head_dim, g.head_dim);
          prefetch_row(args.out + next.rows[i] * g.value_dim, g.value_dim);
        }
      }
      const Block& blk = bs.blocks[bi];
      const Window* w = blk.w;
      const int64_t* rows = blk.rows;
      const int64_t nq = blk.nq;
      const Union u = window_union(w, nq);
      if (u.slots() <= kBlockSlots) {
        forward_block(g, args, V, kt, ldt, halo_s1, halo_s0, bias, w, rows, nq, u, bs, &seen);
        continue;
      }
      for (int64_t i = 0; i < nq; ++i) {
        const Union ui = window_union(&w[i], 1);
        if (ui.slots() <= kBlockSlots) {
          forward_block(g, args, V, kt, ldt, halo_s1, halo_s0, bias, &w[i], &rows[i], 1, ui,
                        bs, &seen);
          continue;
        }
        if (!have_k) {
          K = box_view(g, args.k, b, kvh, g.kv_heads, g.head_dim, kh, dl, s.k, Read::kInput,
                       &seen);
          have_k = true;
        }
        load_row(args.q + rows[i] * g.head_dim, g.head_dim, scale, s.rowq.data(), dl, Read::kInput,
                 &seen);
        forward_query(g, args, K, V, bias, w[i], rows[i], cap, s.rowq.data(), s.acc.data(),
                      s.logit.data(), s.p.data());
      }
    }
  }
  trim_scratch(s);
  if (bs.kt.capacity() * sizeof(float) > (size_t{8} << 20)) std::vector<float>().swap(bs.kt);
  return seen;
}

#endif  // NATJAX_AVX2

}  // namespace natjax
