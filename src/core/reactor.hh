#pragma once
// The reactor: what every io_uring user on a shard thread shares. One per thread.
//
// It owns the ring (set up and feature-probed once), the user_data codec, the dispatch of
// completions to their owner, the provided-buffer ring, the timer wheel, the wake-up
// eventfd behind the cross-thread inbox, and the loop. Users (the inbound SMTP server, the
// outbound SMTP client, the spool writer, tern-load) register a completion_handler per
// owner kind and a set of loop hooks; they never run a loop of their own.
//
// Loop order, one iteration (docs/architecture.md has the picture):
//   1. inbox   hooks.on_inbox(): cross-thread messages posted since the last iteration
//   2. reap    every completion in the CQ, dispatched by owner kind; one cq_advance
//   3. run     hooks.run_ready(): work the completions made ready (sessions, spool results)
//   4. timers  the timer wheel fires everything due at the iteration's clock
//   5. flush   hooks.flush(): end-of-iteration batching (group commit, log lines)
//   6. submit  ONE io_uring_enter: submit everything queued and wait for at least one
//              completion or the next timer deadline
//
// user_data: index(32) | generation(24) | owner kind(4) | op(4). Never a pointer: a
// completion for a slot that was freed and reused is recognised by its generation.
//
// Trust: the reactor trusts its users (same thread, same process) and nothing from the
// kernel beyond what io_uring documents: every result is checked by the user that owns it.
// Not thread-safe, except wake() and the counters, which any thread may call or read.
#include <liburing.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "src/core/timer_wheel.hh"

namespace tern::core {

// Who a completion belongs to. Four bits in user_data.
enum class owner : uint8_t {
  reactor = 0,   // the reactor's own (wake-up read, probes, fire-and-forget cancels)
  inbound = 1,   // inbound SMTP connections (src/server)
  outbound = 2,  // outbound SMTP/LMTP connections (delivery)
  spool = 3,     // the spool writer
  control = 4,   // control socket, metrics
  listener = 5,  // multishot accepts
  user = 6,      // tools (tern-load, tern-sink)
  test = 7,
};
inline constexpr unsigned owner_kinds = 16;

// The user_data codec.
struct ud {
  static constexpr uint64_t make(owner k, unsigned op, uint32_t index, uint32_t gen) noexcept {
    return uint64_t(index) << 32 | uint64_t(gen & 0xFFFFFF) << 8 | uint64_t(uint8_t(k) & 0xF) << 4 | (op & 0xF);
  }
  static constexpr owner kind(uint64_t d) noexcept { return static_cast<owner>((d >> 4) & 0xF); }
  static constexpr unsigned op(uint64_t d) noexcept { return static_cast<unsigned>(d & 0xF); }
  static constexpr uint32_t gen(uint64_t d) noexcept { return static_cast<uint32_t>((d >> 8) & 0xFFFFFF); }
  static constexpr uint32_t index(uint64_t d) noexcept { return static_cast<uint32_t>(d >> 32); }
  // A completion nobody needs to see (cancel requests, best-effort closes).
  static constexpr uint64_t ignore = uint64_t(0xF);
};

// One per owner kind.
class completion_handler {
 public:
  virtual ~completion_handler() = default;
  virtual void on_completion(const io_uring_cqe& cqe) = 0;
  // A timer of this owner fired (its `data` was made with ud::make(kind, ...)).
  virtual void on_timer(timer& t) { (void)t; }
};

// What a loop user does in the loop's steps (see the order above).
class loop_hooks {
 public:
  virtual ~loop_hooks() = default;
  virtual void on_inbox() {}
  virtual void run_ready() {}
  virtual void flush() {}
  // Checked at the end of each iteration; false ends the loop.
  virtual bool keep_running() = 0;
};

// A provided-buffer ring (IORING_REGISTER_PBUF_RING) for multishot receives. The buffer of
// every completion that carries IORING_CQE_F_BUFFER must go back with recycle(), also for
// stale completions, or the ring runs dry.
class buffer_ring {
 public:
  buffer_ring() = default;
  buffer_ring(const buffer_ring&) = delete;
  buffer_ring& operator=(const buffer_ring&) = delete;
  ~buffer_ring();
  bool init(io_uring* ring, uint16_t group, uint32_t count, uint32_t size, std::string& err);
  uint16_t group() const noexcept { return group_; }
  uint32_t size() const noexcept { return size_; }
  uint32_t count() const noexcept { return count_; }
  char* buffer(uint16_t bid) const noexcept { return bufs_ + size_t(bid) * size_; }
  void recycle(uint16_t bid) noexcept;
  // The buffer id of a completion, or -1.
  static int id_of(const io_uring_cqe& cqe) noexcept {
    return (cqe.flags & IORING_CQE_F_BUFFER) ? int(cqe.flags >> IORING_CQE_BUFFER_SHIFT) : -1;
  }

 private:
  io_uring_buf_ring* br_ = nullptr;
  char* bufs_ = nullptr;
  size_t br_bytes_ = 0, bufs_bytes_ = 0;
  uint32_t count_ = 0, size_ = 0;
  uint16_t group_ = 0;
};

// A fixed pool of slots with generations. A slot index plus its generation names one use
// of the slot; release() bumps the generation so completions for the old use are stale.
// T must have a `uint32_t gen` member. Sized once; never allocates afterwards.
template <typename T>
class slot_table {
 public:
  void init(uint32_t n) {
    slots_ = std::make_unique<T[]>(n);
    n_ = n;
    free_.clear();
    free_.reserve(n);
    for (uint32_t i = n; i-- > 0;) free_.push_back(i);
    used_.assign(n, false);
  }
  uint32_t capacity() const noexcept { return n_; }
  uint32_t free_count() const noexcept { return static_cast<uint32_t>(free_.size()); }
  uint32_t in_use() const noexcept { return n_ - free_count(); }
  // A free slot (its generation already new), or nullptr when all are busy.
  T* acquire(uint32_t& idx) noexcept {
    if (free_.empty()) return nullptr;
    idx = free_.back();
    free_.pop_back();
    used_[idx] = true;
    T& s = slots_[idx];
    s.gen = (s.gen + 1) & 0xFFFFFF;
    return &s;
  }
  void release(uint32_t idx) noexcept {
    if (idx >= n_ || !used_[idx]) return;
    used_[idx] = false;
    slots_[idx].gen = (slots_[idx].gen + 1) & 0xFFFFFF;
    free_.push_back(idx);
  }
  // The slot if (idx, gen) names its current use; nullptr for a stale or free one.
  T* find(uint32_t idx, uint32_t gen) noexcept {
    if (idx >= n_ || !used_[idx] || (slots_[idx].gen & 0xFFFFFF) != (gen & 0xFFFFFF)) return nullptr;
    return &slots_[idx];
  }
  bool used(uint32_t idx) const noexcept { return idx < n_ && used_[idx]; }
  T& operator[](uint32_t idx) noexcept { return slots_[idx]; }
  const T& operator[](uint32_t idx) const noexcept { return slots_[idx]; }

 private:
  std::unique_ptr<T[]> slots_;
  uint32_t n_ = 0;
  std::vector<uint32_t> free_;
  std::vector<bool> used_;
};

struct reactor_options {
  uint32_t sq_entries = 1024;
  uint32_t cq_entries = 4096;     // clamped to the kernel's maximum (65536)
  uint32_t recv_buffers = 0;      // 0: no provided-buffer ring
  uint32_t recv_buffer_size = 0;
  uint16_t buffer_group = 1;
  bool defer_taskrun = true;      // SINGLE_ISSUER | DEFER_TASKRUN, else COOP_TASKRUN
  bool need_multishot_recv = false;
  bool need_multishot_accept = false;
  // Opcodes the users need: each missing one is named in the error.
  std::vector<std::pair<int, const char*>> required_ops;
  uint64_t tick_ms = 1000;        // longest wait in one io_uring_enter
  // Before sleeping in io_uring_enter, poll the ring for this long, yielding the CPU to any
  // other runnable thread between looks (0: sleep at once). A completion that arrives while
  // the loop polls needs no wake-up (no IPI, no context switch); see docs/architecture.md.
  uint32_t idle_poll_us = 0;
  // The eventfd whose READ wakes the loop (an inbox's); -1: the reactor makes its own.
  // The reactor keeps a READ armed on it; wake() writes to it.
  int wake_fd = -1;
};

// Written by the reactor's thread with relaxed stores; read by any thread (supervisors,
// the HA health check): a shard whose heartbeat stops moving is stuck.
struct alignas(64) reactor_counters {
  std::atomic<uint64_t> iterations{0};
  std::atomic<uint64_t> heartbeat_ms{0};  // CLOCK_MONOTONIC ms at the last iteration
  std::atomic<uint64_t> completions{0};
  std::atomic<uint64_t> submits{0};
  std::atomic<uint64_t> sq_full{0};       // get_sqe found the SQ full and submitted early
  std::atomic<uint64_t> cq_overflow{0};   // the kernel reported an overflowed CQ
  std::atomic<uint64_t> idle_poll_hits{0};   // idle polls that found work before sleeping
  std::atomic<uint64_t> idle_poll_misses{0}; // idle polls that ran out and went to sleep
};

class reactor {
 public:
  reactor() = default;
  reactor(const reactor&) = delete;
  reactor& operator=(const reactor&) = delete;
  ~reactor();

  // Set up the ring on the calling thread (which becomes its only submitter) and probe
  // every feature asked for. Returns false with one error naming everything missing.
  bool init(const reactor_options& o, std::string& err);
  bool ok() const noexcept { return ok_; }
  io_uring* ring() noexcept { return &ring_; }
  unsigned ring_flags() const noexcept { return flags_; }

  // An SQE; when the SQ is full, what is queued is submitted first. Never nullptr.
  io_uring_sqe* get_sqe();

  void set_handler(owner k, completion_handler* h) noexcept { handlers_[uint8_t(k) & 0xF] = h; }

  // Common fire-and-forget operations.
  void cancel(uint64_t user_data);         // cancel the request with this user_data
  void cancel_fd(int fd);                  // cancel every request on this fd

  buffer_ring& buffers() noexcept { return bufs_; }
  timer_wheel& timers() noexcept { return *wheel_; }

  // The clock, read once per iteration (CLOCK_MONOTONIC ms). refresh_now() re-reads it.
  uint64_t now_ms() const noexcept { return now_ms_; }
  uint64_t refresh_now() noexcept;

  // From any thread: make the loop run an iteration soon (after posting to an inbox).
  void wake() noexcept;

  // Run the loop until hooks.keep_running() says no. Timers fire through `on_timer`.
  void run(loop_hooks& hooks);
  // One iteration without waiting longer than wait_ms (tests drive the loop with it).
  void run_once(loop_hooks& hooks, uint64_t wait_ms);

  const reactor_counters& counters() const noexcept { return ctr_; }

 private:
  void reap();
  bool idle_poll(uint64_t us) noexcept;
  void dispatch(const io_uring_cqe& cqe);
  void arm_wake();

  io_uring ring_{};
  bool ok_ = false;
  unsigned flags_ = 0;
  reactor_options opt_;
  completion_handler* handlers_[owner_kinds] = {};
  buffer_ring bufs_;
  std::unique_ptr<timer_wheel> wheel_;
  uint64_t now_ms_ = 0;
  int wake_fd_ = -1;
  bool own_wake_fd_ = false;
  uint64_t wake_buf_ = 0;
  bool wake_failed_ = false;
  uint64_t wake_retry_ms_ = 0;
  reactor_counters ctr_;
};

uint64_t monotonic_ms() noexcept;

}  // namespace tern::core
