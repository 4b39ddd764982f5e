#pragma once
// Hierarchical timer wheel for one shard: millisecond resolution, injected clock.
//
// What it is for: per-connection and per-delivery timeouts (idle, session, send progress,
// SMTP client timeouts, retries) on a shard's thread, with O(1) arm, re-arm and cancel and
// no allocation per timer. A `timer` is an intrusive node embedded in its owner (a session
// slot, a delivery); the wheel only links it into lists.
//
// What it trusts: its caller. It is single-threaded (the owning shard), the clock passed to
// advance() is monotonic (a value below now() is taken as now(): time does not go back),
// and a timer is not destroyed or moved while armed except through its own destructor
// (which cancels it). It reads no clock and makes no system call.
//
// Layout: 4 levels of 256 slots. A timer goes to the level of the highest byte in which its
// deadline differs from now(): level 0 holds the deadlines of the current 256 ms block, one
// slot per ms; level 1 the current 65.5 s block in 256 ms slots; level 2 the current 4.66 h
// block in 65.5 s slots; level 3 the current 49.7 day block in 4.66 h slots. Deadlines more
// than that ahead wait in one overflow list that is re-placed when its earliest deadline
// comes due (the "clamp to the last level and re-cascade" of the classic design; cheap for
// the rare far timer, not meant for many of them). When time reaches a higher-level slot,
// its timers cascade to lower levels; every slot keeps a lower bound of its deadlines so
// the wheel never has to walk time tick by tick: a jump of days costs one step per
// occupied slot, not one per millisecond. Occupancy bitmaps make next_deadline() and
// finding the next slot O(levels).
//
// Guarantees: a timer never fires before its deadline; advance(T) fires every timer whose
// deadline is <= T, so relative to the clock the caller passes it is late only by the
// caller's own clock granularity (the loop's wait rounds to whole ms: at most 1 ms).
#include <bit>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>

namespace tern::core {

class timer_wheel;

namespace detail {
struct timer_link {
  timer_link* next_ = nullptr;
  timer_link* prev_ = nullptr;
};
}  // namespace detail

// One timeout, embedded in its owner. Not copyable; movable only while not armed (checked),
// so an array of owners can be sized at start-up. Destroying an armed timer cancels it.
class timer : private detail::timer_link {
 public:
  timer() noexcept = default;
  ~timer() noexcept;
  timer(const timer&) = delete;
  timer& operator=(const timer&) = delete;
  timer(timer&& o) noexcept : data(o.data) { assert(!o.armed() && "moving an armed timer"); }
  timer& operator=(timer&& o) noexcept {
    assert(!armed() && !o.armed() && "moving an armed timer");
    data = o.data;
    return *this;
  }

  bool armed() const noexcept { return wheel_ != nullptr; }
  // The deadline given to the last arm() (meaningful while armed).
  uint64_t deadline() const noexcept { return deadline_; }

  // The owner's tag for the fire callback (e.g. slot index and generation).
  uint64_t data = 0;

 private:
  friend class timer_wheel;
  uint64_t deadline_ = 0;
  timer_wheel* wheel_ = nullptr;
  uint32_t list_ = 0;  // index of the list the timer is linked in (valid while armed)
};

class timer_wheel {
 public:
  static constexpr unsigned level_bits = 8;
  static constexpr unsigned slots = 1u << level_bits;  // per level
  static constexpr unsigned levels = 4;
  // Deadlines at least this far from now() (in the sense of the highest differing bit)
  // wait in the overflow list: 2^32 ms, about 49.7 days.
  static constexpr uint64_t horizon_ms = uint64_t(1) << (level_bits * levels);
  static constexpr uint64_t never = std::numeric_limits<uint64_t>::max();

  // now_ms: the clock's current value; arm() deadlines are on the same clock.
  explicit timer_wheel(uint64_t now_ms) noexcept;
  // Unlinks every timer still armed (they read as not armed afterwards), so owners may
  // outlive the wheel.
  ~timer_wheel() noexcept;
  timer_wheel(const timer_wheel&) = delete;
  timer_wheel& operator=(const timer_wheel&) = delete;

  // Arm t to fire at deadline_ms. O(1), no allocation. An armed timer is moved (its old
  // deadline is forgotten). A deadline <= now() fires on the next advance() call (before
  // any later deadline; among themselves in arm order), also when armed from inside a fire
  // callback: so a callback that re-arms "now" cannot keep advance() looping forever.
  // t must not be armed on another wheel (checked).
  void arm(timer& t, uint64_t deadline_ms) noexcept;
  // Convenience: arm at now() + delay_ms (saturating).
  void arm_after(timer& t, uint64_t delay_ms) noexcept {
    arm(t, delay_ms > never - now_ ? never : now_ + delay_ms);
  }
  // Disarm t. O(1). No-op if t is not armed. Safe from inside a fire callback, also on a
  // timer that is due in the same advance() (it then does not fire).
  void cancel(timer& t) noexcept;

  // Move the clock to now_ms and fire every timer whose deadline is <= now_ms, in
  // deadline order (ties in an unspecified order), each with fire(timer&). The timer is
  // disarmed before its callback runs. A callback may arm (including re-arm itself) or
  // cancel any timer of this wheel; a timer armed from a callback with a deadline
  // <= now_ms fires in this call if its deadline is after the time being processed,
  // otherwise on the next call (see arm()). It must not call advance() (checked) and
  // should not throw: if it does, the exception propagates, the wheel stays consistent
  // and the remaining due timers fire on the next call.
  // Returns the number of timers fired. Cost: O(fired + cascaded + occupied slots passed).
  template <class F>
  size_t advance(uint64_t now_ms, F&& fire);

  // The earliest time at which advance() has something to do: now() if a timer is already
  // due, otherwise a lower bound of the earliest deadline: exact unless the timer that set
  // a slot's bound was cancelled or re-armed elsewhere, and then an early wake-up finds
  // nothing to fire but tightens the bound (at most one such wake-up per slot). never if
  // no timer is armed. O(levels). For the event loop's wait timeout.
  uint64_t next_deadline() const noexcept;

  uint64_t now() const noexcept { return now_; }
  size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }

 private:
  using link = detail::timer_link;
  static constexpr uint32_t overflow_list = levels * slots;
  static constexpr uint32_t pending_list = overflow_list + 1;  // armed at or before now()
  static constexpr uint32_t due_list = overflow_list + 2;      // being fired by advance()
  static constexpr uint32_t nlists = overflow_list + 3;
  static constexpr uint32_t unlinked = ~uint32_t(0);

  static timer& of(link* l) noexcept { return *static_cast<timer*>(l); }
  bool list_empty(uint32_t i) const noexcept { return lists_[i].next_ == &lists_[i]; }
  void push_back(uint32_t i, timer& t) noexcept;
  void unlink(timer& t) noexcept;
  void splice_back(uint32_t to, uint32_t from) noexcept;
  // Link t (deadline > now_, or == now_ while cascading) into its wheel slot.
  void place(timer& t) noexcept;
  // Find the earliest slot event; if it is <= limit, move now_ there, move what is due
  // into the due list and cascade the rest. False when nothing happens up to limit.
  bool step(uint64_t limit) noexcept;
  // Disarm and return the first due timer (the due list must not be empty).
  timer& pop_due() noexcept;

  uint64_t now_;
  size_t size_ = 0;
  bool advancing_ = false;
  // Occupancy of each level's slots, and a lower bound of the deadlines in each slot (and
  // in the overflow list, the last entry); never for an empty slot.
  uint64_t bits_[levels][slots / 64] = {};
  uint64_t slot_min_[levels * slots + 1];
  link lists_[nlists];  // circular, sentinel-headed
};

template <class F>
size_t timer_wheel::advance(uint64_t now_ms, F&& fire) {
  assert(!advancing_ && "advance() called from a fire callback");
  advancing_ = true;
  struct reset {
    bool& b;
    ~reset() { b = false; }
  } r{advancing_};
  size_t fired = 0;
  // Due timers left by a callback that threw, then those armed at or before now().
  splice_back(due_list, pending_list);
  for (;;) {
    while (!list_empty(due_list)) {
      timer& t = pop_due();
      ++fired;
      fire(t);
    }
    if (!step(now_ms)) break;
  }
  if (now_ms > now_) now_ = now_ms;
  return fired;
}

}  // namespace tern::core
