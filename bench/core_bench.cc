// Micro benchmarks of the shard's timer wheel and inbox.
#include <benchmark/benchmark.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "src/core/inbox.hh"
#include "src/core/timer_wheel.hh"

using tern::core::inbox;
using tern::core::timer;
using tern::core::timer_wheel;

namespace {
// Deadlines like a shard's: mostly idle timeouts seconds to minutes ahead, some sub-second.
std::vector<uint64_t> deadlines(size_t n, uint64_t now) {
  std::mt19937_64 rng(1);
  std::vector<uint64_t> d(n);
  for (auto& x : d) x = now + 1 + (rng() % 4 == 0 ? rng() % 1000 : rng() % 300000);
  return d;
}
}  // namespace

// Arm then cancel range(0) timers (a session that finishes before its timeout).
static void BM_TimerArmCancel(benchmark::State& st) {
  size_t n = static_cast<size_t>(st.range(0));
  timer_wheel w(1000);
  auto ts = std::make_unique<timer[]>(n);
  auto d = deadlines(n, 1000);
  for (auto _ : st) {
    for (size_t i = 0; i < n; ++i) w.arm(ts[i], d[i]);
    for (size_t i = 0; i < n; ++i) w.cancel(ts[i]);
  }
  st.SetItemsProcessed(int64_t(st.iterations()) * int64_t(n));
}
BENCHMARK(BM_TimerArmCancel)->Arg(1000)->Arg(100000);

// Re-arm range(0) armed timers to a later deadline (an idle timeout pushed by each command).
static void BM_TimerRearm(benchmark::State& st) {
  size_t n = static_cast<size_t>(st.range(0));
  timer_wheel w(1000);
  auto ts = std::make_unique<timer[]>(n);
  auto d = deadlines(n, 1000);
  for (size_t i = 0; i < n; ++i) w.arm(ts[i], d[i]);
  uint64_t bump = 0;
  for (auto _ : st) {
    ++bump;
    for (size_t i = 0; i < n; ++i) w.arm(ts[i], d[i] + bump);
  }
  st.SetItemsProcessed(int64_t(st.iterations()) * int64_t(n));
}
BENCHMARK(BM_TimerRearm)->Arg(100000);

// Arm range(0) timers, then advance the clock in 1 ms steps (range(1) == 1) or in 10 s
// jumps until all have fired: cascades included.
static void BM_TimerArmFire(benchmark::State& st) {
  size_t n = static_cast<size_t>(st.range(0));
  uint64_t step = st.range(1) ? 1 : 10000;
  auto ts = std::make_unique<timer[]>(n);
  uint64_t now = 1000;
  timer_wheel w(now);
  size_t fired = 0;
  auto d = deadlines(n, 0);
  for (auto _ : st) {
    uint64_t base = w.now();
    for (size_t i = 0; i < n; ++i) w.arm(ts[i], base + d[i]);
    while (!w.empty()) {
      now += step;
      fired += w.advance(now, [](timer& t) { benchmark::DoNotOptimize(t.data); });
    }
  }
  st.SetItemsProcessed(int64_t(fired));
}
BENCHMARK(BM_TimerArmFire)->Args({100000, 0})->Args({100000, 1})->Unit(benchmark::kMillisecond);

// next_deadline() with a full wheel: the loop calls it once per iteration.
static void BM_TimerNextDeadline(benchmark::State& st) {
  size_t n = 100000;
  timer_wheel w(1000);
  auto ts = std::make_unique<timer[]>(n);
  auto d = deadlines(n, 1000);
  for (size_t i = 0; i < n; ++i) w.arm(ts[i], d[i] + 2000);
  for (auto _ : st) benchmark::DoNotOptimize(w.next_deadline());
}
BENCHMARK(BM_TimerNextDeadline);

struct command {
  uint64_t a = 0, b = 0;
};

// Post and drain on one thread: the cost of the ring without contention, one eventfd
// write per batch of range(0) posts.
static void BM_InboxPostDrain(benchmark::State& st) {
  auto q = std::make_unique<inbox<command, 1024>>();
  size_t batch = static_cast<size_t>(st.range(0));
  uint64_t sum = 0;
  for (auto _ : st) {
    for (size_t i = 0; i < batch; ++i) q->try_post(command{i, i});
    q->clear_fd();
    q->drain([&](command&& c) { sum += c.a; });
  }
  benchmark::DoNotOptimize(sum);
  st.SetItemsProcessed(int64_t(st.iterations()) * int64_t(batch));
}
BENCHMARK(BM_InboxPostDrain)->Arg(1)->Arg(64);

// One producer thread posting as fast as the ring takes it while the benchmark thread
// drains without sleeping: contended throughput.
static void BM_InboxCrossThread(benchmark::State& st) {
  auto q = std::make_unique<inbox<command, 1024>>();
  std::atomic<bool> stop{false};
  std::thread producer([&] {
    uint64_t i = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      if (q->try_post(command{i, 0}))
        ++i;
      else
        std::this_thread::yield();
    }
  });
  size_t got = 0;
  for (auto _ : st) {
    q->clear_fd();
    got += q->drain([](command&& c) { benchmark::DoNotOptimize(c.a); });
  }
  stop = true;
  producer.join();
  st.SetItemsProcessed(int64_t(got));
}
BENCHMARK(BM_InboxCrossThread)->UseRealTime();

BENCHMARK_MAIN();
