// CPU neighborhood-attention kernels: forward, dq (+ delta, d_rpb partials) and dk/dv.
//
// Work unit = (batch, kv head, tile). A unit packs the keys/values its tile's queries can see
// (the tile's "halo", a box per axis; dilation gaps and the heads interleave are removed and
// low-precision inputs widened once) into contiguous float32 (float64) rows that stay in L2,
// then serves every query head of the kv head's group from them (GQA reuses the packed keys).
//
// Per query the neighborhood is flattened into a list of packed-row indices (and bias indices),
// so borders, dilation groups, causal axes and whatever window rule the Python tables encode are
// all the same loop: logits by 8-key dot blocks, an online softmax over chunks of the list
// (FlashAttention-style running max and sum; the logits exist only as a chunk in L1, never as
// an array), and p.V accumulated in float32 registers.
//
// Backward (FlashAttention-2 from the saved lse; delta = sum(dO * O) - d_lse):
//   p = exp(s - lse), ds = p * (dO.v - delta);  dq = scale * sum ds k;
//   dk = scale * sum ds q,  dv = sum p dO  over the key's *inverse* neighborhood (no atomics:
//   every dk/dv row is owned by one unit, so results are deterministic);
//   d_rpb: each dq unit bins ds into its own partial buffer, reduced in a fixed order.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/dtypes.h"
#include "../common/geometry.h"
#include "simd.h"

namespace natjax {

constexpr int64_t kChunk = 256;  // online-softmax chunk (logits kept in L1)

template <typename T, typename A>
struct FwdArgs {
  const T *q, *k, *v;
  const A* rpb;  // [heads, rpb_volume] (ignored without a bias)
  T* out;
  A* lse;
};

template <typename T, typename A>
struct BwdArgs {
  const T *q, *k, *v;
  const A* rpb;
  const T *out, *d_out;
  const A *lse, *d_lse;
  T *dq, *dk, *dv;
  A* delta;         // [B, N, H] scratch written by the dq pass, read by the dk/dv pass
  A* drpb_partial;  // [B * G * dq_units_per_bg, group, rpb_volume]
  int64_t tiles_per_dq_unit;
};

template <typename A>
struct Scratch {
  std::vector<A> k, v, q, dout, dk, dv, rowq, rowdo, acc, logit, p, dp, sub, lse, delta;
  std::vector<int32_t> idx, bidx, bax[kAxes];
};

template <typename A>
Scratch<A>& thread_scratch() {
  thread_local Scratch<A> s;
  return s;
}

inline int64_t box_volume(const Range r[kAxes]) { return r[0].count * r[1].count * r[2].count; }

// Packs `src` rows ([B, N, nheads, dim] layout) of the positions in `box` into dst [vol, ld].
template <typename T, typename A>
void pack_rows(const Geometry& g, const T* src, int64_t b, int64_t head, int64_t nheads,
               int64_t dim, const Range box[kAxes], A scale, A* dst, int64_t ld) {
  int64_t row = 0;
  for (int64_t x0 = 0; x0 < box[0].count; ++x0) {
    const int64_t p0 = box[0].start + g.axis[0].dilation * x0;
    for (int64_t x1 = 0; x1 < box[1].count; ++x1) {
      const int64_t p1 = box[1].start + g.axis[1].dilation * x1;
      for (int64_t x2 = 0; x2 < box[2].count; ++x2, ++row) {
        const int64_t p2 = box[2].start + g.axis[2].dilation * x2;
        const T* s = src + ((b * g.tokens + g.flat(p0, p1, p2)) * nheads + head) * dim;
        A* d = dst + row * ld;
        for (int64_t c = 0; c < dim; ++c) d[c] = static_cast<A>(to_float(s[c])) * scale;
        for (int64_t c = dim; c < ld; ++c) d[c] = 0;
      }
    }
  }
}

// Packs one value per position ([B, N, H] layout) of `box` into dst.
template <typename A>
void pack_values(const Geometry& g, const A* src, int64_t b, int64_t h, const Range box[kAxes],
                 A* dst) {
  int64_t row = 0;
  for (int64_t x0 = 0; x0 < box[0].count; ++x0) {
    const int64_t p0 = box[0].start + g.axis[0].dilation * x0;
    for (int64_t x1 = 0; x1 < box[1].count; ++x1) {
      const int64_t p1 = box[1].start + g.axis[1].dilation * x1;
      for (int64_t x2 = 0; x2 < box[2].count; ++x2, ++row) {
        const int64_t p2 = box[2].start + g.axis[2].dilation * x2;
        dst[row] = src[(b * g.tokens + g.flat(p0, p1, p2)) * g.heads + h];
      }
    }
  }
}

// Flattens query position (i0, i1, i2)'s neighborhood into packed-row indices of the key halo
// `kh` (idx) and bias indices (bidx). Returns the neighborhood size.
inline int64_t window_lists(const Geometry& g, const int64_t i[kAxes], const Range kh[kAxes],
                            int32_t* idx, int32_t* bidx) {
  int64_t o[kAxes], c[kAxes], r[kAxes];
  for (int a = 0; a < kAxes; ++a) {
    const AxisTables& ax = g.axis[a];
    c[a] = ax.win_count[i[a]];
    o[a] = (ax.win_start[i[a]] - kh[a].start) / ax.dilation;
    r[a] = g.has_rpb ? ax.rpb_start[i[a]] : 0;
  }
  const int64_t hc1 = kh[1].count, hc2 = kh[2].count;
  const int64_t rd1 = g.axis[1].rpb_dim, rd2 = g.axis[2].rpb_dim;
  int64_t m = 0;
  for (int64_t x0 = 0; x0 < c[0]; ++x0)
    for (int64_t x1 = 0; x1 < c[1]; ++x1) {
      const int64_t base = ((o[0] + x0) * hc1 + (o[1] + x1)) * hc2 + o[2];
      const int64_t bbase = ((r[0] + x0) * rd1 + (r[1] + x1)) * rd2 + r[2];
      for (int64_t x2 = 0; x2 < c[2]; ++x2, ++m) {
        idx[m] = static_cast<int32_t>(base + x2);
        bidx[m] = static_cast<int32_t>(bbase + x2);
      }
    }
  return m;
}

template <typename A>
void add_bias(A* logit, const A* rpb_h, const int32_t* bidx, int64_t n) {
  for (int64_t j = 0; j < n; ++j) logit[j] += rpb_h[bidx[j]];
}

inline int64_t window_volume_max(const Geometry& g) {
  return g.axis[0].max_window * g.axis[1].max_window * g.axis[2].max_window;
}

// ---------------------------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------------------------

template <typename T, typename A>
void forward_unit(const Geometry& g, const FwdArgs<T, A>& args, int64_t unit) {
  Scratch<A>& s = thread_scratch<A>();
  const int64_t ntiles = g.num_tiles(), group = g.group_size();
  const int64_t tile = unit % ntiles, kvh = (unit / ntiles) % g.kv_heads;
  const int64_t b = unit / ntiles / g.kv_heads;
  const int64_t dp = pad_lanes(g.head_dim), dvp = pad_lanes(g.value_dim);
  Range qr[kAxes], kh[kAxes];
  g.tile_ranges(tile, qr);
  for (int a = 0; a < kAxes; ++a) kh[a] = g.key_halo(a, qr[a]);
  const int64_t hvol = box_volume(kh), wmax = window_volume_max(g);
  s.k.resize(hvol * dp);
  s.v.resize(hvol * dvp);
  pack_rows(g, args.k, b, kvh, g.kv_heads, g.head_dim, kh, A(1), s.k.data(), dp);
  pack_rows(g, args.v, b, kvh, g.kv_heads, g.value_dim, kh, A(1), s.v.data(), dvp);
  s.idx.resize(wmax);
  s.bidx.resize(wmax);
  s.logit.resize(kChunk);
  s.p.resize(kChunk);
  s.rowq.resize(dp);
  s.acc.resize(dvp);
  const A scale = static_cast<A>(g.scale);
  for (int64_t hh = 0; hh < group; ++hh) {
    const int64_t h = kvh * group + hh;
    const A* rpb_h = args.rpb + h * g.rpb_volume;
    int64_t i[kAxes];
    for (int64_t y0 = 0; y0 < qr[0].count; ++y0) {
      i[0] = qr[0].start + g.axis[0].dilation * y0;
      for (int64_t y1 = 0; y1 < qr[1].count; ++y1) {
        i[1] = qr[1].start + g.axis[1].dilation * y1;
        for (int64_t y2 = 0; y2 < qr[2].count; ++y2) {
          i[2] = qr[2].start + g.axis[2].dilation * y2;
          const int64_t row = (b * g.tokens + g.flat(i[0], i[1], i[2])) * g.heads + h;
          const T* qs = args.q + row * g.head_dim;
          for (int64_t c = 0; c < g.head_dim; ++c) s.rowq[c] = static_cast<A>(to_float(qs[c])) * scale;
          for (int64_t c = g.head_dim; c < dp; ++c) s.rowq[c] = 0;
          std::fill(s.acc.begin(), s.acc.end(), A(0));
          const int64_t vol = window_lists(g, i, kh, s.idx.data(), s.bidx.data());
          A m_run = -std::numeric_limits<A>::infinity(), l_run = 0;
          for (int64_t j0 = 0; j0 < vol; j0 += kChunk) {
            const int64_t n = std::min(kChunk, vol - j0);
            dot_rows(s.rowq.data(), s.k.data(), dp, s.idx.data() + j0, n, s.logit.data());
            if (g.has_rpb) add_bias(s.logit.data(), rpb_h, s.bidx.data() + j0, n);
            const A m_chunk = max_of(s.logit.data(), n);
            if (m_chunk > m_run) {  // rescale what was accumulated under the old maximum
              if (l_run > 0) {
                const A alpha = std::exp(m_run - m_chunk);
                l_run *= alpha;
                for (int64_t c = 0; c < dvp; ++c) s.acc[c] *= alpha;
              }
              m_run = m_chunk;
            }
            l_run += exp_sub(s.logit.data(), &m_run, 0, s.p.data(), n);
            axpy_rows(s.acc.data(), s.p.data(), s.v.data(), dvp, s.idx.data() + j0, n);
          }
          const A inv = A(1) / l_run;
          T* o = args.out + row * g.value_dim;
          for (int64_t c = 0; c < g.value_dim; ++c) o[c] = from_float<T>(s.acc[c] * inv);
          args.lse[row] = m_run + std::log(l_run);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, pass 1: delta, dq and per-unit d_rpb partials.
// ---------------------------------------------------------------------------------------------

template <typename T, typename A>
void dq_unit(const Geometry& g, const BwdArgs<T, A>& args, int64_t unit) {
  Scratch<A>& s = thread_scratch<A>();
  const int64_t ntiles = g.num_tiles(), group = g.group_size();
  const int64_t per_bg = (ntiles + args.tiles_per_dq_unit - 1) / args.tiles_per_dq_unit;
  const int64_t chunk = unit % per_bg, kvh = (unit / per_bg) % g.kv_heads;
  const int64_t b = unit / per_bg / g.kv_heads;
  const int64_t dp = pad_lanes(g.head_dim), dvp = pad_lanes(g.value_dim);
  const int64_t wmax = window_volume_max(g);
  const A scale = static_cast<A>(g.scale);
  A* partial = g.has_rpb ? args.drpb_partial + unit * group * g.rpb_volume : nullptr;
  if (partial) std::fill(partial, partial + group * g.rpb_volume, A(0));
  s.idx.resize(wmax);
  s.bidx.resize(wmax);
  s.logit.resize(kChunk);
  s.p.resize(kChunk);
  s.dp.resize(kChunk);
  s.rowq.resize(dp);
  s.rowdo.resize(dvp);
  s.acc.resize(dp);
  const int64_t t_end = std::min(ntiles, (chunk + 1) * args.tiles_per_dq_unit);
  for (int64_t tile = chunk * args.tiles_per_dq_unit; tile < t_end; ++tile) {
    Range qr[kAxes], kh[kAxes];
    g.tile_ranges(tile, qr);
    for (int a = 0; a < kAxes; ++a) kh[a] = g.key_halo(a, qr[a]);
    const int64_t hvol = box_volume(kh);
    s.k.resize(hvol * dp);
    s.v.resize(hvol * dvp);
    pack_rows(g, args.k, b, kvh, g.kv_heads, g.head_dim, kh, A(1), s.k.data(), dp);
    pack_rows(g, args.v, b, kvh, g.kv_heads, g.value_dim, kh, A(1), s.v.data(), dvp);
    for (int64_t hh = 0; hh < group; ++hh) {
      const int64_t h = kvh * group + hh;
      const A* rpb_h = args.rpb + h * g.rpb_volume;
      A* part_h = partial ? partial + hh * g.rpb_volume : nullptr;
      int64_t i[kAxes];
      for (int64_t y0 = 0; y0 < qr[0].count; ++y0) {
        i[0] = qr[0].start + g.axis[0].dilation * y0;
        for (int64_t y1 = 0; y1 < qr[1].count; ++y1) {
          i[1] = qr[1].start + g.axis[1].dilation * y1;
          for (int64_t y2 = 0; y2 < qr[2].count; ++y2) {
            i[2] = qr[2].start + g.axis[2].dilation * y2;
            const int64_t row = (b * g.tokens + g.flat(i[0], i[1], i[2])) * g.heads + h;
            const T* qs = args.q + row * g.head_dim;
            const T* dos = args.d_out + row * g.value_dim;
            const T* os = args.out + row * g.value_dim;
            A delta = 0;
            for (int64_t c = 0; c < g.head_dim; ++c) s.rowq[c] = static_cast<A>(to_float(qs[c])) * scale;
            for (int64_t c = g.head_dim; c < dp; ++c) s.rowq[c] = 0;
            for (int64_t c = 0; c < g.value_dim; ++c) {
              s.rowdo[c] = static_cast<A>(to_float(dos[c]));
              delta += s.rowdo[c] * static_cast<A>(to_float(os[c]));
            }
            for (int64_t c = g.value_dim; c < dvp; ++c) s.rowdo[c] = 0;
            delta -= args.d_lse[row];
            args.delta[row] = delta;
            const A lse = args.lse[row];
            std::fill(s.acc.begin(), s.acc.end(), A(0));
            const int64_t vol = window_lists(g, i, kh, s.idx.data(), s.bidx.data());
            for (int64_t j0 = 0; j0 < vol; j0 += kChunk) {
              const int64_t n = std::min(kChunk, vol - j0);
              const int32_t* idx = s.idx.data() + j0;
              dot_rows(s.rowq.data(), s.k.data(), dp, idx, n, s.logit.data());
              if (g.has_rpb) add_bias(s.logit.data(), rpb_h, s.bidx.data() + j0, n);
              exp_sub(s.logit.data(), &lse, 0, s.p.data(), n);
              dot_rows(s.rowdo.data(), s.v.data(), dvp, idx, n, s.dp.data());
              for (int64_t j = 0; j < n; ++j) s.dp[j] = s.p[j] * (s.dp[j] - delta);  // ds
              axpy_rows(s.acc.data(), s.dp.data(), s.k.data(), dp, idx, n);
              if (part_h) {
                const int32_t* bidx = s.bidx.data() + j0;
                for (int64_t j = 0; j < n; ++j) part_h[bidx[j]] += s.dp[j];
              }
            }
            T* dq = args.dq + row * g.head_dim;
            for (int64_t c = 0; c < g.head_dim; ++c) dq[c] = from_float<T>(s.acc[c] * scale);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, pass 2: dk and dv over each key's inverse neighborhood.
// ---------------------------------------------------------------------------------------------

// Flattens key position j's inverse neighborhood into packed-row indices of the query halo
// `qh` (idx) and the bias index of each (query, key) pair (bidx). Returns its size.
template <typename A>
int64_t inverse_lists(const Geometry& g, const int64_t j[kAxes], const Range qh[kAxes],
                      Scratch<A>& s) {
  int64_t o[kAxes], c[kAxes];
  for (int a = 0; a < kAxes; ++a) {
    const AxisTables& ax = g.axis[a];
    c[a] = ax.inv_count[j[a]];
    if (c[a] == 0) return 0;
    const int64_t first = ax.inv_start[j[a]];
    o[a] = (first - qh[a].start) / ax.dilation;
    int32_t* bax = s.bax[a].data();
    for (int64_t t = 0; t < c[a]; ++t) {
      const int64_t i = first + ax.dilation * t;
      // Offset of key j in query i's window, along this axis, as a bias index.
      bax[t] = g.has_rpb ? static_cast<int32_t>(ax.rpb_start[i] +
                                                 (j[a] - ax.win_start[i]) / ax.dilation)
                         : 0;
    }
  }
  const int64_t hc1 = qh[1].count, hc2 = qh[2].count;
  const int64_t rd1 = g.axis[1].rpb_dim, rd2 = g.axis[2].rpb_dim;
  int64_t m = 0;
  for (int64_t t0 = 0; t0 < c[0]; ++t0)
    for (int64_t t1 = 0; t1 < c[1]; ++t1) {
      const int64_t base = ((o[0] + t0) * hc1 + (o[1] + t1)) * hc2 + o[2];
      const int64_t bbase = (s.bax[0][t0] * rd1 + s.bax[1][t1]) * rd2;
      for (int64_t t2 = 0; t2 < c[2]; ++t2, ++m) {
        s.idx[m] = static_cast<int32_t>(base + t2);
        s.bidx[m] = static_cast<int32_t>(bbase + s.bax[2][t2]);
      }
    }
  return m;
}

template <typename T, typename A>
void dkv_unit(const Geometry& g, const BwdArgs<T, A>& args, int64_t unit) {
  Scratch<A>& s = thread_scratch<A>();
  const int64_t ntiles = g.num_tiles(), group = g.group_size();
  const int64_t tile = unit % ntiles, kvh = (unit / ntiles) % g.kv_heads;
  const int64_t b = unit / ntiles / g.kv_heads;
  const int64_t dp = pad_lanes(g.head_dim), dvp = pad_lanes(g.value_dim);
  Range kr[kAxes], qh[kAxes];
  g.tile_ranges(tile, kr);
  for (int a = 0; a < kAxes; ++a) qh[a] = g.query_halo(a, kr[a]);
  const int64_t tvol = box_volume(kr), qvol = box_volume(qh);
  const int64_t imax = g.axis[0].max_inverse * g.axis[1].max_inverse * g.axis[2].max_inverse;
  s.k.resize(tvol * dp);
  s.v.resize(tvol * dvp);
  s.dk.assign(tvol * dp, A(0));
  s.dv.assign(tvol * dvp, A(0));
  pack_rows(g, args.k, b, kvh, g.kv_heads, g.head_dim, kr, A(1), s.k.data(), dp);
  pack_rows(g, args.v, b, kvh, g.kv_heads, g.value_dim, kr, A(1), s.v.data(), dvp);
  s.idx.resize(std::max<int64_t>(imax, 1));
  s.bidx.resize(std::max<int64_t>(imax, 1));
  for (int a = 0; a < kAxes; ++a) s.bax[a].resize(std::max<int64_t>(g.axis[a].max_inverse, 1));
  s.logit.resize(kChunk);
  s.p.resize(kChunk);
  s.dp.resize(kChunk);
  s.sub.resize(kChunk);
  const A scale = static_cast<A>(g.scale);
  for (int64_t hh = 0; hh < group && qvol > 0; ++hh) {
    const int64_t h = kvh * group + hh;
    const A* rpb_h = args.rpb + h * g.rpb_volume;
    s.q.resize(qvol * dp);
    s.dout.resize(qvol * dvp);
    s.lse.resize(qvol);
    s.delta.resize(qvol);
    pack_rows(g, args.q, b, h, g.heads, g.head_dim, qh, scale, s.q.data(), dp);
    pack_rows(g, args.d_out, b, h, g.heads, g.value_dim, qh, A(1), s.dout.data(), dvp);
    pack_values(g, args.lse, b, h, qh, s.lse.data());
    pack_values(g, static_cast<const A*>(args.delta), b, h, qh, s.delta.data());
    int64_t j[kAxes], key = 0;
    for (int64_t y0 = 0; y0 < kr[0].count; ++y0) {
      j[0] = kr[0].start + g.axis[0].dilation * y0;
      for (int64_t y1 = 0; y1 < kr[1].count; ++y1) {
        j[1] = kr[1].start + g.axis[1].dilation * y1;
        for (int64_t y2 = 0; y2 < kr[2].count; ++y2, ++key) {
          j[2] = kr[2].start + g.axis[2].dilation * y2;
          const int64_t vol = inverse_lists(g, j, qh, s);
          const A* krow = s.k.data() + key * dp;
          const A* vrow = s.v.data() + key * dvp;
          A* dkrow = s.dk.data() + key * dp;
          A* dvrow = s.dv.data() + key * dvp;
          for (int64_t i0 = 0; i0 < vol; i0 += kChunk) {
            const int64_t n = std::min(kChunk, vol - i0);
            const int32_t* idx = s.idx.data() + i0;
            dot_rows(krow, s.q.data(), dp, idx, n, s.logit.data());
            if (g.has_rpb) add_bias(s.logit.data(), rpb_h, s.bidx.data() + i0, n);
            for (int64_t t = 0; t < n; ++t) s.sub[t] = s.lse[idx[t]];
            exp_sub(s.logit.data(), s.sub.data(), 1, s.p.data(), n);
            dot_rows(vrow, s.dout.data(), dvp, idx, n, s.dp.data());
            for (int64_t t = 0; t < n; ++t) s.dp[t] = s.p[t] * (s.dp[t] - s.delta[idx[t]]);
            axpy_rows(dkrow, s.dp.data(), s.q.data(), dp, idx, n);   // q packed pre-scaled
            axpy_rows(dvrow, s.p.data(), s.dout.data(), dvp, idx, n);
          }
        }
      }
    }
  }
  // Store the tile's rows.
  int64_t key = 0;
  for (int64_t y0 = 0; y0 < kr[0].count; ++y0) {
    const int64_t p0 = kr[0].start + g.axis[0].dilation * y0;
    for (int64_t y1 = 0; y1 < kr[1].count; ++y1) {
      const int64_t p1 = kr[1].start + g.axis[1].dilation * y1;
      for (int64_t y2 = 0; y2 < kr[2].count; ++y2, ++key) {
        const int64_t p2 = kr[2].start + g.axis[2].dilation * y2;
        const int64_t row = (b * g.tokens + g.flat(p0, p1, p2)) * g.kv_heads + kvh;
        T* dk = args.dk + row * g.head_dim;
        T* dv = args.dv + row * g.value_dim;
        for (int64_t c = 0; c < g.head_dim; ++c) dk[c] = from_float<T>(s.dk[key * dp + c]);
        for (int64_t c = 0; c < g.value_dim; ++c) dv[c] = from_float<T>(s.dv[key * dvp + c]);
      }
    }
  }
}

}  // namespace natjax
