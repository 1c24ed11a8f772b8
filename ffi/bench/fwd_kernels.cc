// Single-thread timing of the CPU forward kernels on NATTEN <= 0.17 windows, every kernel in one
// process on the same inputs (no XLA, no threads): isolates the kernels from the op's wrapper.
//
//   g++ -O3 -march=native -std=c++17 -I ffi/csrc ffi/bench/fwd_kernels.cc -o /tmp/fwd_kernels
//   /tmp/fwd_kernels [B H L0 L1 L2 D K dilation repeats [kernel]]   (default: NAT-Tiny stage 1, batch 8)
//
// Prints the median time per call of each kernel over all work units, its GFLOP/s (useful
// arithmetic: 4 * queries * window * head_dim) and the max |difference| to the per-query kernel
// over out and lse.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cpu/strip_fwd.h"

using namespace natjax;

struct AxisData {
  std::vector<int64_t> ws, wc, rs, ts, tc;
};

// NATTEN's shifted window along one axis (non-causal), one tile per dilation group.
static void make_axis(int64_t L, int64_t K, int64_t d, bool rpb, AxisData& a, AxisTables& t) {
  K = std::min(K, L);
  a.ws.resize(L), a.wc.resize(L), a.rs.resize(L);
  for (int64_t i = 0; i < L; ++i) {
    const int64_t r = i % d, n = (L - r + d - 1) / d, ig = i / d;  // group coordinates
    const int64_t kk = std::min(K, n);
    const int64_t s = std::clamp(ig - kk / 2, int64_t{0}, n - kk);
    a.ws[i] = s * d + r;
    a.wc[i] = kk;
    a.rs[i] = s - ig + (K - 1);
  }
  for (int64_t r = 0; r < std::min(d, L); ++r) {
    a.ts.push_back(r);
    a.tc.push_back((L - r + d - 1) / d);
  }
  t.length = L;
  t.dilation = d;
  t.rpb_dim = rpb ? 2 * K - 1 : 1;
  t.win_start = a.ws.data();
  t.win_count = a.wc.data();
  t.rpb_start = a.rs.data();
  t.num_tiles = static_cast<int64_t>(a.ts.size());
  t.tile_start = a.ts.data();
  t.tile_count = a.tc.data();
  ComputeMaxima(t, false);
}

template <typename F>
static double time_ms(F&& f, int repeats) {
  std::vector<double> ts;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    ts.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                     .count());
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

int main(int argc, char** argv) {
  int64_t p[9] = {8, 2, 1, 56, 56, 32, 7, 1, 7};
  for (int i = 1; i < argc && i < 10; ++i) p[i - 1] = std::atoll(argv[i]);
  const int64_t B = p[0], H = p[1], D = p[5], K = p[6], dil = p[7];
  const int repeats = static_cast<int>(p[8]);
  const int64_t Ls[3] = {p[2], p[3], p[4]};
  Geometry g;
  AxisData ad[3];
  for (int a = 0; a < 3; ++a) make_axis(Ls[a], Ls[a] > 1 ? K : 1, Ls[a] > 1 ? dil : 1, true, ad[a], g.axis[a]);
  g.batch = B, g.heads = H, g.kv_heads = H, g.head_dim = D, g.value_dim = D;
  g.tokens = Ls[0] * Ls[1] * Ls[2];
  g.rpb_volume = g.axis[0].rpb_dim * g.axis[1].rpb_dim * g.axis[2].rpb_dim;
  g.has_rpb = true;
  g.scale = 1.0 / std::sqrt(double(D));
  const int64_t n = B * g.tokens * H * D;
  std::mt19937 rng(0);
  std::normal_distribution<float> nd;
  std::vector<float> q(n), k(n), v(n), rpb(H * g.rpb_volume), out(n), lse(B * g.tokens * H);
  for (auto* x : {&q, &k, &v, &rpb})
    for (float& e : *x) e = nd(rng);
  FwdArgs<float, float> args{q.data(), k.data(), v.data(), rpb.data(), out.data(), lse.data()};
  const int64_t units = B * H * g.num_tiles();
  int64_t win = 1;
  for (int a = 0; a < 3; ++a) win *= g.axis[a].max_window;
  const double flop = 4.0 * B * g.tokens * H * win * D;
  std::vector<float> ref, ref_lse;
  const char* only = argc > 10 ? argv[10] : nullptr;  // run one kernel (for perf stat)
  auto run = [&](const char* name, auto&& unit_fn) {
    if (only && std::string(only) != name) return;
    const double ms = time_ms([&] { for (int64_t u = 0; u < units; ++u) unit_fn(decode_unit(g, u)); }, repeats);
    double err = 0;
    if (ref.empty()) ref = out, ref_lse = lse;
    for (int64_t i = 0; i < n; ++i) err = std::max(err, double(std::fabs(out[i] - ref[i])));
    for (size_t i = 0; i < lse.size(); ++i)
      err = std::max(err, double(std::fabs(lse[i] - ref_lse[i])));
    std::printf("%-10s %8.2f ms  %6.1f GFLOP/s  max|diff| %.2e\n", name, ms, flop / ms * 1e-6, err);
    std::fill(out.begin(), out.end(), 0.f);
    std::fill(lse.begin(), lse.end(), 0.f);
  };
  std::printf("B=%lld H=%lld L=%lldx%lldx%lld D=%lld K=%lld dilation=%lld: %lld units, 1 thread\n",
              (long long)B, (long long)H, (long long)Ls[0], (long long)Ls[1], (long long)Ls[2],
              (long long)D, (long long)K, (long long)dil, (long long)units);
  run("per-query", [&](const Unit& u) { forward_unit<float, float>(g, args, u); });
  run("blocked", [&](const Unit& u) { forward_unit_blocked<float>(g, args, u); });
  run("strips", [&](const Unit& u) { forward_unit_strips<float>(g, args, u); });
  // Whole-group windows (NAT's last stage, DiNAT at 7 x dilation): the dense micro-kernels.
  bool shared = true;
  for (int64_t u = 0; u < units; ++u) {  // forward_unit_avx2's condition for this kernel
    const Unit un = decode_unit(g, u);
    const int64_t nk = box_volume(un.kh);
    shared = shared && nk <= kSharedMaxKeys &&
             nk * g.head_dim * int64_t{sizeof(float)} <= kBlockHaloBytes &&
             tile_shares_window(g, un);
  }
  if (shared) run("shared", [&](const Unit& u) { forward_unit_shared<float>(g, args, u, StripPackKeys{}); });
  return 0;
}
