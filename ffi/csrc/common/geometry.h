// Table-driven geometry of one neighborhood-attention call, shared by every native handler.
//
// The window rules (NATTEN <= 0.17 shifted windows, dilation groups, causal axes, and whatever
// natjax/ops/na/spec.py gains later) live in Python only. Python evaluates them into per-axis,
// per-position tables, and the kernels here just read the tables, so a new window rule needs no
// C++ change. Every call is padded to three spatial axes (missing leading axes have length 1).
//
// Per axis a (length L, dilation d), for query position i and key position j (flat along a):
//   win_start[i], win_count[i]: query i attends keys win_start[i] + d*t, t < win_count[i];
//   rpb_start[i]: bias index (along a) of the first of those keys; it grows by 1 per key;
//   inv_start[j], inv_count[j]: key j is attended by queries inv_start[j] + d*t (the "inverse
//     neighborhood", used by the dk/dv pass); count 0 when no query sees key j;
//   tiles: the work decomposition, boxes of queries (and keys) that share one dilation residue:
//     tile_start[t] + d*u, u < tile_count[t].
// A query's neighborhood is the box (product over axes) of its per-axis key sets.
//
// This header is plain C++17 (no XLA, no SIMD) so that a CUDA handler can reuse it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace natjax {

constexpr int kAxes = 3;

struct AxisTables {
  int64_t length = 1;
  int64_t dilation = 1;
  int64_t rpb_dim = 1;  // 2*K-1 along this axis (1 without a bias)
  const int64_t* win_start = nullptr;
  const int64_t* win_count = nullptr;
  const int64_t* rpb_start = nullptr;
  const int64_t* inv_start = nullptr;  // may be null (forward only)
  const int64_t* inv_count = nullptr;
  int64_t num_tiles = 1;
  const int64_t* tile_start = nullptr;
  const int64_t* tile_count = nullptr;
  int64_t max_window = 1;   // max win_count
  int64_t max_inverse = 0;  // max inv_count
  int64_t max_tile = 1;     // max tile_count
};

// Extent of a box along one axis: positions start + d*u, u < count.
struct Range {
  int64_t start = 0;
  int64_t count = 0;
};

struct Geometry {
  AxisTables axis[kAxes];
  int64_t batch = 0, heads = 0, kv_heads = 0, head_dim = 0, value_dim = 0;
  int64_t tokens = 0;      // prod of lengths
  int64_t rpb_volume = 1;  // prod of rpb_dim
  bool has_rpb = false;
  double scale = 1.0;

  int64_t num_tiles() const {
    return axis[0].num_tiles * axis[1].num_tiles * axis[2].num_tiles;
  }
  int64_t group_size() const { return heads / kv_heads; }

  // Tile index -> per-axis query (or key) ranges.
  void tile_ranges(int64_t tile, Range out[kAxes]) const {
    int64_t rem = tile;
    for (int a = kAxes - 1; a >= 0; --a) {
      const int64_t t = rem % axis[a].num_tiles;
      rem /= axis[a].num_tiles;
      out[a] = Range{axis[a].tile_start[t], axis[a].tile_count[t]};
    }
  }

  // Keys seen by the queries of `q` along axis a: a range with step d (empty if none).
  Range key_halo(int a, const Range& q) const {
    const AxisTables& ax = axis[a];
    int64_t lo = INT64_MAX, hi = INT64_MIN;
    for (int64_t u = 0; u < q.count; ++u) {
      const int64_t i = q.start + ax.dilation * u;
      lo = std::min(lo, ax.win_start[i]);
      hi = std::max(hi, ax.win_start[i] + ax.dilation * (ax.win_count[i] - 1));
    }
    if (lo > hi) return Range{0, 0};
    return Range{lo, (hi - lo) / ax.dilation + 1};
  }

  // Queries that see the keys of `k` along axis a (the union of their inverse neighborhoods).
  Range query_halo(int a, const Range& k) const {
    const AxisTables& ax = axis[a];
    int64_t lo = INT64_MAX, hi = INT64_MIN;
    for (int64_t u = 0; u < k.count; ++u) {
      const int64_t j = k.start + ax.dilation * u;
      if (ax.inv_count[j] == 0) continue;
      lo = std::min(lo, ax.inv_start[j]);
      hi = std::max(hi, ax.inv_start[j] + ax.dilation * (ax.inv_count[j] - 1));
    }
    if (lo > hi) return Range{0, 0};
    return Range{lo, (hi - lo) / ax.dilation + 1};
  }

  int64_t flat(int64_t p0, int64_t p1, int64_t p2) const {
    return (p0 * axis[1].length + p1) * axis[2].length + p2;
  }
};

// Validates the tables: every index a kernel derives from them stays inside its buffer.
// Returns an empty string when valid, else a message naming the offending table.
inline std::string ValidateAxis(int a, const AxisTables& ax, bool need_inverse, bool has_rpb) {
  const std::string where = "axis " + std::to_string(a) + ": ";
  const int64_t L = ax.length, d = ax.dilation;
  if (L < 1 || d < 1) return where + "length and dilation must be >= 1";
  if (ax.rpb_dim < 1) return where + "rpb_dims must be >= 1";
  for (int64_t i = 0; i < L; ++i) {
    const int64_t s = ax.win_start[i], c = ax.win_count[i];
    if (c < 1 || s < 0 || s + d * (c - 1) >= L)
      return where + "win_start/win_count out of range at position " + std::to_string(i);
    if ((s - i) % d != 0)
      return where + "window of position " + std::to_string(i) + " leaves its dilation group";
    if (has_rpb && (ax.rpb_start[i] < 0 || ax.rpb_start[i] + c > ax.rpb_dim))
      return where + "rpb_start out of range at position " + std::to_string(i);
  }
  if (need_inverse) {
    for (int64_t j = 0; j < L; ++j) {
      const int64_t s = ax.inv_start[j], c = ax.inv_count[j];
      if (c < 0 || (c > 0 && (s < 0 || s + d * (c - 1) >= L || (s - j) % d != 0)))
        return where + "inv_start/inv_count out of range at position " + std::to_string(j);
      // The dk/dv pass derives the key's offset in each query window from the forward
      // tables: every listed query must really contain key j.
      for (int64_t t = 0; t < c; ++t) {
        const int64_t i = s + d * t;
        const int64_t off = j - ax.win_start[i];
        if (off < 0 || off % d != 0 || off / d >= ax.win_count[i])
          return where + "inverse table lists a query whose window misses key " +
                 std::to_string(j);
      }
    }
  }
  if (ax.num_tiles < 1) return where + "no tiles";
  std::vector<char> seen(static_cast<size_t>(L), 0);
  for (int64_t t = 0; t < ax.num_tiles; ++t) {
    const int64_t s = ax.tile_start[t], c = ax.tile_count[t];
    if (c < 1 || s < 0 || s + d * (c - 1) >= L)
      return where + "tile " + std::to_string(t) + " out of range";
    for (int64_t u = 0; u < c; ++u) {
      char& flag = seen[static_cast<size_t>(s + d * u)];
      if (flag) return where + "tiles overlap";
      flag = 1;
    }
  }
  for (int64_t i = 0; i < L; ++i)
    if (!seen[static_cast<size_t>(i)]) return where + "tiles do not cover the axis";
  return {};
}

inline void ComputeMaxima(AxisTables& ax, bool need_inverse) {
  ax.max_window = 1;
  ax.max_inverse = 0;
  ax.max_tile = 1;
  for (int64_t i = 0; i < ax.length; ++i) ax.max_window = std::max(ax.max_window, ax.win_count[i]);
  if (need_inverse)
    for (int64_t i = 0; i < ax.length; ++i)
      ax.max_inverse = std::max(ax.max_inverse, ax.inv_count[i]);
  for (int64_t t = 0; t < ax.num_tiles; ++t) ax.max_tile = std::max(ax.max_tile, ax.tile_count[t]);
}

}  // namespace natjax
