// CPU neighborhood-attention kernels: forward, dq (+ delta, d_rpb partials) and dk/dv.
//
// Work unit = (batch, kv head, tile). A unit's queries see a box of keys, the tile's "halo"
// (a union of windows, a run per axis), which stays in L2 while every query of the tile and
// every query head of the kv head's group is served from it (GQA reuses the keys). The halo is
// packed into contiguous, zero-padded float32 (float64) rows: dilation gaps and the other heads
// removed, float16/bfloat16 widened once.
//
// A query's neighborhood is a box: rows (outer offsets) of `c2` keys that are consecutive along
// the innermost axis, at a fixed stride. Per row: logits by 8-key dot blocks plus the bias row
// (contiguous in `rpb`), padded to 8 lanes with -inf; an online softmax over chunks of rows
// (FlashAttention-style running max and sum: the logits only ever exist as one L1-sized chunk);
// p.V accumulated in float32 registers. Two neighbouring queries of a row are processed
// together when their windows overlap: each key and value row is loaded once for both. The
// window tables decide everything else.
//
// Backward (FlashAttention-2 from the saved lse; delta = sum(dO * O) - d_lse):
//   p = exp(s - lse), ds = p * (dO.v - delta);  dq = scale * sum ds k;
//   dk = scale * sum ds q,  dv = sum p dO  over the key's *inverse* neighborhood: every dk/dv
//   row is owned by one unit (no atomics, deterministic);
//   d_rpb: each dq unit bins ds into its own partial buffer, reduced in a fixed order.
//
// Non-finite inputs: every element of q, k and v is read as 0 when it is NaN or +-inf
// (`Read::kInput`), exactly what the op's NaN/inf confinement (natjax/ops/na/nonfinite.py)
// computes on its zero-substituted inputs, so the wrapper skips its substituted copy of q, k, v
// for this backend and only adds its fix-up. The cotangent d_out is read as it is (`kExact`).
// The forward also reports, per (batch, head), whether it read such an element (recorded by the
// readers themselves, `box_view`, `load_row`, `box_transposed` and the strip packers, through
// their `seen` argument: no second pass over the data): the wrapper's predicate for the fix-up,
// instead of a pass of its own over q, k and v.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/dtypes.h"
#include "../common/geometry.h"
#include "simd.h"

namespace natjax {

constexpr int64_t kChunk = 256;  // online-softmax chunk, in logits (kept in L1)

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

// Rows of a box: element (x0, x1, x2) starts at base + x0*s0 + x1*s1 + x2*s2.
template <typename A>
struct View {
  const A* base = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0;
  const A* at(int64_t x0, int64_t x1, int64_t x2) const { return base + x0 * s0 + x1 * s1 + x2 * s2; }
};

struct Position {
  int64_t p[kAxes];
  int64_t box_index;
};

template <typename A>
struct Scratch {
  std::vector<A> k, v, q, dout, dk, dv, rowq, rowdo, acc, logit, p, dp, bias, gbias, glse,
      gdelta;
  std::vector<int32_t> bax[kAxes];
  std::vector<Position> order;
};

template <typename A>
Scratch<A>& thread_scratch() {
  thread_local Scratch<A> s;
  return s;
}

// Scratch lives on in XLA's pool threads between calls; give back buffers that one large call
// grew beyond what small calls need.
template <typename A>
void trim_scratch(Scratch<A>& s) {
  constexpr size_t kKeep = size_t{8} << 20;  // bytes
  for (auto* buf : {&s.k, &s.v, &s.q, &s.dout, &s.dk, &s.dv})
    if (buf->capacity() * sizeof(A) > kKeep) std::vector<A>().swap(*buf);
}

inline int64_t box_volume(const Range r[kAxes]) { return r[0].count * r[1].count * r[2].count; }

// How an operand is read: q, k and v with non-finite elements as 0 (see the top), the
// cotangent d_out exactly.
enum class Read { kInput, kExact };

// x, or 0 where x is NaN or +-inf (a compare and a mask: vectorises, unlike a branch).
template <typename A>
inline A finite_or_zero(A x) {
  return std::fabs(x) <= std::numeric_limits<A>::max() ? x : A(0);
}

// The top bit of the result is set where x is NaN or +-inf (an all-ones exponent field plus one
// carries into the sign bit). The readers OR it over what they load: an integer reduction, which
// the compiler vectorises (a bool one it does not: the readers ran 1.3x slower with it).
inline uint32_t nonfinite_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x7f800000u) + 0x00800000u;
}
inline uint64_t nonfinite_bits(double x) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x7ff0000000000000u) + 0x0010000000000000u;
}
template <typename U>
inline bool top_bit(U u) {
  return (u >> (8 * sizeof(U) - 1)) != 0;
}

// One element of an operand converted to the accumulation type, read as `how` says.
template <typename A, typename T>
inline A read_value(T x, Read how) {
  const A y = static_cast<A>(to_float(x));
  return how == Read::kInput ? finite_or_zero(y) : y;
}

// The rows ([B, N, nheads, dim] layout) of `box`, packed into `pack` (converted, zero-padded
// to `ld`): contiguous rows in a small buffer. Reading float32 inputs in place through strides
// was measured 1.5x slower (rows 2*H*D bytes apart alias in L1), despite saving the copy.
// `*seen` (when given) is set if an element read is NaN or +-inf.
template <typename T, typename A>
View<A> box_view(const Geometry& g, const T* src, int64_t b, int64_t head, int64_t nheads,
                 int64_t dim, const Range box[kAxes], int64_t ld, std::vector<A>& pack,
                 Read how, bool* seen = nullptr) {
  decltype(nonfinite_bits(A{})) bad = 0;  // of what was read
  pack.resize(box_volume(box) * ld);
  A* d = pack.data();
  for (int64_t x0 = 0; x0 < box[0].count; ++x0) {
    const int64_t p0 = box[0].start + g.axis[0].dilation * x0;
    for (int64_t x1 = 0; x1 < box[1].count; ++x1) {
      const int64_t p1 = box[1].start + g.axis[1].dilation * x1;
      for (int64_t x2 = 0; x2 < box[2].count; ++x2, d += ld) {
        const int64_t p2 = box[2].start + g.axis[2].dilation * x2;
        const T* s = src + ((b * g.tokens + g.flat(p0, p1, p2)) * nheads + head) * dim;
        for (int64_t c = 0; c < dim; ++c) {
          const A y = static_cast<A>(to_float(s[c]));
          bad |= nonfinite_bits(y);
          d[c] = how == Read::kInput ? finite_or_zero(y) : y;
        }
        for (int64_t c = dim; c < ld; ++c) d[c] = 0;
      }
    }
  }
  if (seen) *seen |= top_bit(bad);
  View<A> v;
  v.base = pack.data();
  v.s2 = ld;
  v.s1 = box[2].count * ld;
  v.s0 = box[1].count * box[2].count * ld;
  return v;
}

// View of one value per position ([B, N, H] layout, accumulation type) for head h over `box`.
template <typename A>
View<A> scalar_view(const Geometry& g, const A* src, int64_t b, int64_t h, const Range box[kAxes]) {
  const int64_t L1 = g.axis[1].length, L2 = g.axis[2].length;
  View<A> v;
  v.base = src + (b * g.tokens + g.flat(box[0].start, box[1].start, box[2].start)) * g.heads + h;
  v.s2 = g.axis[2].dilation * g.heads;
  v.s1 = g.axis[1].dilation * L2 * g.heads;
  v.s0 = g.axis[0].dilation * L1 * L2 * g.heads;
  return v;
}

// Prefetch hint for one row (may point past the buffer: prefetches never fault).
template <typename T>
inline void prefetch_row(const T* p, int64_t dim) {
  for (int64_t c = 0; c < dim * static_cast<int64_t>(sizeof(T)); c += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(p) + c);
}

// Loads one operand row, read as `how` says, multiplied by `scale`, zero-padded to `ld`;
// `*seen` (when given) is set if an element read is NaN or +-inf.
template <typename T, typename A>
void load_row(const T* src, int64_t dim, A scale, A* dst, int64_t ld, Read how,
              bool* seen = nullptr) {
  decltype(nonfinite_bits(A{})) bad = 0;
  for (int64_t c = 0; c < dim; ++c) {
    const A y = static_cast<A>(to_float(src[c]));
    bad |= nonfinite_bits(y);
    dst[c] = (how == Read::kInput ? finite_or_zero(y) : y) * scale;
  }
  for (int64_t c = dim; c < ld; ++c) dst[c] = 0;
  if (seen) *seen |= top_bit(bad);
}

// Zeros after the bias in padded_bias's buffer: the strip kernel's unmasked 16-lane (AVX-512)
// bias loads end up to 15 values after a row (their extra lanes are permuted away).
constexpr int64_t kBiasPadAfter = 16;

// The bias of head h, with kLanes zeros before it and kBiasPadAfter after: 8-lane loads that
// start up to 8 values before a row, and 8- or 16-lane loads that end after it, stay inside the
// buffer (those lanes are masked or discarded).
template <typename A>
const A* padded_bias(const Geometry& g, const A* rpb, int64_t h, std::vector<A>& buf) {
  buf.assign(kLanes + g.rpb_volume + kBiasPadAfter, A(0));
  if (g.has_rpb)
    std::copy(rpb + h * g.rpb_volume, rpb + (h + 1) * g.rpb_volume, buf.begin() + kLanes);
  return buf.data() + kLanes;
}

// One query's window, relative to the key halo `kh`: row (x0, x1) holds `c[2]` keys starting at
// halo coordinates (o0 + x0, o1 + x1, o2); its bias row starts at `bias_row(x0, x1)`.
struct Window {
  int64_t o[kAxes] = {}, c[kAxes] = {}, r[kAxes] = {}, rd1 = 1, rd2 = 1;
  Window() = default;
  Window(const Geometry& g, const int64_t i[kAxes], const Range kh[kAxes]) {
    for (int a = 0; a < kAxes; ++a) {
      const AxisTables& ax = g.axis[a];
      c[a] = ax.win_count[i[a]];
      o[a] = (ax.win_start[i[a]] - kh[a].start) / ax.dilation;
      r[a] = g.has_rpb ? ax.rpb_start[i[a]] : 0;
    }
    rd1 = g.axis[1].rpb_dim;
    rd2 = g.axis[2].rpb_dim;
  }
  int64_t rows() const { return c[0] * c[1]; }
  int64_t bias_row(int64_t x0, int64_t x1) const {
    return ((r[0] + x0) * rd1 + (r[1] + x1)) * rd2 + r[2];
  }
};

// Positions of a box in row-major processing order (measured faster than inner-axis-outermost:
// the windows of consecutive queries slide along contiguous packed rows, which the hardware
// prefetchers follow). `box_index` is the row-major index in the box.

inline void box_positions(const Geometry& g, const Range box[kAxes], std::vector<Position>& out) {
  out.clear();
  for (int64_t x0 = 0; x0 < box[0].count; ++x0)
    for (int64_t x1 = 0; x1 < box[1].count; ++x1)
      for (int64_t x2 = 0; x2 < box[2].count; ++x2) {
        Position q;
        q.p[0] = box[0].start + g.axis[0].dilation * x0;
        q.p[1] = box[1].start + g.axis[1].dilation * x1;
        q.p[2] = box[2].start + g.axis[2].dilation * x2;
        q.box_index = (x0 * box[1].count + x1) * box[2].count + x2;
        out.push_back(q);
      }
}

inline int64_t chunk_capacity(const Geometry& g) {
  return std::max(kChunk, pad_lanes(std::max(g.axis[2].max_window, g.axis[2].max_inverse)));
}

// ---------------------------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------------------------

// Online-softmax state of one query (FlashAttention-style running max and sum).
template <typename A>
struct Softmax {
  A m = -std::numeric_limits<A>::infinity(), l = 0;
  // Folds in a chunk of n logits (-inf padded), writing their weights to p; rescales acc.
  void update(const A* logit, A* p, int64_t n, A* acc, int64_t len) {
    const A m_chunk = block_max(logit, n);
    if (m_chunk > m) {
      if (l > 0) {
        const A alpha = std::exp(m - m_chunk);
        l *= alpha;
        for (int64_t c = 0; c < len; ++c) acc[c] *= alpha;
      }
      m = m_chunk;
    }
    l += exp_sub(logit, &m, 0, p, n);
  }
};

// Writes a query's output row and lse.
template <typename T, typename A>
void finish_query(const Geometry& g, const Softmax<A>& sm, const A* acc, T* out, A* lse) {
  const A inv = A(1) / sm.l;
  for (int64_t c = 0; c < g.value_dim; ++c) out[c] = from_float<T>(acc[c] * inv);
  *lse = sm.m + std::log(sm.l);
}

// Two queries of one row whose inner windows overlap can share every key and value load: the
// union of their windows is one run per window row (8 keys for two neighbours of a 7-window).
inline bool can_pair(const Window& a, const Window& b, int64_t* u0, int64_t* un) {
  if (a.c[0] != b.c[0] || a.c[1] != b.c[1] || a.o[0] != b.o[0] || a.o[1] != b.o[1]) return false;
  const int64_t lo = std::min(a.o[2], b.o[2]);
  const int64_t hi = std::max(a.o[2] + a.c[2], b.o[2] + b.c[2]);
  if (std::max(a.o[2], b.o[2]) > std::min(a.o[2] + a.c[2], b.o[2] + b.c[2])) return false;
  *u0 = lo;
  *un = hi - lo;
  return pad_lanes(hi - lo) == pad_lanes(std::max(a.c[2], b.c[2]));
}

// One query over its window in chunks of rows (online softmax): q (scaled, padded) already in
// `q`; `acc` (padded value dim), `logit` and `p` (`cap` each) are scratch.
template <typename T, typename A>
void forward_query(const Geometry& g, const FwdArgs<T, A>& args, const View<A>& K,
                   const View<A>& V, const A* bias, const Window& w, int64_t row, int64_t cap,
                   const A* q, A* acc, A* logit, A* p) {
  const int64_t dl = pad_lanes(g.head_dim), dvl = pad_lanes(g.value_dim);
  const A neg_inf = -std::numeric_limits<A>::infinity();
  std::fill(acc, acc + dvl, A(0));
  Softmax<A> sm;
  const int64_t width = pad_lanes(w.c[2]), per_chunk = std::max<int64_t>(1, cap / width);
  for (int64_t r0 = 0; r0 < w.rows(); r0 += per_chunk) {
    const int64_t nr = std::min(per_chunk, w.rows() - r0);
    for (int64_t rr = 0; rr < nr; ++rr) {
      const int64_t x0 = (r0 + rr) / w.c[1], x1 = (r0 + rr) % w.c[1];
      row_logits(q, K.at(w.o[0] + x0, w.o[1] + x1, w.o[2]), K.s2, w.c[2], dl,
                 g.has_rpb ? bias + w.bias_row(x0, x1) : nullptr, neg_inf, logit + rr * width);
    }
    sm.update(logit, p, nr * width, acc, dvl);
    for (int64_t rr = 0; rr < nr; ++rr) {
      const int64_t x0 = (r0 + rr) / w.c[1], x1 = (r0 + rr) % w.c[1];
      row_axpy(acc, p + rr * width, V.at(w.o[0] + x0, w.o[1] + x1, w.o[2]), V.s2, w.c[2], dvl);
    }
  }
  finish_query(g, sm, acc, args.out + row * g.value_dim, args.lse + row);
}

// A forward work unit: unit = (b * kv_heads + kvh) * num_tiles + tile; the tile's queries
// `qr` and the key halo `kh` they see (a box of keys per axis).
struct Unit {
  int64_t b = 0, kvh = 0, tile = 0;
  Range qr[kAxes], kh[kAxes];
};

inline Unit decode_unit(const Geometry& g, int64_t unit) {
  const int64_t ntiles = g.num_tiles();
  Unit u;
  u.tile = unit % ntiles;
  u.kvh = (unit / ntiles) % g.kv_heads;
  u.b = unit / ntiles / g.kv_heads;
  g.tile_ranges(u.tile, u.qr);
  for (int a = 0; a < kAxes; ++a) u.kh[a] = g.key_halo(a, u.qr[a]);
  return u;
}

// The forward of one work unit, query by query (pairs of neighbouring queries share their key
// loads). Returns whether it read a NaN/inf q, k or v element.
template <typename T, typename A>
bool forward_unit(const Geometry& g, const FwdArgs<T, A>& args, const Unit& un) {
  Scratch<A>& s = thread_scratch<A>();
  const int64_t group = g.group_size(), b = un.b, kvh = un.kvh;
  const int64_t dl = pad_lanes(g.head_dim), dvl = pad_lanes(g.value_dim);
  const Range* qr = un.qr;
  const Range* kh = un.kh;
  bool seen = false;
  const View<A> K =
      box_view(g, args.k, b, kvh, g.kv_heads, g.head_dim, kh, dl, s.k, Read::kInput, &seen);
  const View<A> V = box_view(g, args.v, b, kvh, g.kv_heads, g.value_dim, kh, dvl, s.v,
                             Read::kInput, &seen);
  const int64_t cap = chunk_capacity(g);
  s.logit.resize(2 * cap);
  s.p.resize(2 * cap);
  s.rowq.resize(2 * dl);
  s.acc.resize(2 * dvl);
  A* const qa = s.rowq.data();
  A* const qb = qa + dl;
  A* const acc_a = s.acc.data();
  A* const acc_b = acc_a + dvl;
  A* const la = s.logit.data();
  A* const lb = la + cap;
  A* const pa = s.p.data();
  A* const pb = pa + cap;
  const A scale = static_cast<A>(g.scale);
  const A neg_inf = -std::numeric_limits<A>::infinity();
  box_positions(g, qr, s.order);
  const std::vector<Position>& order = s.order;
  auto row_of = [&](size_t t, int64_t h) {
    const int64_t* i = order[t].p;
    return (b * g.tokens + g.flat(i[0], i[1], i[2])) * g.heads + h;
  };
  for (int64_t hh = 0; hh < group; ++hh) {
    const int64_t h = kvh * group + hh;
    const A* bias = padded_bias(g, args.rpb, h, s.bias);
    for (size_t t = 0; t < order.size();) {
      if (t + 3 < order.size())  // later queries' rows come from L3/DRAM: start them now
        for (size_t u = t + 2; u < t + 4; ++u)
          prefetch_row(args.q + row_of(u, h) * g.head_dim, g.head_dim);
      const Window wa(g, order[t].p, kh);
      int64_t u0 = 0, un = 0;
      const bool pair = t + 1 < order.size() && [&] {
        const Window wb(g, order[t + 1].p, kh);
        return can_pair(wa, wb, &u0, &un);
      }();
      const int64_t row_a = row_of(t, h);
      load_row(args.q + row_a * g.head_dim, g.head_dim, scale, qa, dl, Read::kInput, &seen);
      std::fill(acc_a, acc_a + dvl, A(0));
      Softmax<A> sa, sb;
      if (!pair) {
        forward_query(g, args, K, V, bias, wa, row_a, cap, qa, acc_a, la, pa);
        t += 1;
        continue;
      }
      const Window wb(g, order[t + 1].p, kh);
      const int64_t row_b = row_of(t + 1, h);
      load_row(args.q + row_b * g.head_dim, g.head_dim, scale, qb, dl, Read::kInput, &seen);
      std::fill(acc_b, acc_b + dvl, A(0));
      const int64_t off_a = wa.o[2] - u0, off_b = wb.o[2] - u0;
      const int64_t width = pad_lanes(un), per_chunk = std::max<int64_t>(1, cap / width);
      for (int64_t r0 = 0; r0 < wa.rows(); r0 += per_chunk) {
        const int64_t nr = std::min(per_chunk, wa.rows() - r0);
        for (int64_t rr = 0; rr < nr; ++rr) {
          const int64_t x0 = (r0 + rr) / wa.c[1], x1 = (r0 + rr) % wa.c[1];
          // Bias pointers are shifted so that run position j reads the query's own bias row
          // (the buffer has zero padding on both sides for the lanes outside a window).
          row_logits2(qa, qb, K.at(wa.o[0] + x0, wa.o[1] + x1, u0), K.s2, un, dl,
                      g.has_rpb ? bias + wa.bias_row(x0, x1) - off_a : nullptr,
                      g.has_rpb ? bias + wb.bias_row(x0, x1) - off_b : nullptr, off_a, wa.c[2],
                      off_b, wb.c[2], neg_inf, la + rr * width, lb + rr * width);
        }
        sa.update(la, pa, nr * width, acc_a, dvl);
        sb.update(lb, pb, nr * width, acc_b, dvl);
        for (int64_t rr = 0; rr < nr; ++rr) {
          const int64_t x0 = (r0 + rr) / wa.c[1], x1 = (r0 + rr) % wa.c[1];
          row_axpy2(acc_a, acc_b, pa + rr * width, pb + rr * width,
                    V.at(wa.o[0] + x0, wa.o[1] + x1, u0), V.s2, un, dvl);
        }
      }
      finish_query(g, sa, acc_a, args.out + row_a * g.value_dim, args.lse + row_a);
      finish_query(g, sb, acc_b, args.out + row_b * g.value_dim, args.lse + row_b);
      t += 2;
    }
  }
  trim_scratch(s);
  return seen;
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
  const int64_t dl = pad_lanes(g.head_dim), dvl = pad_lanes(g.value_dim);
  const A scale = static_cast<A>(g.scale);
  const A neg_inf = -std::numeric_limits<A>::infinity();
  A* partial = g.has_rpb ? args.drpb_partial + unit * group * g.rpb_volume : nullptr;
  if (partial) std::fill(partial, partial + group * g.rpb_volume, A(0));
  const int64_t cap = chunk_capacity(g);
  s.logit.resize(cap);
  s.p.resize(cap);
  s.dp.resize(cap);
  s.rowq.resize(dl);
  s.rowdo.resize(dvl);
  s.acc.resize(dl);
  const int64_t t_end = std::min(ntiles, (chunk + 1) * args.tiles_per_dq_unit);
  for (int64_t tile = chunk * args.tiles_per_dq_unit; tile < t_end; ++tile) {
    Range qr[kAxes], kh[kAxes];
    g.tile_ranges(tile, qr);
    for (int a = 0; a < kAxes; ++a) kh[a] = g.key_halo(a, qr[a]);
    const View<A> K = box_view(g, args.k, b, kvh, g.kv_heads, g.head_dim, kh, dl, s.k,
                               Read::kInput);
    const View<A> V = box_view(g, args.v, b, kvh, g.kv_heads, g.value_dim, kh, dvl, s.v,
                               Read::kInput);
    box_positions(g, qr, s.order);
    for (int64_t hh = 0; hh < group; ++hh) {
      const int64_t h = kvh * group + hh;
      const A* bias = padded_bias(g, args.rpb, h, s.bias);
      A* part_h = partial ? partial + hh * g.rpb_volume : nullptr;
      for (const Position& pos : s.order) {
        {
          {
            const int64_t* i = pos.p;
            const int64_t row = (b * g.tokens + g.flat(i[0], i[1], i[2])) * g.heads + h;
            load_row(args.q + row * g.head_dim, g.head_dim, scale, s.rowq.data(), dl, Read::kInput);
            load_row(args.d_out + row * g.value_dim, g.value_dim, A(1), s.rowdo.data(), dvl,
                     Read::kExact);
            const T* os = args.out + row * g.value_dim;
            A delta = 0;
            for (int64_t c = 0; c < g.value_dim; ++c)
              delta += s.rowdo[c] * static_cast<A>(to_float(os[c]));
            delta -= args.d_lse[row];
            args.delta[row] = delta;
            const A lse = args.lse[row];
            std::fill(s.acc.begin(), s.acc.end(), A(0));
            const Window w(g, i, kh);
            const int64_t width = pad_lanes(w.c[2]);
            const int64_t per_chunk = std::max<int64_t>(1, cap / width);
            for (int64_t r0 = 0; r0 < w.rows(); r0 += per_chunk) {
              const int64_t nr = std::min(per_chunk, w.rows() - r0);
              for (int64_t rr = 0; rr < nr; ++rr) {
                const int64_t x0 = (r0 + rr) / w.c[1], x1 = (r0 + rr) % w.c[1];
                row_logits(s.rowq.data(), K.at(w.o[0] + x0, w.o[1] + x1, w.o[2]), K.s2, w.c[2],
                           dl, g.has_rpb ? bias + w.bias_row(x0, x1) : nullptr, neg_inf,
                           s.logit.data() + rr * width);
                row_logits(s.rowdo.data(), V.at(w.o[0] + x0, w.o[1] + x1, w.o[2]), V.s2, w.c[2],
                           dvl, static_cast<const A*>(nullptr), A(0), s.dp.data() + rr * width);
              }
              const int64_t n = nr * width;
              exp_sub(s.logit.data(), &lse, 0, s.p.data(), n);
              A* ds = s.dp.data();
              for (int64_t j = 0; j < n; ++j) ds[j] = s.p[j] * (ds[j] - delta);
              for (int64_t rr = 0; rr < nr; ++rr) {
                const int64_t x0 = (r0 + rr) / w.c[1], x1 = (r0 + rr) % w.c[1];
                row_axpy(s.acc.data(), ds + rr * width, K.at(w.o[0] + x0, w.o[1] + x1, w.o[2]),
                         K.s2, w.c[2], dl);
                if (part_h) {
                  A* dst = part_h + w.bias_row(x0, x1);
                  for (int64_t x2 = 0; x2 < w.c[2]; ++x2) dst[x2] += ds[rr * width + x2];
                }
              }
            }
            T* dq = args.dq + row * g.head_dim;
            for (int64_t c = 0; c < g.head_dim; ++c) dq[c] = from_float<T>(s.acc[c] * scale);
          }
        }
      }
    }
  }
  trim_scratch(s);
}

// ---------------------------------------------------------------------------------------------
// Backward, pass 2: dk and dv over each key's inverse neighborhood.
// ---------------------------------------------------------------------------------------------

template <typename T, typename A>
void dkv_unit(const Geometry& g, const BwdArgs<T, A>& args, int64_t unit) {
  Scratch<A>& s = thread_scratch<A>();
  const int64_t ntiles = g.num_tiles(), group = g.group_size();
  const int64_t tile = unit % ntiles, kvh = (unit / ntiles) % g.kv_heads;
  const int64_t b = unit / ntiles / g.kv_heads;
  const int64_t dl = pad_lanes(g.head_dim), dvl = pad_lanes(g.value_dim);
  const A scale = static_cast<A>(g.scale);
  const A neg_inf = -std::numeric_limits<A>::infinity();
  Range kr[kAxes], qh[kAxes];
  g.tile_ranges(tile, kr);
  for (int a = 0; a < kAxes; ++a) qh[a] = g.query_halo(a, kr[a]);
  const int64_t tvol = box_volume(kr), qvol = box_volume(qh);
  const View<A> K = box_view(g, args.k, b, kvh, g.kv_heads, g.head_dim, kr, dl, s.k, Read::kInput);
  const View<A> V = box_view(g, args.v, b, kvh, g.kv_heads, g.value_dim, kr, dvl, s.v,
                             Read::kInput);
  s.dk.assign(tvol * dl, A(0));
  s.dv.assign(tvol * dvl, A(0));
  const int64_t cap = chunk_capacity(g);
  for (auto* buf : {&s.logit, &s.p, &s.dp, &s.glse, &s.gdelta}) buf->resize(cap);
  s.gbias.resize(cap + kLanes);
  s.rowq.resize(dl);
  for (int a = 0; a < kAxes; ++a) s.bax[a].resize(std::max<int64_t>(g.axis[a].max_inverse, 1));
  box_positions(g, kr, s.order);
  for (int64_t hh = 0; hh < group && qvol > 0; ++hh) {
    const int64_t h = kvh * group + hh;
    const View<A> Q = box_view(g, args.q, b, h, g.heads, g.head_dim, qh, dl, s.q, Read::kInput);
    const View<A> DO = box_view(g, args.d_out, b, h, g.heads, g.value_dim, qh, dvl, s.dout,
                                   Read::kExact);
    const View<A> LSE = scalar_view(g, args.lse, b, h, qh);
    const View<A> DELTA = scalar_view(g, static_cast<const A*>(args.delta), b, h, qh);
    const A* bias = padded_bias(g, args.rpb, h, s.bias);
    for (const Position& pos : s.order) {
      {
        {
          const int64_t* j = pos.p;
          const int64_t key = pos.box_index;
          const int64_t y0 = (j[0] - kr[0].start) / g.axis[0].dilation;
          const int64_t y1 = (j[1] - kr[1].start) / g.axis[1].dilation;
          const int64_t y2 = (j[2] - kr[2].start) / g.axis[2].dilation;
          // The key's inverse neighborhood: a box of queries, rows of c[2] along the inner
          // axis; bax[a][t] = the key's bias index (along a) in the window of query t.
          int64_t o[kAxes], c[kAxes];
          bool empty = false;
          for (int a = 0; a < kAxes; ++a) {
            const AxisTables& ax = g.axis[a];
            c[a] = ax.inv_count[j[a]];
            empty |= c[a] == 0;
            if (empty) break;
            const int64_t first = ax.inv_start[j[a]];
            o[a] = (first - qh[a].start) / ax.dilation;
            for (int64_t t = 0; t < c[a]; ++t) {
              const int64_t i = first + ax.dilation * t;
              s.bax[a][t] = g.has_rpb ? static_cast<int32_t>(
                                            ax.rpb_start[i] + (j[a] - ax.win_start[i]) / ax.dilation)
                                      : 0;
            }
          }
          if (empty) continue;
          const A* krow = K.at(y0, y1, y2);
          for (int64_t cc = 0; cc < dl; ++cc) s.rowq[cc] = krow[cc] * scale;
          const A* vrow = V.at(y0, y1, y2);
          A* dkrow = s.dk.data() + key * dl;
          A* dvrow = s.dv.data() + key * dvl;
          const int64_t rows = c[0] * c[1], width = pad_lanes(c[2]);
          const int64_t per_chunk = std::max<int64_t>(1, cap / width);
          for (int64_t r0 = 0; r0 < rows; r0 += per_chunk) {
            const int64_t nr = std::min(per_chunk, rows - r0);
            for (int64_t rr = 0; rr < nr; ++rr) {
              const int64_t t0 = (r0 + rr) / c[1], t1 = (r0 + rr) % c[1];
              const int64_t x0 = o[0] + t0, x1 = o[1] + t1;
              A* gb = s.gbias.data();
              if (g.has_rpb) {
                const int64_t base = (s.bax[0][t0] * g.axis[1].rpb_dim + s.bax[1][t1]) *
                                     g.axis[2].rpb_dim;
                for (int64_t t2 = 0; t2 < c[2]; ++t2) gb[t2] = bias[base + s.bax[2][t2]];
              }
              const A* lse_row = LSE.at(x0, x1, o[2]);
              const A* delta_row = DELTA.at(x0, x1, o[2]);
              A* gl = s.glse.data() + rr * width;
              A* gd = s.gdelta.data() + rr * width;
              for (int64_t t2 = 0; t2 < width; ++t2) {
                gl[t2] = t2 < c[2] ? lse_row[t2 * LSE.s2] : A(0);
                gd[t2] = t2 < c[2] ? delta_row[t2 * DELTA.s2] : A(0);
              }
              row_logits(s.rowq.data(), Q.at(x0, x1, o[2]), Q.s2, c[2], dl,
                         g.has_rpb ? static_cast<const A*>(gb) : nullptr, neg_inf,
                         s.logit.data() + rr * width);
              row_logits(vrow, DO.at(x0, x1, o[2]), DO.s2, c[2], dvl,
                         static_cast<const A*>(nullptr), A(0), s.dp.data() + rr * width);
            }
            const int64_t n = nr * width;
            exp_sub(s.logit.data(), s.glse.data(), 1, s.p.data(), n);
            A* ds = s.dp.data();
            for (int64_t t = 0; t < n; ++t) ds[t] = s.p[t] * (ds[t] - s.gdelta[t]);
            for (int64_t rr = 0; rr < nr; ++rr) {
              const int64_t t0 = (r0 + rr) / c[1], t1 = (r0 + rr) % c[1];
              row_axpy(dkrow, ds + rr * width, Q.at(o[0] + t0, o[1] + t1, o[2]), Q.s2, c[2], dl);
              row_axpy(dvrow, s.p.data() + rr * width, DO.at(o[0] + t0, o[1] + t1, o[2]), DO.s2,
                       c[2], dvl);
            }
          }
        }
      }
    }
  }
  // Store the tile's rows (dk = scale * sum ds q).
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
        for (int64_t c = 0; c < g.head_dim; ++c) dk[c] = from_float<T>(s.dk[key * dl + c] * scale);
        for (int64_t c = 0; c < g.value_dim; ++c) dv[c] = from_float<T>(s.dv[key * dvl + c]);
      }
    }
  }
  trim_scratch(s);
}

// ---------------------------------------------------------------------------------------------
// Backward in one pass, when one unit owns a whole (batch, kv head) slice: ds is computed once
// per pair and dk/dv are scattered into the unit's own float32 accumulators (no other unit
// touches them: still no atomics, and a fixed order). About 30% less work than dq + dk/dv.
// `tile_fn` may take a tile over (shared_bwd.h: tiles whose queries share one window); it
// returns false for the tiles it leaves to the per-query code here.
// ---------------------------------------------------------------------------------------------

struct NoTileKernel {
  template <typename T, typename A>
  bool operator()(const Geometry&, const BwdArgs<T, A>&, int64_t, int64_t, const Range*,
                  const Range*, const View<A>&, const View<A>&, A*) const {
    return false;
  }
};

template <typename T, typename A, class TileFn = NoTileKernel>
void bwd_fused_unit(const Geometry& g, const BwdArgs<T, A>& args, int64_t unit,
                    const TileFn& tile_fn = {}) {
  Scratch<A>& s = thread_scratch<A>();
  const int64_t ntiles = g.num_tiles(), group = g.group_size();
  const int64_t kvh = unit % g.kv_heads, b = unit / g.kv_heads;
  const int64_t dl = pad_lanes(g.head_dim), dvl = pad_lanes(g.value_dim);
  const A scale = static_cast<A>(g.scale);
  const A neg_inf = -std::numeric_limits<A>::infinity();
  A* partial = g.has_rpb ? args.drpb_partial + unit * group * g.rpb_volume : nullptr;
  if (partial) std::fill(partial, partial + group * g.rpb_volume, A(0));
  const int64_t cap = chunk_capacity(g);
  for (auto* buf : {&s.logit, &s.p, &s.dp}) buf->resize(2 * cap);
  s.rowq.resize(2 * dl);
  s.rowdo.resize(2 * dvl);
  s.acc.resize(2 * dl);
  s.dk.assign(g.tokens * dl, A(0));
  s.dv.assign(g.tokens * dvl, A(0));
  A *const qa = s.rowq.data(), *const qb = qa + dl;
  A *const da = s.rowdo.data(), *const db = da + dvl;
  A *const ga = s.acc.data(), *const gb = ga + dl;  // dq accumulators
  A *const la = s.logit.data(), *const lb = la + cap;
  A *const pa = s.p.data(), *const pb = pa + cap;
  A *const sa = s.dp.data(), *const sb = sa + cap;  // dp, then ds
  const int64_t L1 = g.axis[1].length, L2 = g.axis[2].length;
  for (int64_t tile = 0; tile < ntiles; ++tile) {
    Range qr[kAxes], kh[kAxes];
    g.tile_ranges(tile, qr);
    for (int a = 0; a < kAxes; ++a) kh[a] = g.key_halo(a, qr[a]);
    // The accumulators, seen through the halo's coordinates (rows `dl` apart per position).
    const int64_t origin = g.flat(kh[0].start, kh[1].start, kh[2].start);
    View<A> DK, DV;
    DK.base = s.dk.data() + origin * dl;
    DK.s2 = g.axis[2].dilation * dl;
    DK.s1 = g.axis[1].dilation * L2 * dl;
    DK.s0 = g.axis[0].dilation * L1 * L2 * dl;
    DV.base = s.dv.data() + origin * dvl;
    DV.s2 = g.axis[2].dilation * dvl;
    DV.s1 = g.axis[1].dilation * L2 * dvl;
    DV.s0 = g.axis[0].dilation * L1 * L2 * dvl;
    if (tile_fn(g, args, b, kvh, qr, kh, DK, DV, partial)) continue;
    const View<A> K = box_view(g, args.k, b, kvh, g.kv_heads, g.head_dim, kh, dl, s.k,
                               Read::kInput);
    const View<A> V = box_view(g, args.v, b, kvh, g.kv_heads, g.value_dim, kh, dvl, s.v,
                               Read::kInput);
    box_positions(g, qr, s.order);
    const std::vector<Position>& order = s.order;
    for (int64_t hh = 0; hh < group; ++hh) {
      const int64_t h = kvh * group + hh;
      const A* bias = padded_bias(g, args.rpb, h, s.bias);
      A* part_h = partial ? partial + hh * g.rpb_volume : nullptr;
      auto row_of = [&](size_t t) {
        const int64_t* i = order[t].p;
        return (b * g.tokens + g.flat(i[0], i[1], i[2])) * g.heads + h;
      };
      // Loads query t's scaled q and dO rows; returns delta = sum(dO * O) - d_lse.
      auto load_query = [&](int64_t row, A* q, A* d) {
        load_row(args.q + row * g.head_dim, g.head_dim, scale, q, dl, Read::kInput);
        load_row(args.d_out + row * g.value_dim, g.value_dim, A(1), d, dvl, Read::kExact);
        const T* os = args.out + row * g.value_dim;
        A delta = 0;
        for (int64_t c = 0; c < g.value_dim; ++c) delta += d[c] * static_cast<A>(to_float(os[c]));
        return delta - args.d_lse[row];
      };
      for (size_t t = 0; t < order.size();) {
        const Window wa(g, order[t].p, kh);
        int64_t u0 = 0, un = 0;
        const bool pair = t + 1 < order.size() && [&] {
          const Window wb(g, order[t + 1].p, kh);
          return can_pair(wa, wb, &u0, &un);
        }();
        const Window wb = pair ? Window(g, order[t + 1].p, kh) : wa;
        if (!pair) {
          u0 = wa.o[2];
          un = wa.c[2];
        }
        const int64_t row_a = row_of(t), row_b = pair ? row_of(t + 1) : row_a;
        const A delta_a = load_query(row_a, qa, da);
        const A delta_b = pair ? load_query(row_b, qb, db) : A(0);
        const A lse_a = args.lse[row_a], lse_b = args.lse[row_b];
        std::fill(ga, ga + 2 * dl, A(0));
        const int64_t off_a = wa.o[2] - u0, off_b = wb.o[2] - u0;
        const int64_t width = pad_lanes(un), per_chunk = std::max<int64_t>(1, cap / width);
        for (int64_t r0 = 0; r0 < wa.rows(); r0 += per_chunk) {
          const int64_t nr = std::min(per_chunk, wa.rows() - r0);
          for (int64_t rr = 0; rr < nr; ++rr) {
            const int64_t x0 = (r0 + rr) / wa.c[1], x1 = (r0 + rr) % wa.c[1];
            const A* kp = K.at(wa.o[0] + x0, wa.o[1] + x1, u0);
            const A* vp = V.at(wa.o[0] + x0, wa.o[1] + x1, u0);
            const A* ba = g.has_rpb ? bias + wa.bias_row(x0, x1) - off_a : nullptr;
            if (pair) {
              row_logits2(qa, qb, kp, K.s2, un, dl, ba,
                          g.has_rpb ? bias + wb.bias_row(x0, x1) - off_b : nullptr, off_a,
                          wa.c[2], off_b, wb.c[2], neg_inf, la + rr * width, lb + rr * width);
              row_logits2(da, db, vp, V.s2, un, dvl, static_cast<const A*>(nullptr),
                          static_cast<const A*>(nullptr), off_a, wa.c[2], off_b, wb.c[2], A(0),
                          sa + rr * width, sb + rr * width);
            } else {
              row_logits(qa, kp, K.s2, un, dl, ba, neg_inf, la + rr * width);
              row_logits(da, vp, V.s2, un, dvl, static_cast<const A*>(nullptr), A(0),
                         sa + rr * width);
            }
          }
          const int64_t n = nr * width;
          exp_sub(la, &lse_a, 0, pa, n);
          for (int64_t j = 0; j < n; ++j) sa[j] = pa[j] * (sa[j] - delta_a);  // ds
          if (pair) {
            exp_sub(lb, &lse_b, 0, pb, n);
            for (int64_t j = 0; j < n; ++j) sb[j] = pb[j] * (sb[j] - delta_b);
          }
          for (int64_t rr = 0; rr < nr; ++rr) {
            const int64_t x0 = (r0 + rr) / wa.c[1], x1 = (r0 + rr) % wa.c[1];
            const int64_t hx0 = wa.o[0] + x0, hx1 = wa.o[1] + x1, o = rr * width;
            const A* kp = K.at(hx0, hx1, u0);
            A* dkp = const_cast<A*>(DK.at(hx0, hx1, u0));
            A* dvp = const_cast<A*>(DV.at(hx0, hx1, u0));
            if (pair) {
              row_axpy2(ga, gb, sa + o, sb + o, kp, K.s2, un, dl);
              row_scatter2(dkp, DK.s2, un, dl, sa + o, qa, sb + o, qb);
              row_scatter2(dvp, DV.s2, un, dvl, pa + o, da, pb + o, db);
            } else {
              row_axpy(ga, sa + o, kp, K.s2, un, dl);
              row_scatter(dkp, DK.s2, un, dl, sa + o, qa);
              row_scatter(dvp, DV.s2, un, dvl, pa + o, da);
            }
            if (part_h) {
              A* dst = part_h + wa.bias_row(x0, x1);
              for (int64_t x2 = 0; x2 < wa.c[2]; ++x2) dst[x2] += sa[o + off_a + x2];
              if (pair) {
                A* dst_b = part_h + wb.bias_row(x0, x1);
                for (int64_t x2 = 0; x2 < wb.c[2]; ++x2) dst_b[x2] += sb[o + off_b + x2];
              }
            }
          }
        }
        T* dq = args.dq + row_a * g.head_dim;
        for (int64_t c = 0; c < g.head_dim; ++c) dq[c] = from_float<T>(ga[c] * scale);
        if (pair) {
          T* dq_b = args.dq + row_b * g.head_dim;
          for (int64_t c = 0; c < g.head_dim; ++c) dq_b[c] = from_float<T>(gb[c] * scale);
        }
        t += pair ? 2 : 1;
      }
    }
  }
  for (int64_t n = 0; n < g.tokens; ++n) {
    const int64_t row = (b * g.tokens + n) * g.kv_heads + kvh;
    T* dk = args.dk + row * g.head_dim;
    T* dv = args.dv + row * g.value_dim;
    for (int64_t c = 0; c < g.head_dim; ++c) dk[c] = from_float<T>(s.dk[n * dl + c]);
    for (int64_t c = 0; c < g.value_dim; ++c) dv[c] = from_float<T>(s.dv[n * dvl + c]);
  }
  trim_scratch(s);
}

}  // namespace natjax
