#include "src/core/timer_wheel.hh"

#include <algorithm>
#include <iterator>

namespace tern::core {

// Invariants (checked by the property test through the public API):
// - every timer in level L, slot s has a deadline d > now_ in the level-L slot range
//   [block + s * 2^(8L), block + (s+1) * 2^(8L)), where block is now_ with its low
//   8(L+1) bits cleared; slot_min_[L][s] <= d. So every event (a slot's bound) is >= now_,
//   and now_ may move to any time below the earliest event without touching a slot.
// - the overflow list holds deadlines with (d ^ now) >= 2^32 at the time they were placed;
//   slot_min_[overflow] <= each of them.
// - pending holds deadlines <= now_ (armed late); due holds what advance() fires next.

timer::~timer() noexcept {
  if (wheel_) wheel_->cancel(*this);
}

timer_wheel::timer_wheel(uint64_t now_ms) noexcept : now_(now_ms) {
  std::fill(std::begin(slot_min_), std::end(slot_min_), never);
  for (auto& l : lists_) l.next_ = l.prev_ = &l;
}

timer_wheel::~timer_wheel() noexcept {
  for (auto& head : lists_) {
    for (link* l = head.next_; l != &head;) {
      link* n = l->next_;
      timer& t = of(l);
      t.next_ = t.prev_ = nullptr;
      t.wheel_ = nullptr;
      t.list_ = unlinked;
      l = n;
    }
  }
}

void timer_wheel::push_back(uint32_t i, timer& t) noexcept {
  link& head = lists_[i];
  t.prev_ = head.prev_;
  t.next_ = &head;
  head.prev_->next_ = &t;
  head.prev_ = &t;
  t.list_ = i;
}

void timer_wheel::unlink(timer& t) noexcept {
  t.prev_->next_ = t.next_;
  t.next_->prev_ = t.prev_;
  t.next_ = t.prev_ = nullptr;
  uint32_t i = t.list_;
  t.list_ = unlinked;
  if (i < overflow_list && list_empty(i)) {
    bits_[i / slots][(i % slots) / 64] &= ~(uint64_t(1) << (i % 64));
    slot_min_[i] = never;
  } else if (i == overflow_list && list_empty(i)) {
    slot_min_[i] = never;
  }
}

void timer_wheel::splice_back(uint32_t to, uint32_t from) noexcept {
  if (list_empty(from)) return;
  for (link* l = lists_[from].next_; l != &lists_[from]; l = l->next_) of(l).list_ = to;
  link& a = lists_[to];
  link& b = lists_[from];
  b.next_->prev_ = a.prev_;
  a.prev_->next_ = b.next_;
  b.prev_->next_ = &a;
  a.prev_ = b.prev_;
  b.next_ = b.prev_ = &b;
}

void timer_wheel::place(timer& t) noexcept {
  uint64_t d = t.deadline_;
  uint64_t x = d ^ now_;
  if (x == 0) {  // only while cascading: due at the time being processed
    push_back(due_list, t);
    return;
  }
  if (x >= horizon_ms) {
    push_back(overflow_list, t);
    slot_min_[overflow_list] = std::min(slot_min_[overflow_list], d);
    return;
  }
  unsigned level = static_cast<unsigned>(std::bit_width(x) - 1) / level_bits;
  unsigned slot = static_cast<unsigned>(d >> (level * level_bits)) & (slots - 1);
  uint32_t i = level * slots + slot;
  push_back(i, t);
  bits_[level][slot / 64] |= uint64_t(1) << (slot % 64);
  slot_min_[i] = std::min(slot_min_[i], d);
}

void timer_wheel::arm(timer& t, uint64_t deadline_ms) noexcept {
  if (t.wheel_) {
    assert(t.wheel_ == this && "timer armed on another wheel");
    unlink(t);
  } else {
    t.wheel_ = this;
    ++size_;
  }
  t.deadline_ = deadline_ms;
  if (deadline_ms <= now_)
    push_back(pending_list, t);
  else
    place(t);
}

void timer_wheel::cancel(timer& t) noexcept {
  if (!t.wheel_) return;
  assert(t.wheel_ == this && "timer armed on another wheel");
  unlink(t);
  t.wheel_ = nullptr;
  --size_;
}

timer& timer_wheel::pop_due() noexcept {
  timer& t = of(lists_[due_list].next_);
  unlink(t);
  t.wheel_ = nullptr;
  --size_;
  return t;
}

uint64_t timer_wheel::next_deadline() const noexcept {
  if (!list_empty(pending_list) || !list_empty(due_list)) return now_;
  uint64_t best = slot_min_[overflow_list];
  for (unsigned level = 0; level < levels; ++level) {
    for (unsigned w = 0; w < slots / 64; ++w) {
      if (bits_[level][w]) {
        unsigned slot = w * 64 + static_cast<unsigned>(std::countr_zero(bits_[level][w]));
        best = std::min(best, slot_min_[level * slots + slot]);
        break;
      }
    }
  }
  return best;
}

bool timer_wheel::step(uint64_t limit) noexcept {
  // The earliest event: the first occupied slot of each level (slots of a level are in
  // time order, all at or after now_) and the overflow list. Levels are compared by their
  // bounds rather than taken lowest-first: after a jump now_ may sit inside a higher-level
  // slot whose bound is later than a lower level's deadlines, or earlier.
  uint32_t which = unlinked;
  uint64_t when = never;
  if (!list_empty(overflow_list)) {
    which = overflow_list;
    when = slot_min_[overflow_list];
  }
  for (unsigned level = levels; level-- > 0;) {
    for (unsigned w = 0; w < slots / 64; ++w) {
      if (bits_[level][w]) {
        unsigned slot = w * 64 + static_cast<unsigned>(std::countr_zero(bits_[level][w]));
        uint32_t i = level * slots + slot;
        // Ties go to the higher level, so a cascade that makes timers due at `when`
        // runs before the level-0 slot of the same millisecond is fired.
        if (slot_min_[i] < when) {
          which = i;
          when = slot_min_[i];
        }
        break;
      }
    }
  }
  if (which == unlinked || when > limit) return false;
  assert(when >= now_);
  now_ = when;
  if (which < slots) {  // level 0: one deadline per slot, all due now
    splice_back(due_list, which);
    bits_[0][which / 64] &= ~(uint64_t(1) << (which % 64));
    slot_min_[which] = never;
    return true;
  }
  // Cascade: take the slot's timers out and place them again relative to the new now_;
  // they land in a lower level (or the due list), never back in the same slot. The
  // overflow list may keep timers that are still beyond the horizon.
  link tmp;
  link& head = lists_[which];
  tmp.next_ = head.next_;
  tmp.prev_ = head.prev_;
  tmp.next_->prev_ = &tmp;
  tmp.prev_->next_ = &tmp;
  head.next_ = head.prev_ = &head;
  slot_min_[which] = never;
  if (which < overflow_list) bits_[which / slots][(which % slots) / 64] &= ~(uint64_t(1) << (which % 64));
  while (tmp.next_ != &tmp) {
    timer& t = of(tmp.next_);
    tmp.next_ = t.next_;
    t.next_->prev_ = &tmp;
    place(t);
  }
  return true;
}

}  // namespace tern::core
