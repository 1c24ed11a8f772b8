// How long a blocked thread takes to start running after it is notified, while the notifying
// thread keeps its core busy (what parallel_for's helper sees when the pool's other thread is
// asleep on an idle core). On this project's 2-core VM the median was ~3.8 ms (the idle vCPU
// runs again at the host's next tick), so a multi-threaded op of a few ms that starts after an
// idle gap runs mostly on its calling thread: the bimodal timings of sub-millisecond cases.
//
//   g++ -O2 -std=c++17 -pthread ffi/bench/wake_latency.cc -o /tmp/wake_latency && /tmp/wake_latency
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <thread>
#include <vector>

int main() {
  using clock = std::chrono::steady_clock;
  constexpr int kRounds = 41;
  std::vector<double> us;
  for (int r = 0; r < kRounds; ++r) {
    std::mutex mu;
    std::condition_variable cv;
    bool go = false;
    std::atomic<bool> woke{false};
    clock::time_point sent, started;
    std::thread waiter([&] {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return go; });
      started = clock::now();
      woke = true;
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // both cores go idle
    {
      std::lock_guard<std::mutex> lock(mu);
      go = true;
      sent = clock::now();
    }
    cv.notify_one();
    while (!woke.load()) {  // keep this core busy, like a caller working through its items
    }
    waiter.join();
    us.push_back(std::chrono::duration<double, std::micro>(started - sent).count());
  }
  std::sort(us.begin(), us.end());
  std::printf("wake-up latency over %d rounds: min %.0f us, median %.0f us, max %.0f us\n",
              kRounds, us.front(), us[kRounds / 2], us.back());
  return 0;
}
