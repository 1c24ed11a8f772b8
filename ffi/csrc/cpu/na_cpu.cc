// XLA FFI handlers of the CPU neighborhood-attention kernels.
//
//   natjax_na_fwd_cpu(q, k, v, rpb) -> (out, lse, seen)
//   natjax_na_bwd_cpu(q, k, v, rpb, out, d_out, lse, d_lse) -> (dq, dk, dv, drpb)
//
// Layouts (row-major): q [B, N, H, D], k [B, N, G, D], v [B, N, G, Dv], rpb [H, R] (or [H, 1]
// without a bias), out / d_out [B, N, H, Dv], lse / d_lse [B, N, H], drpb [B, H, R, 1] (per-batch
// partials; the caller sums the batch), seen [B, H] int32 (1 where the forward of (b, h) read a
// NaN/inf q, k or v element, which it read as 0). q/k/v/out/d_out/dq/dk/dv share one dtype (float16,
// bfloat16, float32 or float64); rpb, lse, d_lse and drpb are float32 (float64 for float64).
// The window tables come as attributes (see ../common/geometry.h). Every shape, dtype and table is
// validated here, and problems return an FFI InvalidArgument error instead of crashing.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <type_traits>

#include "../common/geometry.h"
#include "block_fwd.h"
#include "na_kernels.h"
#include "parallel.h"
#include "shared_bwd.h"
#include "shared_fwd.h"
#include "strip_fwd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace natjax {
namespace {

using I64s = ffi::Span<const int64_t>;

struct TableAttrs {
  I64s lengths, dilation, rpb_dims, win_start, win_count, rpb_start, inv_start, inv_count, tiles,
      tile_start, tile_count;
};

std::string dims_str(ffi::AnyBuffer::Dimensions d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

std::string check_dims(const char* name, const ffi::AnyBuffer& buf,
                       const std::vector<int64_t>& want) {
  auto d = buf.dimensions();
  bool ok = d.size() == want.size();
  for (size_t i = 0; ok && i < want.size(); ++i) ok = d[i] == want[i];
  if (ok) return {};
  std::string w = "[";
  for (size_t i = 0; i < want.size(); ++i) w += (i ? ", " : "") + std::to_string(want[i]);
  return std::string(name) + " has shape " + dims_str(d) + ", expected " + w + "]";
}

// Builds and validates the geometry from q/k/v shapes and the table attributes.
std::string make_geometry(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                          const ffi::AnyBuffer& v, const ffi::AnyBuffer& rpb, const TableAttrs& t,
                          bool has_rpb, double scale, bool need_inverse, Geometry& g) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return "q, k and v must have rank 4 [B, N, heads, dim]";
  g.batch = qd[0];
  g.tokens = qd[1];
  g.heads = qd[2];
  g.head_dim = qd[3];
  g.kv_heads = kd[2];
  g.value_dim = vd[3];
  g.has_rpb = has_rpb;
  g.scale = scale;
  if (g.batch < 1 || g.tokens < 1 || g.heads < 1 || g.head_dim < 1 || g.kv_heads < 1 ||
      g.value_dim < 1)
    return "empty q, k or v";
  if (g.heads % g.kv_heads != 0)
    return "heads (" + std::to_string(g.heads) + ") must be a multiple of kv heads (" +
           std::to_string(g.kv_heads) + ")";
  std::string e = check_dims("k", k, {g.batch, g.tokens, g.kv_heads, g.head_dim});
  if (e.empty()) e = check_dims("v", v, {g.batch, g.tokens, g.kv_heads, g.value_dim});
  if (!e.empty()) return e;
  if (t.lengths.size() != kAxes || t.dilation.size() != kAxes || t.rpb_dims.size() != kAxes ||
      t.tiles.size() != kAxes)
    return "lengths, dilation, rpb_dims and tiles must have 3 entries";
  int64_t total_len = 0, total_tiles = 0, tokens = 1, rvol = 1;
  for (int a = 0; a < kAxes; ++a) {
    if (t.lengths[a] < 1 || t.tiles[a] < 1 || t.rpb_dims[a] < 1 || t.dilation[a] < 1)
      return "lengths, dilation, rpb_dims and tiles must be >= 1";
    total_len += t.lengths[a];
    total_tiles += t.tiles[a];
    tokens *= t.lengths[a];
    rvol *= t.rpb_dims[a];
  }
  if (tokens != g.tokens)
    return "q has " + std::to_string(g.tokens) + " positions but the tables describe " +
           std::to_string(tokens);
  if (tokens >= (int64_t{1} << 31) || rvol >= (int64_t{1} << 31))
    return "too many positions or bias entries for 32-bit indices";
  auto sized = [&](I64s s, int64_t n) { return static_cast<int64_t>(s.size()) == n; };
  if (!sized(t.win_start, total_len) || !sized(t.win_count, total_len) ||
      !sized(t.rpb_start, total_len))
    return "window tables must have sum(lengths) entries";
  if (need_inverse && (!sized(t.inv_start, total_len) || !sized(t.inv_count, total_len)))
    return "inverse tables must have sum(lengths) entries";
  if (!sized(t.tile_start, total_tiles) || !sized(t.tile_count, total_tiles))
    return "tile tables must have sum(tiles) entries";
  g.rpb_volume = has_rpb ? rvol : 1;
  e = check_dims("rpb", rpb, {g.heads, has_rpb ? rvol : 1});
  if (!e.empty()) return e;
  int64_t off = 0, toff = 0;
  for (int a = 0; a < kAxes; ++a) {
    AxisTables& ax = g.axis[a];
    ax.length = t.lengths[a];
    ax.dilation = t.dilation[a];
    ax.rpb_dim = has_rpb ? t.rpb_dims[a] : 1;
    ax.win_start = t.win_start.begin() + off;
    ax.win_count = t.win_count.begin() + off;
    ax.rpb_start = t.rpb_start.begin() + off;
    if (need_inverse) {
      ax.inv_start = t.inv_start.begin() + off;
      ax.inv_count = t.inv_count.begin() + off;
    }
    ax.num_tiles = t.tiles[a];
    ax.tile_start = t.tile_start.begin() + toff;
    ax.tile_count = t.tile_count.begin() + toff;
    off += ax.length;
    toff += ax.num_tiles;
    e = ValidateAxis(a, ax, need_inverse, has_rpb);
    if (!e.empty()) return e;
    ComputeMaxima(ax, need_inverse);
  }
  return {};
}

// Calls smaller than this (multiply-adds over all neighborhoods, ~0.1 ms on one core) run on the
// calling thread: waking a pool thread would cost more than it saves.
constexpr double kInlineWork = double(1 << 20);

double call_work(const Geometry& g) {
  double window = 1;
  for (int a = 0; a < kAxes; ++a) window *= double(g.axis[a].max_window);
  return double(g.batch) * g.heads * g.tokens * window * double(g.head_dim + g.value_dim);
}

Scheduler make_scheduler(ffi::ThreadPool& pool, const Geometry& g) {
  Scheduler s;
  s.num_threads = call_work(g) < kInlineWork ? 1 : std::max<int64_t>(1, pool.num_threads());
  s.schedule = [&pool](std::function<void()> task) { pool.Schedule(std::move(task)); };
  return s;
}

ffi::DataType accum_type(ffi::DataType t) {
  return t == ffi::DataType::F64 ? ffi::DataType::F64 : ffi::DataType::F32;
}

bool supported(ffi::DataType t) {
  return t == ffi::DataType::F16 || t == ffi::DataType::BF16 || t == ffi::DataType::F32 ||
         t == ffi::DataType::F64;
}

template <typename T>
T* data(ffi::AnyBuffer& b) {
  return static_cast<T*>(b.untyped_data());
}
template <typename T>
T* data(ffi::Result<ffi::AnyBuffer>& b) {
  return static_cast<T*>(b->untyped_data());
}

// ------------------------------------------------------------------------------------------
// Forward.
// ------------------------------------------------------------------------------------------

template <typename T>
std::string run_forward(const Geometry& g, const Scheduler& sched, ffi::AnyBuffer& q,
                        ffi::AnyBuffer& k, ffi::AnyBuffer& v, ffi::AnyBuffer& rpb,
                        ffi::Result<ffi::AnyBuffer>& out, ffi::Result<ffi::AnyBuffer>& lse,
                        ffi::Result<ffi::AnyBuffer>& seen) {
  using A = typename AccumOf<T>::type;
  FwdArgs<T, A> args{data<const T>(q), data<const T>(k), data<const T>(v), data<const A>(rpb),
                     data<T>(out),     data<A>(lse)};
  const int64_t tiles = g.num_tiles(), units = g.batch * g.kv_heads * tiles;
  std::vector<uint8_t> bad(static_cast<size_t>(units), 0);  // one byte per unit: no races
  std::string e;
#if NATJAX_AVX2
  if constexpr (std::is_same_v<A, float>)  // register-blocked (shared_fwd.h, block_fwd.h)
    e = parallel_for(sched, units, [&](int64_t u) { bad[u] = forward_unit_avx2<T>(g, args, u); });
  else
#endif
    e = parallel_for(sched, units, [&](int64_t u) {
      bad[u] = forward_unit<T, A>(g, args, decode_unit(g, u));
    });
  // seen[b, h]: any unit of (b, kv head of h) read a non-finite element.
  int32_t* flags = data<int32_t>(seen);
  const int64_t group = g.group_size();
  for (int64_t b = 0; b < g.batch; ++b)
    for (int64_t h = 0; h < g.heads; ++h) {
      const uint8_t* u = bad.data() + (b * g.kv_heads + h / group) * tiles;
      flags[b * g.heads + h] = std::any_of(u, u + tiles, [](uint8_t x) { return x != 0; });
    }
  return e;
}

ffi::Error NaForward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                     ffi::AnyBuffer rpb, ffi::Result<ffi::AnyBuffer> out,
                     ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> seen,
                     I64s lengths, I64s dilation, I64s rpb_dims,
                     I64s win_start, I64s win_count, I64s rpb_start, I64s tiles, I64s tile_start,
                     I64s tile_count, int64_t has_rpb, double scale) {
  const ffi::DataType dt = q.element_type();
  if (!supported(dt)) return ffi::Error::InvalidArgument("natjax_na_fwd: unsupported dtype");
  if (k.element_type() != dt || v.element_type() != dt || out->element_type() != dt)
    return ffi::Error::InvalidArgument("natjax_na_fwd: q, k, v and out must share one dtype");
  if (rpb.element_type() != accum_type(dt) || lse->element_type() != accum_type(dt))
    return ffi::Error::InvalidArgument(
        "natjax_na_fwd: rpb and lse must be float32 (float64 for float64 inputs)");
  if (seen->element_type() != ffi::DataType::S32)
    return ffi::Error::InvalidArgument("natjax_na_fwd: seen must be int32");
  TableAttrs t{lengths, dilation, rpb_dims, win_start, win_count, rpb_start,
               {},      {},       tiles,    tile_start, tile_count};
  Geometry g;
  std::string e = make_geometry(q, k, v, rpb, t, has_rpb != 0, scale, false, g);
  if (e.empty()) e = check_dims("out", *out, {g.batch, g.tokens, g.heads, g.value_dim});
  if (e.empty()) e = check_dims("lse", *lse, {g.batch, g.tokens, g.heads});
  if (e.empty()) e = check_dims("seen", *seen, {g.batch, g.heads});
  if (!e.empty()) return ffi::Error::InvalidArgument("natjax_na_fwd: " + e);
  const Scheduler sched = make_scheduler(pool, g);
  switch (dt) {
    case ffi::DataType::F16: e = run_forward<f16_t>(g, sched, q, k, v, rpb, out, lse, seen); break;
    case ffi::DataType::BF16: e = run_forward<bf16_t>(g, sched, q, k, v, rpb, out, lse, seen); break;
    case ffi::DataType::F32: e = run_forward<float>(g, sched, q, k, v, rpb, out, lse, seen); break;
    default: e = run_forward<double>(g, sched, q, k, v, rpb, out, lse, seen); break;
  }
  if (!e.empty()) return ffi::Error::Internal("natjax_na_fwd: " + e);
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------
// Backward.
// ------------------------------------------------------------------------------------------

constexpr int64_t kFusedMinSlices = 16;

// Tiles per dq unit: bounds the d_rpb partial buffers (B * H * units * R values) to ~16 MiB.
int64_t tiles_per_dq_unit(const Geometry& g) {
  if (!g.has_rpb) return 1;
  constexpr int64_t kMaxPartial = int64_t{1} << 22;
  const int64_t per_tile = g.batch * g.heads * g.rpb_volume;
  const int64_t max_units = std::max<int64_t>(1, kMaxPartial / std::max<int64_t>(1, per_tile));
  return (g.num_tiles() + max_units - 1) / max_units;
}

template <typename T>
std::string run_backward(const Geometry& g, const Scheduler& sched, ffi::AnyBuffer& q,
                         ffi::AnyBuffer& k, ffi::AnyBuffer& v, ffi::AnyBuffer& rpb,
                         ffi::AnyBuffer& out, ffi::AnyBuffer& d_out, ffi::AnyBuffer& lse,
                         ffi::AnyBuffer& d_lse, ffi::Result<ffi::AnyBuffer>& dq,
                         ffi::Result<ffi::AnyBuffer>& dk, ffi::Result<ffi::AnyBuffer>& dv,
                         ffi::Result<ffi::AnyBuffer>& drpb) {
  using A = typename AccumOf<T>::type;
  // One pass (ds once per pair, dk/dv scattered into the unit's own accumulators) when units of
  // a whole (batch, kv head) slice still give enough parallelism; else dq and dk/dv passes over
  // tiles. The choice depends on shapes only, so results are the same on every machine.
  const bool fused = g.num_tiles() == 1 || g.batch * g.kv_heads >= kFusedMinSlices;
  const int64_t tpu = fused ? g.num_tiles() : tiles_per_dq_unit(g);
  const int64_t per_bg = (g.num_tiles() + tpu - 1) / tpu;
  const int64_t dq_units = g.batch * g.kv_heads * per_bg;
  std::vector<A> delta(static_cast<size_t>(g.batch * g.tokens * g.heads));
  std::vector<A> partial(g.has_rpb ? static_cast<size_t>(dq_units * g.group_size() * g.rpb_volume)
                                   : 0);
  BwdArgs<T, A> args{data<const T>(q),     data<const T>(k),   data<const T>(v),
                     data<const A>(rpb),   data<const T>(out), data<const T>(d_out),
                     data<const A>(lse),   data<const A>(d_lse), data<T>(dq),
                     data<T>(dk),          data<T>(dv),        delta.data(),
                     partial.data(),       tpu};
  std::string e;
  if (fused) {
#if NATJAX_AVX2
    if constexpr (std::is_same_v<A, float>)  // tiles sharing one window: shared_bwd.h
      e = parallel_for(sched, dq_units,
                       [&](int64_t u) { bwd_fused_unit<T, A>(g, args, u, SharedBwdTile{}); });
    else
#endif
      e = parallel_for(sched, dq_units, [&](int64_t u) { bwd_fused_unit<T, A>(g, args, u); });
  } else {
    e = parallel_for(sched, dq_units, [&](int64_t u) { dq_unit<T, A>(g, args, u); });
    if (!e.empty()) return e;
    const int64_t kv_units = g.batch * g.kv_heads * g.num_tiles();
    e = parallel_for(sched, kv_units, [&](int64_t u) { dkv_unit<T, A>(g, args, u); });
  }
  if (!e.empty()) return e;
  // d_rpb[b, h] = sum of the (b, h) partials in unit order (fixed: deterministic).
  A* dr = data<A>(drpb);
  const int64_t group = g.group_size(), rv = g.rpb_volume;
  if (!g.has_rpb) {
    std::fill(dr, dr + g.batch * g.heads, A(0));
    return {};
  }
  for (int64_t b = 0; b < g.batch; ++b)
    for (int64_t h = 0; h < g.heads; ++h) {
      A* dst = dr + (b * g.heads + h) * rv;
      std::fill(dst, dst + rv, A(0));
      const int64_t kvh = h / group, hh = h % group;
      for (int64_t c = 0; c < per_bg; ++c) {
        const A* src = partial.data() + (((b * g.kv_heads + kvh) * per_bg + c) * group + hh) * rv;
        for (int64_t r = 0; r < rv; ++r) dst[r] += src[r];
      }
    }
  return {};
}

ffi::Error NaBackward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                      ffi::AnyBuffer rpb, ffi::AnyBuffer out, ffi::AnyBuffer d_out,
                      ffi::AnyBuffer lse, ffi::AnyBuffer d_lse, ffi::Result<ffi::AnyBuffer> dq,
                      ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                      ffi::Result<ffi::AnyBuffer> drpb, I64s lengths, I64s dilation,
                      I64s rpb_dims, I64s win_start, I64s win_count, I64s rpb_start,
                      I64s inv_start, I64s inv_count, I64s tiles, I64s tile_start,
                      I64s tile_count, int64_t has_rpb, double scale) {
  const ffi::DataType dt = q.element_type();
  if (!supported(dt)) return ffi::Error::InvalidArgument("natjax_na_bwd: unsupported dtype");
  for (ffi::DataType t : {k.element_type(), v.element_type(), out.element_type(),
                          d_out.element_type(), dq->element_type(), dk->element_type(),
                          dv->element_type()})
    if (t != dt)
      return ffi::Error::InvalidArgument(
          "natjax_na_bwd: q, k, v, out, d_out, dq, dk and dv must share one dtype");
  const ffi::DataType at = accum_type(dt);
  for (ffi::DataType t :
       {rpb.element_type(), lse.element_type(), d_lse.element_type(), drpb->element_type()})
    if (t != at)
      return ffi::Error::InvalidArgument(
          "natjax_na_bwd: rpb, lse, d_lse and drpb must be float32 (float64 for float64)");
  TableAttrs t{lengths,   dilation,  rpb_dims, win_start,  win_count, rpb_start,
               inv_start, inv_count, tiles,    tile_start, tile_count};
  Geometry g;
  std::string e = make_geometry(q, k, v, rpb, t, has_rpb != 0, scale, true, g);
  const std::vector<int64_t> xq{g.batch, g.tokens, g.heads, g.head_dim};
  const std::vector<int64_t> xo{g.batch, g.tokens, g.heads, g.value_dim};
  const std::vector<int64_t> rows{g.batch, g.tokens, g.heads};
  if (e.empty()) e = check_dims("out", out, xo);
  if (e.empty()) e = check_dims("d_out", d_out, xo);
  if (e.empty()) e = check_dims("lse", lse, rows);
  if (e.empty()) e = check_dims("d_lse", d_lse, rows);
  if (e.empty()) e = check_dims("dq", *dq, xq);
  if (e.empty()) e = check_dims("dk", *dk, {g.batch, g.tokens, g.kv_heads, g.head_dim});
  if (e.empty()) e = check_dims("dv", *dv, {g.batch, g.tokens, g.kv_heads, g.value_dim});
  if (e.empty()) e = check_dims("drpb", *drpb, {g.batch, g.heads, g.rpb_volume, 1});
  if (!e.empty()) return ffi::Error::InvalidArgument("natjax_na_bwd: " + e);
  const Scheduler sched = make_scheduler(pool, g);
#define NATJAX_BWD(T) \
  run_backward<T>(g, sched, q, k, v, rpb, out, d_out, lse, d_lse, dq, dk, dv, drpb)
  switch (dt) {
    case ffi::DataType::F16: e = NATJAX_BWD(f16_t); break;
    case ffi::DataType::BF16: e = NATJAX_BWD(bf16_t); break;
    case ffi::DataType::F32: e = NATJAX_BWD(float); break;
    default: e = NATJAX_BWD(double); break;
  }
#undef NATJAX_BWD
  if (!e.empty()) return ffi::Error::Internal("natjax_na_bwd: " + e);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace natjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(NatjaxNaFwdCpu, natjax::NaForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // rpb
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Ret<ffi::AnyBuffer>()  // seen
                                  .Attr<natjax::I64s>("lengths")
                                  .Attr<natjax::I64s>("dilation")
                                  .Attr<natjax::I64s>("rpb_dims")
                                  .Attr<natjax::I64s>("win_start")
                                  .Attr<natjax::I64s>("win_count")
                                  .Attr<natjax::I64s>("rpb_start")
                                  .Attr<natjax::I64s>("tiles")
                                  .Attr<natjax::I64s>("tile_start")
                                  .Attr<natjax::I64s>("tile_count")
                                  .Attr<int64_t>("has_rpb")
                                  .Attr<double>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(NatjaxNaBwdCpu, natjax::NaBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // rpb
                                  .Arg<ffi::AnyBuffer>()  // out
                                  .Arg<ffi::AnyBuffer>()  // d_out
                                  .Arg<ffi::AnyBuffer>()  // lse
                                  .Arg<ffi::AnyBuffer>()  // d_lse
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Ret<ffi::AnyBuffer>()  // drpb
                                  .Attr<natjax::I64s>("lengths")
                                  .Attr<natjax::I64s>("dilation")
                                  .Attr<natjax::I64s>("rpb_dims")
                                  .Attr<natjax::I64s>("win_start")
                                  .Attr<natjax::I64s>("win_count")
                                  .Attr<natjax::I64s>("rpb_start")
                                  .Attr<natjax::I64s>("inv_start")
                                  .Attr<natjax::I64s>("inv_count")
                                  .Attr<natjax::I64s>("tiles")
                                  .Attr<natjax::I64s>("tile_start")
                                  .Attr<natjax::I64s>("tile_count")
                                  .Attr<int64_t>("has_rpb")
                                  .Attr<double>("scale"));
