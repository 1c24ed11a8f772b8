// parallel_for over XLA's intra-op thread pool (the FFI `ThreadPool` context).
//
// The FFI contract allows tasks to run late, inline, or on a pool of size 1, and the calling
// thread may itself be a pool thread. So the caller never waits for a helper to *start*: work
// items are claimed from a shared atomic counter by the caller and by any helper that happens to
// run, and the caller waits only for items already claimed to *finish*. Helpers that start after
// the loop is over find no work and only touch the shared, reference-counted state.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

namespace natjax {

// Abstract scheduler, so the kernels do not depend on XLA's headers.
struct Scheduler {
  int64_t num_threads = 1;
  std::function<void(std::function<void()>)> schedule;  // may run the task inline
};

// Runs fn(i) for i in [0, n); returns an error message if a work item threw, else "".
template <typename F>
std::string parallel_for(const Scheduler& sched, int64_t n, F&& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t n = 0;
    std::function<void(int64_t)> body;
    std::mutex mu;
    std::condition_variable cv;
    std::string error;
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->body = [&fn](int64_t i) { fn(i); };
  auto work = [](State& s) {
    int64_t finished = 0;
    for (int64_t i; (i = s.next.fetch_add(1)) < s.n; ++finished) {
      try {
        s.body(i);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(s.mu);
        s.error = e.what();
      } catch (...) {
        std::lock_guard<std::mutex> lock(s.mu);
        s.error = "unknown exception";
      }
    }
    if (finished && s.done.fetch_add(finished) + finished == s.n) {
      std::lock_guard<std::mutex> lock(s.mu);
      s.cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(sched.num_threads, n) - 1;
  for (int64_t h = 0; h < helpers && sched.schedule; ++h)
    sched.schedule([state, work] { work(*state); });
  work(*state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == state->n; });
  return state->error;
}

}  // namespace natjax
