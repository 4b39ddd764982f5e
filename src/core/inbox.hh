#pragma once
// A shard's inbox: a bounded multi-producer, single-consumer queue of control messages
// (commands, stats requests) posted from any thread to one shard, with an eventfd that
// the shard keeps a READ on in its io_uring so a post wakes it.
//
// What it trusts: the consumer side (drain) is called from one thread only, the owner's;
// T's move constructor and destructor do not throw. What it does not trust: producers'
// timing. Any number of threads may post concurrently, stall in the middle of a post, or
// post while the owner drains; a full queue refuses (try_post returns false) rather than
// blocking or allocating, so a slow shard pushes back on its senders instead of growing.
//
// The ring is Dmitry Vyukov's bounded MPMC queue with one sequence number per cell
// (producers claim a cell with a CAS on the tail, publish with a release store of the
// cell's sequence); the single consumer needs no CAS.
//
// Wake-up protocol (no lost wake-up; one eventfd write per drain cycle, however many
// posts, plus one from a drain that stops early):
//   producer: publish the item; then if notified_.exchange(true) was false, write 1 to
//             the eventfd.
//   owner:    keeps one 8-byte READ of fd() in its ring, into a buffer it owns. When it
//             completes (the read has reset the eventfd's counter), call drain(), which
//             starts with notified_.exchange(false) and then takes items until the ring
//             is empty (or max); then queue the next READ.
// Every access to notified_ is an acq_rel exchange, so the owner's exchange reads the last
// value in a release sequence that contains every producer's exchange before it: an item
// published before a producer found the flag set is visible to the drain that clears it.
// An item the drain does not see (published after the owner's exchange, or held up by a
// producer stalled between its claim and its publish) is followed by that producer's own
// exchange, which then finds false and writes the eventfd: the owner wakes again. The
// order "read the eventfd, then drain" matters: draining first and reading after could
// swallow a write made in between. While a wake-up is pending, posts make no syscall.
#include <array>
#include <atomic>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <new>
#include <type_traits>
#include <utility>

namespace tern::core {

namespace detail {
// Create a non-blocking, close-on-exec eventfd; on failure throws std::system_error with
// what failed (start-up only: an inbox is built with its shard).
int make_eventfd();
// Add 1 to the eventfd's counter (retries EINTR; a full counter is already a wake-up).
void signal_eventfd(int fd) noexcept;
// Read and reset the eventfd's counter; 0 if it was not readable.
uint64_t read_eventfd(int fd) noexcept;
void close_fd(int fd) noexcept;
}  // namespace detail

// Capacity is a compile-time power of two, allocated inline: an inbox never allocates.
template <class T, size_t Capacity>
class inbox {
  static_assert(Capacity >= 2 && (Capacity & (Capacity - 1)) == 0, "capacity must be a power of two");
  static_assert(std::is_nothrow_move_constructible_v<T> && std::is_nothrow_destructible_v<T>,
                "inbox items move without throwing");

 public:
  inbox() : fd_(detail::make_eventfd()) {
    for (size_t i = 0; i < Capacity; ++i) cells_[i].seq.store(i, std::memory_order_relaxed);
  }
  // Items still queued are destroyed; no producer may be posting any more.
  ~inbox() {
    drain([](T&&) {});
    detail::close_fd(fd_);
  }
  inbox(const inbox&) = delete;
  inbox& operator=(const inbox&) = delete;

  static constexpr size_t capacity() noexcept { return Capacity; }

  // Any thread. Queue v and wake the owner; false (v untouched) when the ring is full.
  // No lock, no allocation, at most one syscall (none while a wake-up is pending). Not
  // lock-free in the strict sense: a producer preempted between claiming its cell and
  // publishing it holds up the items posted after it (never the posts themselves) until
  // it runs again; its own notify then wakes the owner for all of them.
  bool try_post(T&& v) noexcept { return try_emplace(std::move(v)); }
  bool try_post(const T& v) noexcept { return try_emplace(v); }
  // Construct the item in place; only nothrow constructions (checked at compile time).
  template <class... Args>
  bool try_emplace(Args&&... args) noexcept {
    size_t pos = tail_.load(std::memory_order_relaxed);
    cell* c;
    for (;;) {
      c = &cells_[pos & (Capacity - 1)];
      size_t seq = c->seq.load(std::memory_order_acquire);
      auto dif = static_cast<intptr_t>(seq) - static_cast<intptr_t>(pos);
      if (dif == 0) {
        if (tail_.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) break;
      } else if (dif < 0) {
        return false;  // the cell still holds the item of the previous lap: full
      } else {
        pos = tail_.load(std::memory_order_relaxed);
      }
    }
    // If construction throws, the claimed cell would never be published and would block
    // the consumer forever; that is why only nothrow construction is allowed here.
    static_assert(std::is_nothrow_constructible_v<T, Args...>,
                  "construct outside the inbox and post the moved value");
    ::new (static_cast<void*>(c->storage)) T(std::forward<Args>(args)...);
    c->seq.store(pos + 1, std::memory_order_release);
    notify();
    return true;
  }

  // Owner thread only. Read the eventfd first (see the protocol above), then call this:
  // it passes each queued item to f(T&&), in post order per producer, up to max items,
  // and returns how many. If it stops with items left (max reached, or f threw) it
  // signals the eventfd itself, so they are drained on the next wake-up and none is
  // stranded; a bounded max keeps a flood of posts from starving the owner's loop.
  // f may post to this inbox (the item comes in this drain or a later one). f should not
  // throw; if it does, its item is consumed and the exception propagates.
  template <class F>
  size_t drain(F&& f, size_t max = Capacity) {
    notified_.exchange(false, std::memory_order_acq_rel);
    struct rewake {
      inbox& q;
      ~rewake() {
        if (q.ready()) q.notify();
      }
    } guard{*this};
    size_t n = 0;
    while (n < max && ready()) {
      cell& c = cells_[head_ & (Capacity - 1)];
      T* p = std::launder(reinterpret_cast<T*>(c.storage));
      T v(std::move(*p));
      p->~T();
      c.seq.store(head_ + Capacity, std::memory_order_release);
      ++head_;
      ++n;
      f(std::move(v));
    }
    return n;
  }

  // The eventfd: readable when posts are waiting. The owner keeps a READ of 8 bytes on it
  // (or polls it and calls clear_fd()).
  int fd() const noexcept { return fd_; }
  // Reset the eventfd's counter without io_uring (a poll(2)-based owner, tests). Returns
  // the counter: the number of wake-up writes since the last reset.
  uint64_t clear_fd() noexcept { return detail::read_eventfd(fd_); }

 private:
  // Owner only: the next cell holds a published item.
  bool ready() const noexcept {
    return cells_[head_ & (Capacity - 1)].seq.load(std::memory_order_acquire) == head_ + 1;
  }
  void notify() noexcept {
    if (!notified_.exchange(true, std::memory_order_acq_rel)) detail::signal_eventfd(fd_);
  }

  struct cell {
    std::atomic<size_t> seq;
    alignas(T) unsigned char storage[sizeof(T)];
  };

  // Producers' tail, the wake-up flag and the consumer's head on separate cache lines:
  // producers contend on the tail, the owner works on the head without bouncing it.
  alignas(64) std::atomic<size_t> tail_{0};
  alignas(64) std::atomic<bool> notified_{false};
  alignas(64) size_t head_ = 0;  // owner only
  int fd_;
  alignas(64) std::array<cell, Capacity> cells_;
};

}  // namespace tern::core
