// Backward of tiles whose queries all see one window (float32 accumulation, AVX2+FMA or
// AVX-512): the case of shared_fwd.h (NAT's 7x7 last stage, DiNAT's dilated layers on maps of
// 7 x dilation). Per head the tile is a small dense attention, and its gradients are five small
// GEMMs through shared_fwd.h's micro-kernels (FlashAttention-2's backward from the saved lse):
//
//   P  = exp(B + Q K^T - lse)            shared_qk over the transposed keys, then exp
//   dS = P * (dO V^T - delta)            shared_qk over the transposed values
//   dQ = scale * dS K                    shared_pv over the key rows
//   dV += P^T dO,  dK += dS^T (scale Q)  shared_pv over P and dS transposed (keys x queries)
//
// with delta = rowsum(dO * O) - d_lse, the bias gradient binned from dS, and dK/dV summed over
// the kv head's query heads before they are added to the unit's accumulators. The per-query
// kernel of the fused backward (na_kernels.h) spends a horizontal sum per logit and per dO.v;
// here every product is a broadcast FMA. Results are computed in a fixed order: independent of
// threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "shared_fwd.h"
#include "strip_fwd.h"

namespace natjax {

#if NATJAX_AVX2

// Scratch of the shared-window backward (per thread, reused across calls).
struct SharedBwdScratch {
  std::vector<float> k, kt, vt;  // key rows, keys and values transposed (halo order)
  std::vector<float> q, d;          // the head's scaled q rows and dO rows (tile order)
  std::vector<float> delta, lse;    // per query
  std::vector<float> p, ds;         // [queries][slots]
  std::vector<float> pt, dst;       // [keys][queries]
  std::vector<float> tmp, dk, dv;   // one block's rows; dk/dv over the kv head's query heads
  std::vector<int64_t> rows;
  std::vector<Window> windows;
};

inline SharedBwdScratch& shared_bwd_scratch() {
  thread_local SharedBwdScratch s;
  return s;
}

// Queries [t, t + NQ) of the head: their P and dS rows (`lds` slots, zero past the window) and
// their dq rows.
template <typename T, int NQ>
void shared_bwd_block(const Geometry& g, const BwdArgs<T, float>& args, int64_t t, int64_t nk,
                      int64_t lds, const float* bias, const float* kt, int64_t ldk,
                      const float* vt, int64_t ldv, SharedBwdScratch& s) {
  const int64_t dl = pad_lanes(g.head_dim), dvl = pad_lanes(g.value_dim);
  float* P = s.p.data() + t * lds;
  float* DS = s.ds.data() + t * lds;
  for (int i = 0; i < NQ; ++i)
    start_shared_logits(g, bias, s.windows[t + i], nk, lds, P + i * lds);
  std::fill(DS, DS + NQ * lds, 0.f);
  shared_qk<NQ>(s.q.data() + t * dl, dl, g.head_dim, kt, ldk, lds / kSharedLanes, P, lds);
  shared_qk<NQ>(s.d.data() + t * dvl, dvl, g.value_dim, vt, ldv, lds / kSharedLanes, DS, lds);
  for (int i = 0; i < NQ; ++i) {
    float* pi = P + i * lds;
    float* di = DS + i * lds;
    exp_sub(pi, &s.lse[t + i], 0, pi, lds);  // slots past the window: exp(-inf) = 0
    const float delta = s.delta[t + i];
    for (int64_t j = 0; j < lds; ++j) di[j] = pi[j] * (di[j] - delta);
  }
  shared_pv<NQ>(DS, lds, s.k.data(), dl, nk, dl, s.tmp.data(), dl);
  const float scale = static_cast<float>(g.scale);
  for (int i = 0; i < NQ; ++i) {
    T* dq = args.dq + s.rows[t + i] * g.head_dim;
    for (int64_t c = 0; c < g.head_dim; ++c) dq[c] = from_float<T>(s.tmp[i * dl + c] * scale);
  }
}

// The fused backward's work on one tile (na_kernels.h, bwd_fused_unit) when every query of the
// tile sees the tile's key halo: dq rows written, dK/dV added to the unit's accumulators DK/DV
// (halo coordinates), the bias gradient to `partial` (rpb_volume values per query head of the
// kv head). Returns false, doing nothing, for any other tile.
template <typename T>
bool bwd_shared_tile(const Geometry& g, const BwdArgs<T, float>& args, int64_t b, int64_t kvh,
                     const Range qr[kAxes], const Range kh[kAxes], const View<float>& DK,
                     const View<float>& DV, float* partial) {
  Unit un;
  un.b = b, un.kvh = kvh;
  for (int a = 0; a < kAxes; ++a) un.qr[a] = qr[a], un.kh[a] = kh[a];
  const int64_t nk = box_volume(kh);
  const int64_t widest = std::max(g.head_dim, g.value_dim);
  if (nk > kSharedMaxKeys || nk * widest * int64_t{sizeof(float)} > kBlockHaloBytes ||
      !tile_shares_window(g, un))
    return false;
  SharedBwdScratch& s = shared_bwd_scratch();
  Scratch<float>& sc = thread_scratch<float>();
  const int64_t dl = pad_lanes(g.head_dim), dvl = pad_lanes(g.value_dim);
  const int64_t group = g.group_size(), lds = shared_slots(nk);
  box_view(g, args.k, b, kvh, g.kv_heads, g.head_dim, kh, dl, s.k, Read::kInput);
  bool seen = false;  // (the forward reported non-finite reads already)
  int64_t ldk = 0, ldv = 0;
  const float* kt =
      strip_pack<StripLanes, T>(g, args.k, b, kvh, g.kv_heads, g.head_dim, kh, &ldk, s.kt, seen);
  const float* vt =
      strip_pack<StripLanes, T>(g, args.v, b, kvh, g.kv_heads, g.value_dim, kh, &ldv, s.vt, seen);
  box_positions(g, qr, sc.order);
  const int64_t nq = static_cast<int64_t>(sc.order.size());
  s.windows.resize(nq);
  for (int64_t t = 0; t < nq; ++t) s.windows[t] = Window(g, sc.order[t].p, kh);
  s.rows.resize(nq);
  s.q.resize(nq * dl);
  s.d.resize(nq * dvl);
  s.delta.resize(nq);
  s.lse.resize(nq);
  s.p.resize(nq * lds);
  s.ds.resize(nq * lds);
  s.pt.resize(nk * nq);
  s.dst.resize(nk * nq);
  s.tmp.resize(kSharedQ * std::max(dl, dvl));
  s.dk.assign(nk * dl, 0.f);
  s.dv.assign(nk * dvl, 0.f);
  const float scale = static_cast<float>(g.scale);
  const Window& w0 = s.windows[0];
  for (int64_t hh = 0; hh < group; ++hh) {
    const int64_t h = kvh * group + hh;
    const float* bias = padded_bias(g, args.rpb, h, sc.bias);
    for (int64_t t = 0; t < nq; ++t) {
      const int64_t* i = sc.order[t].p;
      const int64_t row = (b * g.tokens + g.flat(i[0], i[1], i[2])) * g.heads + h;
      s.rows[t] = row;
      float* q = s.q.data() + t * dl;
      float* d = s.d.data() + t * dvl;
      load_row(args.q + row * g.head_dim, g.head_dim, scale, q, dl, Read::kInput);
      load_row(args.d_out + row * g.value_dim, g.value_dim, 1.f, d, dvl, Read::kExact);
      const T* o = args.out + row * g.value_dim;
      float delta = 0;
      for (int64_t c = 0; c < g.value_dim; ++c) delta += d[c] * to_float(o[c]);
      s.delta[t] = delta - args.d_lse[row];
      s.lse[t] = args.lse[row];
    }
    for (int64_t t = 0; t < nq; t += kSharedQ)
      with_block_height(std::min<int64_t>(kSharedQ, nq - t), [&](auto nq_block) {
        shared_bwd_block<T, decltype(nq_block)::value>(g, args, t, nk, lds, bias, kt, ldk, vt,
                                                       ldv, s);
      });
    if (partial) {  // d_rpb: dS binned by bias index, queries in tile order
      float* part_h = partial + hh * g.rpb_volume;
      const int64_t n1 = w0.c[1], n2 = w0.c[2];
      for (int64_t t = 0; t < nq; ++t) {
        const Window& w = s.windows[t];
        const float* ds = s.ds.data() + t * lds;
        for (int64_t x0 = 0; x0 < w.c[0]; ++x0)
          for (int64_t x1 = 0; x1 < n1; ++x1, ds += n2) {
            float* dst = part_h + w.bias_row(x0, x1);
            for (int64_t x2 = 0; x2 < n2; ++x2) dst[x2] += ds[x2];
          }
      }
    }
    for (int64_t t = 0; t < nq; ++t)
      for (int64_t j = 0; j < nk; ++j) {
        s.pt[j * nq + t] = s.p[t * lds + j];
        s.dst[j * nq + t] = s.ds[t * lds + j];
      }
    for (int64_t j0 = 0; j0 < nk; j0 += kSharedQ) {
      const int64_t nj = std::min<int64_t>(kSharedQ, nk - j0);
      with_block_height(nj, [&](auto nj_block) {
        constexpr int NJ = decltype(nj_block)::value;
        shared_pv<NJ>(s.pt.data() + j0 * nq, nq, s.d.data(), dvl, nq, dvl, s.tmp.data(), dvl);
        for (int64_t x = 0; x < NJ * dvl; ++x) s.dv[j0 * dvl + x] += s.tmp[x];
        shared_pv<NJ>(s.dst.data() + j0 * nq, nq, s.q.data(), dl, nq, dl, s.tmp.data(), dl);
        for (int64_t x = 0; x < NJ * dl; ++x) s.dk[j0 * dl + x] += s.tmp[x];
      });
    }
  }
  // Into the unit's accumulators, halo positions in box order (box_view's).
  int64_t p = 0;
  for (int64_t x0 = 0; x0 < kh[0].count; ++x0)
    for (int64_t x1 = 0; x1 < kh[1].count; ++x1)
      for (int64_t x2 = 0; x2 < kh[2].count; ++x2, ++p) {
        float* dk = const_cast<float*>(DK.at(x0, x1, x2));
        float* dv = const_cast<float*>(DV.at(x0, x1, x2));
        for (int64_t c = 0; c < g.head_dim; ++c) dk[c] += s.dk[p * dl + c];
        for (int64_t c = 0; c < g.value_dim; ++c) dv[c] += s.dv[p * dvl + c];
      }
  // Large tiles' buffers are not kept for the thread's next call (as trim_scratch does).
  for (auto* buf : {&s.p, &s.ds, &s.pt, &s.dst})
    if (buf->capacity() * sizeof(float) > (size_t{8} << 20)) std::vector<float>().swap(*buf);
  return true;
}

// bwd_fused_unit's per-tile hook for the float32-accumulation build.
struct SharedBwdTile {
  template <typename T>
  bool operator()(const Geometry& g, const BwdArgs<T, float>& args, int64_t b, int64_t kvh,
                  const Range qr[kAxes], const Range kh[kAxes], const View<float>& DK,
                  const View<float>& DV, float* partial) const {
    return bwd_shared_tile<T>(g, args, b, kvh, qr, kh, DK, DV, partial);
  }
};

#endif  // NATJAX_AVX2

}  // namespace natjax
