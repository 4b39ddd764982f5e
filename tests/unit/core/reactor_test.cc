// The reactor: user_data codec, slot generations, tiny rings that force the SQ-full and
// CQ-overflow paths, cancel-and-drain ordering on a multishot recv, timers through the
// loop, and a wake-up from another thread.
#include "src/core/reactor.hh"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <thread>
#include <vector>

namespace tern::core {
namespace {

struct recorder : completion_handler, loop_hooks {
  struct seen {
    uint64_t ud;
    int res;
    uint32_t flags;
  };
  std::vector<seen> cqes;
  std::vector<uint64_t> timers;
  reactor* rx = nullptr;
  size_t want = 0;
  uint64_t inbox_calls = 0;
  std::atomic<bool> posted{false};
  bool saw_post = false;
  void on_completion(const io_uring_cqe& c) override {
    cqes.push_back({c.user_data, c.res, c.flags});
    if (int bid = buffer_ring::id_of(c); bid >= 0 && rx) rx->buffers().recycle(static_cast<uint16_t>(bid));
  }
  void on_timer(timer& t) override { timers.push_back(t.data); }
  void on_inbox() override {
    ++inbox_calls;
    if (posted.load()) saw_post = true;
  }
  bool keep_running() override { return cqes.size() < want; }
};

TEST(UserData, RoundTrips) {
  uint64_t d = ud::make(owner::outbound, 9, 0xABCDEF12u, 0x123456);
  EXPECT_EQ(ud::kind(d), owner::outbound);
  EXPECT_EQ(ud::op(d), 9u);
  EXPECT_EQ(ud::index(d), 0xABCDEF12u);
  EXPECT_EQ(ud::gen(d), 0x123456u);
  // The generation wraps at 24 bits; the op at 4; kinds never collide with ignore.
  EXPECT_EQ(ud::gen(ud::make(owner::inbound, 1, 1, 0x1000001)), 1u);
  EXPECT_NE(ud::make(owner::reactor, 0, 0, 0), ud::ignore);
}

struct item {
  uint32_t gen = 0;
};

TEST(SlotTable, StaleGenerationsAreRejected) {
  slot_table<item> t;
  t.init(2);
  uint32_t a = 0, b = 0, c = 0;
  item* ia = t.acquire(a);
  ASSERT_NE(ia, nullptr);
  uint32_t gen_a = ia->gen;
  ASSERT_NE(t.acquire(b), nullptr);
  EXPECT_EQ(t.acquire(c), nullptr);  // full: back-pressure, not allocation
  EXPECT_EQ(t.find(a, gen_a), ia);
  t.release(a);
  EXPECT_EQ(t.find(a, gen_a), nullptr);  // a completion for the old use is stale
  item* again = t.acquire(c);
  ASSERT_NE(again, nullptr);
  EXPECT_EQ(c, a);  // the slot is reused...
  EXPECT_NE(again->gen, gen_a);  // ...under a new generation
  EXPECT_EQ(t.find(c, gen_a), nullptr);
  EXPECT_EQ(t.find(c, again->gen), again);
  t.release(c);
  t.release(c);  // double release is ignored
  EXPECT_EQ(t.free_count(), 1u);
  EXPECT_EQ(t.find(99, 0), nullptr);
}

TEST(Reactor, TinySubmissionQueueSubmitsEarlyAndLosesNothing) {
  reactor rx;
  reactor_options o;
  o.sq_entries = 8;
  o.cq_entries = 4096;
  std::string err;
  ASSERT_TRUE(rx.init(o, err)) << err;
  recorder r;
  rx.set_handler(owner::test, &r);
  for (uint32_t i = 0; i < 100; ++i) {
    io_uring_sqe* s = rx.get_sqe();
    ASSERT_NE(s, nullptr);
    io_uring_prep_nop(s);
    io_uring_sqe_set_data64(s, ud::make(owner::test, 1, i, 0));
  }
  EXPECT_GT(rx.counters().sq_full.load(), 0u);
  r.want = 100;
  rx.run(r);
  ASSERT_EQ(r.cqes.size(), 100u);
  for (uint32_t i = 0; i < 100; ++i) EXPECT_EQ(ud::index(r.cqes[i].ud), i);  // NOPs complete in order
}

TEST(Reactor, OverflowingCompletionQueueDeliversEverything) {
  reactor rx;
  reactor_options o;
  o.sq_entries = 8;
  o.cq_entries = 16;  // 200 completions cannot fit: the kernel keeps the overflow (NODROP)
  std::string err;
  ASSERT_TRUE(rx.init(o, err)) << err;
  recorder r;
  rx.set_handler(owner::test, &r);
  for (uint32_t i = 0; i < 200; ++i) {
    io_uring_sqe* s = rx.get_sqe();
    io_uring_prep_nop(s);
    io_uring_sqe_set_data64(s, ud::make(owner::test, 1, i, 0));
  }
  io_uring_submit(rx.ring());
  r.want = 200;
  rx.run(r);
  ASSERT_EQ(r.cqes.size(), 200u);
  std::vector<bool> got(200, false);
  for (auto& c : r.cqes) got[ud::index(c.ud)] = true;
  for (uint32_t i = 0; i < 200; ++i) EXPECT_TRUE(got[i]) << i;
}

TEST(Reactor, CancelThenDrainEndsAMultishotRecvBeforeTheSlotIsReused) {
  reactor rx;
  reactor_options o;
  o.recv_buffers = 8;
  o.recv_buffer_size = 64;
  o.need_multishot_recv = true;
  std::string err;
  ASSERT_TRUE(rx.init(o, err)) << err;
  recorder r;
  r.rx = &rx;
  rx.set_handler(owner::test, &r);
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  const uint64_t recv_ud = ud::make(owner::test, 2, 5, 7);
  io_uring_sqe* s = rx.get_sqe();
  io_uring_prep_recv_multishot(s, sv[0], nullptr, 0, 0);
  s->flags |= IOSQE_BUFFER_SELECT;
  s->buf_group = rx.buffers().group();
  io_uring_sqe_set_data64(s, recv_ud);
  ASSERT_EQ(::write(sv[1], "hello", 5), 5);
  r.want = 1;
  rx.run(r);
  ASSERT_EQ(r.cqes.size(), 1u);
  EXPECT_EQ(r.cqes[0].res, 5);
  EXPECT_TRUE(r.cqes[0].flags & IORING_CQE_F_MORE);  // still armed
  // close = cancel + drain: the terminating completion (no F_MORE) arrives before the
  // owner may free the slot; nothing is delivered for the slot afterwards.
  rx.cancel(recv_ud);
  r.want = 2;
  rx.run(r);
  ASSERT_EQ(r.cqes.size(), 2u);
  EXPECT_EQ(r.cqes[1].ud, recv_ud);
  EXPECT_EQ(r.cqes[1].res, -ECANCELED);
  EXPECT_FALSE(r.cqes[1].flags & IORING_CQE_F_MORE);
  ASSERT_EQ(::write(sv[1], "late", 4), 4);
  // Only a NOP comes back now.
  io_uring_sqe* n = rx.get_sqe();
  io_uring_prep_nop(n);
  io_uring_sqe_set_data64(n, ud::make(owner::test, 3, 0, 0));
  r.want = 3;
  rx.run(r);
  ASSERT_EQ(r.cqes.size(), 3u);
  EXPECT_EQ(ud::op(r.cqes[2].ud), 3u);
  ::close(sv[0]);
  ::close(sv[1]);
}

TEST(Reactor, CancelFdCancelsEveryRequestOnTheSocket) {
  reactor rx;
  std::string err;
  ASSERT_TRUE(rx.init(reactor_options{}, err)) << err;
  recorder r;
  rx.set_handler(owner::test, &r);
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  static char b1[16], b2[16];
  for (auto* b : {b1, b2}) {
    io_uring_sqe* s = rx.get_sqe();
    io_uring_prep_recv(s, sv[0], b, sizeof b1, 0);
    io_uring_sqe_set_data64(s, ud::make(owner::test, 1, b == b1 ? 1 : 2, 0));
  }
  io_uring_submit(rx.ring());
  rx.cancel_fd(sv[0]);
  r.want = 2;
  rx.run(r);
  ASSERT_EQ(r.cqes.size(), 2u);
  for (auto& c : r.cqes) EXPECT_EQ(c.res, -ECANCELED);
  ::close(sv[0]);
  ::close(sv[1]);
}

TEST(Reactor, TimersFireThroughTheirOwner) {
  reactor rx;
  std::string err;
  ASSERT_TRUE(rx.init(reactor_options{}, err)) << err;
  struct hooks final : recorder {
    bool keep_running() override { return timers.size() < 2; }
  } h;
  rx.set_handler(owner::test, &h);
  timer a, b;
  a.data = ud::make(owner::test, 0, 1, 0);
  b.data = ud::make(owner::test, 0, 2, 0);
  rx.timers().arm(b, rx.now_ms() + 20);
  rx.timers().arm(a, rx.now_ms() + 5);
  rx.run(h);
  ASSERT_EQ(h.timers.size(), 2u);
  EXPECT_EQ(ud::index(h.timers[0]), 1u);  // deadline order
  EXPECT_EQ(ud::index(h.timers[1]), 2u);
  EXPECT_GE(rx.counters().iterations.load(), 1u);
  EXPECT_GT(rx.counters().heartbeat_ms.load(), 0u);
}

TEST(Reactor, WakeFromAnotherThreadEndsTheWait) {
  reactor rx;
  reactor_options o;
  o.tick_ms = 600000;  // without a working wake-up the loop would sleep for ten minutes
  std::string err;
  ASSERT_TRUE(rx.init(o, err)) << err;
  struct hooks final : recorder {
    bool keep_running() override { return !saw_post; }
  } h;
  uint64_t t0 = monotonic_ms();
  std::thread t([&] {
    h.posted.store(true);
    rx.wake();
  });
  rx.run(h);
  t.join();
  EXPECT_TRUE(h.saw_post);
  EXPECT_LT(monotonic_ms() - t0, 60000u);  // a correctness guard, not a performance bound
}

// Idle poll: a completion that is already there when the loop would sleep is found by the
// poll (a hit), so io_uring_enter does not sleep for it. A NOP queued by the loop's own flush
// is submitted by the poll and completes inline: deterministic, no timing involved.
TEST(Reactor, IdlePollFindsACompletionBeforeSleeping) {
  reactor rx;
  reactor_options o;
  o.idle_poll_us = 10000;
  o.tick_ms = 600000;  // a miss would sleep for ten minutes: the test would hang, not pass
  std::string err;
  ASSERT_TRUE(rx.init(o, err)) << err;
  struct hooks final : recorder {
    bool queued = false;
    void flush() override {
      if (queued) return;
      queued = true;
      io_uring_sqe* s = rx->get_sqe();
      io_uring_prep_nop(s);
      io_uring_sqe_set_data64(s, ud::make(owner::test, 1, 7, 0));
    }
  } h;
  h.rx = &rx;
  h.want = 1;
  rx.set_handler(owner::test, &h);
  rx.run(h);
  ASSERT_EQ(h.cqes.size(), 1u);
  EXPECT_EQ(ud::index(h.cqes[0].ud), 7u);
  EXPECT_GE(rx.counters().idle_poll_hits.load(), 1u);
}

// Nothing arrives: the poll gives up after its budget (a miss) and the loop sleeps until the
// timer, which still fires.
TEST(Reactor, IdlePollGivesUpAndTheTimerStillFires) {
  reactor rx;
  reactor_options o;
  o.idle_poll_us = 500;
  std::string err;
  ASSERT_TRUE(rx.init(o, err)) << err;
  struct hooks final : recorder {
    bool keep_running() override { return timers.empty(); }
  } h;
  rx.set_handler(owner::test, &h);
  timer a;
  a.data = ud::make(owner::test, 0, 1, 0);
  rx.timers().arm(a, rx.now_ms() + 20);
  rx.run(h);
  ASSERT_EQ(h.timers.size(), 1u);
  EXPECT_GE(rx.counters().idle_poll_misses.load(), 1u);
}

// A wake-up from another thread ends the wait whether it lands during the poll or after it.
TEST(Reactor, IdlePollStillWakesOnAPostFromAnotherThread) {
  reactor rx;
  reactor_options o;
  o.idle_poll_us = 10000;
  o.tick_ms = 600000;
  std::string err;
  ASSERT_TRUE(rx.init(o, err)) << err;
  struct hooks final : recorder {
    bool keep_running() override { return !saw_post; }
  } h;
  std::thread t([&] {
    h.posted.store(true);
    rx.wake();
  });
  rx.run(h);
  t.join();
  EXPECT_TRUE(h.saw_post);
}

}  // namespace
}  // namespace tern::core
