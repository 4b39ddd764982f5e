#include "src/core/timer_wheel.hh"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <new>
#include <random>
#include <set>
#include <utility>
#include <vector>

using tern::core::timer;
using tern::core::timer_wheel;

// Count heap allocations, to show that arming, moving, cancelling and firing never allocate.
#include "tests/unit/common/alloc_counter.hh"

namespace {

struct fired_at {
  uint64_t id, deadline, now;
};

// Advance and record (timer data, its deadline, the wheel's time when it fired).
std::vector<fired_at> run(timer_wheel& w, uint64_t to) {
  std::vector<fired_at> out;
  w.advance(to, [&](timer& t) { out.push_back({t.data, t.deadline(), w.now()}); });
  return out;
}

}  // namespace

TEST(TimerWheel, EmptyWheel) {
  timer_wheel w(1000);
  EXPECT_EQ(w.size(), 0u);
  EXPECT_EQ(w.next_deadline(), timer_wheel::never);
  EXPECT_EQ(w.advance(5000, [](timer&) { FAIL(); }), 0u);
  EXPECT_EQ(w.now(), 5000u);
  // Time does not go back.
  EXPECT_EQ(w.advance(10, [](timer&) { FAIL(); }), 0u);
  EXPECT_EQ(w.now(), 5000u);
}

TEST(TimerWheel, FiresAtDeadlineNotBefore) {
  timer_wheel w(0);
  timer t;
  t.data = 7;
  w.arm(t, 10);
  EXPECT_TRUE(t.armed());
  EXPECT_EQ(w.size(), 1u);
  EXPECT_EQ(w.next_deadline(), 10u);
  EXPECT_TRUE(run(w, 9).empty());
  auto f = run(w, 10);
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].id, 7u);
  EXPECT_EQ(f[0].now, 10u);
  EXPECT_FALSE(t.armed());
  EXPECT_EQ(w.size(), 0u);
  EXPECT_TRUE(run(w, 100).empty());
}

TEST(TimerWheel, CancelAndRearmMove) {
  timer_wheel w(0);
  timer a, b;
  w.arm(a, 100);
  w.arm(b, 200);
  w.cancel(a);
  w.cancel(a);  // no-op
  EXPECT_FALSE(a.armed());
  EXPECT_EQ(w.size(), 1u);
  w.arm(b, 50);  // re-arm moves it earlier...
  EXPECT_EQ(w.size(), 1u);
  EXPECT_EQ(w.next_deadline(), 50u);
  EXPECT_EQ(run(w, 50).size(), 1u);
  w.arm(b, 70000);  // ... or later, across levels
  w.arm(b, 300);
  EXPECT_EQ(w.size(), 1u);
  EXPECT_TRUE(run(w, 299).empty());
  EXPECT_EQ(run(w, 300).size(), 1u);
  EXPECT_EQ(w.size(), 0u);
}

TEST(TimerWheel, ArmedInThePastFiresOnNextAdvance) {
  timer_wheel w(1000);
  timer a, b, c;
  a.data = 1;
  b.data = 2;
  c.data = 3;
  w.arm(a, 5);
  w.arm(b, 1000);  // == now(): due
  w.arm(c, 1001);
  EXPECT_EQ(w.next_deadline(), 1000u);
  // Even an advance to the same time fires them, in arm order, before later deadlines.
  auto f = run(w, 1000);
  ASSERT_EQ(f.size(), 2u);
  EXPECT_EQ(f[0].id, 1u);
  EXPECT_EQ(f[1].id, 2u);
  f = run(w, 1001);
  ASSERT_EQ(f.size(), 1u);
  EXPECT_EQ(f[0].id, 3u);
}

// Deadlines on both sides of every level boundary, armed from a time that is not aligned,
// fire exactly at their deadline, whether the clock moves one ms at a time or jumps.
TEST(TimerWheel, CascadeBoundaries) {
  const uint64_t start = 0x12345678ull;  // inside a level-3 slot, not aligned
  std::vector<uint64_t> deadlines;
  for (unsigned shift : {8u, 16u, 24u, 32u}) {
    uint64_t block = uint64_t(1) << shift;
    uint64_t edge = (start / block + 1) * block;  // next boundary of that level
    for (int64_t delta : {-2, -1, 0, 1, 2, 255, 256, 257}) deadlines.push_back(edge + delta);
  }
  deadlines.push_back(start + 1);
  deadlines.push_back(start + timer_wheel::horizon_ms - 1);
  deadlines.push_back(start + timer_wheel::horizon_ms);
  deadlines.push_back(start + 3 * timer_wheel::horizon_ms + 17);
  std::sort(deadlines.begin(), deadlines.end());
  deadlines.erase(std::unique(deadlines.begin(), deadlines.end()), deadlines.end());

  for (bool stepwise_near : {false, true}) {
    timer_wheel w(start);
    std::vector<timer> ts(deadlines.size());
    for (size_t i = 0; i < ts.size(); ++i) {
      ts[i].data = deadlines[i];
      w.arm(ts[i], deadlines[i]);
    }
    std::vector<fired_at> all;
    uint64_t now = start;
    for (uint64_t d : deadlines) {
      // Near deadlines: walk the clock 1 ms at a time over the last few ms; far ones: jump.
      if (stepwise_near && d - now < 600) {
        while (now < d) {
          auto f = run(w, ++now);
          all.insert(all.end(), f.begin(), f.end());
        }
      } else {
        EXPECT_TRUE(run(w, d - 1).empty()) << "early before " << d;
        auto f = run(w, d);
        all.insert(all.end(), f.begin(), f.end());
        now = d;
      }
    }
    ASSERT_EQ(all.size(), deadlines.size());
    for (size_t i = 0; i < all.size(); ++i) {
      EXPECT_EQ(all[i].id, deadlines[i]);
      EXPECT_EQ(all[i].now, deadlines[i]) << "fired at the wrong time";
    }
    EXPECT_EQ(w.size(), 0u);
  }
}

TEST(TimerWheel, BigJumpFiresEverythingInDeadlineOrder) {
  timer_wheel w(0);
  std::vector<uint64_t> ds = {1, 255, 256, 65535, 65536, 1ull << 24, (1ull << 32) - 1, 1ull << 32,
                              (1ull << 40) + 5, 1ull << 50};
  std::vector<timer> ts(ds.size());
  for (size_t i = ts.size(); i-- > 0;) {  // armed in reverse order
    ts[i].data = ds[i];
    w.arm(ts[i], ds[i]);
  }
  auto f = run(w, 1ull << 51);
  ASSERT_EQ(f.size(), ds.size());
  for (size_t i = 0; i < ds.size(); ++i) {
    EXPECT_EQ(f[i].id, ds[i]);
    EXPECT_EQ(f[i].now, ds[i]);  // the wheel's time during the callback is the deadline
  }
  EXPECT_EQ(w.now(), 1ull << 51);
}

TEST(TimerWheel, FarDeadlineBeyondHorizon) {
  timer_wheel w(5);
  timer far, near;
  uint64_t d = 5 + 200 * timer_wheel::horizon_ms + 12345;
  w.arm(far, d);
  EXPECT_EQ(w.next_deadline(), d);
  // Jump to just before it in uneven steps, arming and firing near timers meanwhile.
  uint64_t now = 5;
  int near_fired = 0;
  while (now < d - 1) {
    now = std::min(d - 1, now + timer_wheel::horizon_ms / 3 + 77);
    w.arm(near, now + 1000);
    EXPECT_EQ(w.advance(now, [&](timer& t) { EXPECT_EQ(&t, &near); ++near_fired; }), 0u);
    EXPECT_TRUE(far.armed());
    w.cancel(near);
  }
  EXPECT_EQ(near_fired, 0);
  EXPECT_EQ(w.next_deadline(), d);
  EXPECT_EQ(run(w, d).size(), 1u);
  EXPECT_FALSE(far.armed());
}

TEST(TimerWheel, NeverIsAValidDeadline) {
  timer_wheel w(0);
  timer t;
  w.arm(t, timer_wheel::never);
  w.arm_after(t, timer_wheel::never);  // saturates
  EXPECT_EQ(t.deadline(), timer_wheel::never);
  EXPECT_TRUE(run(w, timer_wheel::never - 1).empty());
  EXPECT_EQ(run(w, timer_wheel::never).size(), 1u);
}

TEST(TimerWheel, CancelFromInsideFire) {
  timer_wheel w(0);
  timer a, b, c;
  w.arm(a, 10);
  w.arm(b, 10);  // same ms as a: whichever fires first cancels the other
  w.arm(c, 11);
  int fired = 0;
  w.advance(20, [&](timer& t) {
    ++fired;
    EXPECT_NE(&t, &c);
    w.cancel(&t == &a ? b : a);
    w.cancel(c);
    w.cancel(t);  // itself: already disarmed, a no-op
  });
  EXPECT_EQ(fired, 1);
  EXPECT_EQ(w.size(), 0u);
  EXPECT_FALSE(a.armed() || b.armed() || c.armed());
}

TEST(TimerWheel, RearmFromInsideFire) {
  timer_wheel w(0);
  timer t;
  std::vector<uint64_t> at;
  w.arm(t, 100);
  // A periodic timer re-arming itself every 300 ms (across level-0 and level-1 slots) fires
  // at each period within one big advance.
  w.advance(100000, [&](timer& x) {
    at.push_back(w.now());
    if (at.size() < 5) w.arm(x, w.now() + 300);
  });
  EXPECT_EQ(at, (std::vector<uint64_t>{100, 400, 700, 1000, 1300}));

  // Re-arming "now" from a callback is deferred to the next advance: no livelock.
  w.arm(t, 200000);
  size_t n = w.advance(300000, [&](timer& x) { w.arm(x, w.now()); });
  EXPECT_EQ(n, 1u);
  EXPECT_TRUE(t.armed());
  EXPECT_EQ(w.next_deadline(), 300000u);
  n = w.advance(300000, [&](timer&) {});
  EXPECT_EQ(n, 1u);

  // A callback moves another due timer later: it fires at its new deadline.
  timer a, b;
  a.data = 1;
  b.data = 2;
  w.arm(a, 300010);
  w.arm(b, 300010);
  std::vector<std::pair<uint64_t, uint64_t>> seen;
  w.advance(400000, [&](timer& x) {
    seen.emplace_back(x.data, w.now());
    if (seen.size() == 1) w.arm(x.data == 1 ? b : a, 300500);
  });
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_EQ(seen[0].second, 300010u);
  EXPECT_NE(seen[1].first, seen[0].first);
  EXPECT_EQ(seen[1].second, 300500u);
}

TEST(TimerWheel, ThrowingCallbackLeavesWheelConsistent) {
  timer_wheel w(0);
  timer a, b;
  w.arm(a, 5);
  w.arm(b, 5);
  EXPECT_THROW(w.advance(10, [](timer&) { throw 1; }), int);
  EXPECT_EQ(w.size(), 1u);
  EXPECT_EQ(w.next_deadline(), w.now());  // the other one is still due
  EXPECT_EQ(w.advance(10, [](timer&) {}), 1u);
  EXPECT_EQ(w.size(), 0u);
}

TEST(TimerWheel, DestructionEitherOrder) {
  {
    timer_wheel w(0);
    {
      timer t;
      w.arm(t, 10);
      EXPECT_EQ(w.size(), 1u);
    }  // an armed timer cancels itself
    EXPECT_EQ(w.size(), 0u);
    EXPECT_EQ(w.advance(100, [](timer&) { FAIL(); }), 0u);
  }
  timer t;
  {
    timer_wheel w(0);
    w.arm(t, 10);
  }  // the wheel unlinks what is left
  EXPECT_FALSE(t.armed());
}

// Property test: random arms, re-arms, cancels and clock moves (small steps, level-crossing
// steps and big jumps) against a reference multimap. Checks every fire: right timer, never
// early, never late relative to the advance() that fired it, in deadline order; and
// next_deadline() against the reference.
TEST(TimerWheel, RandomAgainstReference) {
  const uint32_t seed = 0x7e4a11u;
  std::printf("timer wheel property test seed %u\n", seed);
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 20; ++round) {
    uint64_t start = rng() % (uint64_t(1) << 40);
    timer_wheel w(start);
    const size_t n = 2000;
    std::vector<timer> ts(n);
    // Reference: id -> effective deadline (max(deadline, now at arm)), plus "armed late".
    std::map<uint64_t, uint64_t> ref;
    std::set<std::pair<uint64_t, uint64_t>> by_deadline;  // (effective deadline, id)
    auto forget = [&](uint64_t id) {
      auto it = ref.find(id);
      if (it == ref.end()) return false;
      by_deadline.erase({it->second, id});
      ref.erase(it);
      return true;
    };
    bool any_cancel = false;
    for (size_t i = 0; i < n; ++i) ts[i].data = i;
    auto pick_delay = [&]() -> uint64_t {
      switch (rng() % 8) {
        case 0: return 0;                              // due now
        case 1: return rng() % 256;                    // level 0
        case 2: return rng() % 65536;                  // level 1
        case 3: return rng() % (uint64_t(1) << 24);    // level 2
        case 4: return rng() % (uint64_t(1) << 32);    // level 3
        case 5: return rng() % (uint64_t(1) << 36);    // beyond the horizon
        default: return rng() % 1000;
      }
    };
    for (int op = 0; op < 20000; ++op) {
      uint64_t now = w.now();
      unsigned kind = rng() % 10;
      if (kind < 5) {
        size_t i = rng() % n;
        // Sometimes in the past.
        uint64_t d = rng() % 16 == 0 ? now - std::min<uint64_t>(now, rng() % 5000) : now + pick_delay();
        w.arm(ts[i], d);
        if (forget(i)) any_cancel = true;  // a re-arm leaves the old slot's bound behind too
        ref[i] = std::max(d, now);
        by_deadline.insert({ref[i], i});
      } else if (kind < 6) {
        size_t i = rng() % n;
        if (forget(i)) any_cancel = true;
        w.cancel(ts[i]);
        ASSERT_FALSE(ts[i].armed());
      } else {
        uint64_t step;
        switch (rng() % 4) {
          case 0: step = rng() % 4; break;
          case 1: step = rng() % 600; break;
          case 2: step = rng() % 200000; break;
          default: step = rng() % (uint64_t(1) << 33); break;
        }
        uint64_t to = now + step;
        uint64_t last = 0;
        w.advance(to, [&](timer& t) {
          auto it = ref.find(t.data);
          ASSERT_NE(it, ref.end()) << "fired a timer that is not armed";
          EXPECT_LE(it->second, to) << "fired early";
          EXPECT_GE(it->second, last) << "out of deadline order";
          EXPECT_FALSE(t.armed());
          last = it->second;
          forget(t.data);
        });
        // Everything due by `to` fired (nothing late).
        if (!by_deadline.empty()) {
          ASSERT_GT(by_deadline.begin()->first, to)
              << "timer " << by_deadline.begin()->second << " late, round " << round;
        }
        ASSERT_EQ(w.now(), to);
      }
      ASSERT_EQ(w.size(), ref.size());
      uint64_t min = by_deadline.empty() ? w.never : by_deadline.begin()->first;
      uint64_t nd = w.next_deadline();
      ASSERT_LE(nd, min);
      ASSERT_GE(nd, w.now());
      if (!any_cancel) {
        ASSERT_EQ(nd, min);
      }
    }
    // Drain by following next_deadline(), like an event loop: each wake-up either fires
    // something or moves next_deadline() forward.
    uint64_t wakeups = 0;
    while (!w.empty()) {
      uint64_t nd = w.next_deadline();
      ASSERT_NE(nd, w.never);
      size_t before = ref.size();
      w.advance(nd, [&](timer& t) {
        ASSERT_EQ(ref.count(t.data), 1u);
        EXPECT_LE(ref[t.data], nd);
        forget(t.data);
      });
      if (ref.size() == before) {
        ASSERT_GT(w.next_deadline(), nd);
      }
      ASSERT_LT(++wakeups, 100000u);
    }
    EXPECT_TRUE(ref.empty());
  }
}

// Many timers with random deadlines, fired by one advance per ms over the whole range:
// the fire sequence equals the sorted reference and each fires in its own millisecond.
TEST(TimerWheel, ManyTimersSortedOrder) {
  const uint32_t seed = 4242;
  std::printf("timer wheel sorted-order test seed %u\n", seed);
  std::mt19937 rng(seed);
  const size_t n = 100000;
  timer_wheel w(1000);
  auto ts = std::make_unique<timer[]>(n);
  std::vector<std::pair<uint64_t, uint64_t>> expect;  // (deadline, id)
  for (size_t i = 0; i < n; ++i) {
    uint64_t d = 1001 + rng() % 70000;  // spans levels 0, 1 and 2
    ts[i].data = i;
    w.arm(ts[i], d);
    expect.emplace_back(d, i);
  }
  std::stable_sort(expect.begin(), expect.end(),
                   [](auto& a, auto& b) { return a.first < b.first; });
  std::vector<std::pair<uint64_t, uint64_t>> got;
  got.reserve(n);
  for (uint64_t now = 1001; now <= 71001; now += 1 + (now % 7 == 0 ? 500 : 0))
    w.advance(now, [&](timer& t) {
      EXPECT_LE(t.deadline(), now);
      got.emplace_back(t.deadline(), t.data);
    });
  w.advance(80000, [&](timer& t) { got.emplace_back(t.deadline(), t.data); });
  ASSERT_EQ(got.size(), n);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(got[i].first, expect[i].first) << i;
  std::set<uint64_t> ids;
  for (auto& g : got) ids.insert(g.second);
  EXPECT_EQ(ids.size(), n);
}

TEST(TimerWheel, NoAllocationPerTimer) {
  const size_t n = 10000;
  auto w = std::make_unique<timer_wheel>(0);
  auto ts = std::make_unique<timer[]>(n);
  std::mt19937_64 rng(5);
  std::vector<uint64_t> ds(n);
  for (auto& d : ds) d = 1 + rng() % (uint64_t(1) << 34);  // all levels and the overflow
  size_t fired = 0;
  long before = allocations.load();
  for (size_t i = 0; i < n; ++i) w->arm(ts[i], ds[i]);
  for (size_t i = 0; i < n; i += 2) w->arm(ts[i], ds[i] / 2);  // move
  for (size_t i = 0; i < n; i += 3) w->cancel(ts[i]);
  for (uint64_t now = 0; !w->empty(); now = now * 2 + 1000) {
    fired += w->advance(now, [&](timer& t) {
      if (t.data++ == 0) w->arm(t, w->now() + 10);  // re-arm from the callback, once
    });
  }
  long during = allocations.load() - before;
  EXPECT_EQ(during, 0);
  EXPECT_GT(fired, n / 2);
}

TEST(TimerWheel, MoveOnlyWhileNotArmed) {
  std::vector<timer> v(4);
  v[2].data = 9;
  v.resize(100);  // moves unarmed timers: allowed
  EXPECT_EQ(v[2].data, 9u);
  timer_wheel w(0);
  w.arm(v[2], 5);
  EXPECT_DEATH({ timer moved(std::move(v[2])); }, "moving an armed timer");
  w.cancel(v[2]);
}
