#pragma once
// When to try a deferred message again, when to give up, when to warn the sender.
//
// Postfix's model, with a configured schedule instead of exponential back-off: after the
// n-th failed attempt the next one is retry[n-1] later (the last entry repeats), spread by
// +/- jitter so that messages deferred together (a long smarthost outage) do not all come
// back in the same second. A message older than max_lifetime at a deferral is expired
// (bounced with 4.4.7); the next attempt is never scheduled past the expiry time, so the
// final attempt happens at max_lifetime, not up to one retry interval later. A delay DSN is
// due once when the message is older than delay_warning (if set) and still not delivered.
//
// Pure: times in microseconds of wall clock (spool times are wall clock), injected rng.
#include <cstdint>
#include <vector>

#include "src/config/config.hh"
#include "src/queue/routing.hh"

namespace tern::queue {

struct retry_policy {
  std::vector<uint32_t> retry_s{60, 300, 900, 3600};
  uint32_t jitter_percent = 10;
  uint64_t max_lifetime_s = 5 * 86400;
  uint64_t delay_warning_s = 0;  // 0: off
  static retry_policy from(const config::queue_settings& q);
};

// The time of the next attempt after `attempts` (>= 1) failed attempts, at now_us, for a
// message that arrived at arrival_us: never later than its expiry.
uint64_t next_attempt_us(const retry_policy& p, uint32_t attempts, uint64_t now_us, uint64_t arrival_us, rng& r);

// Whether a message that arrived at arrival_us is past its lifetime at now_us (bounce the
// recipients still pending with 4.4.7 "delivery time expired").
bool expired(const retry_policy& p, uint64_t arrival_us, uint64_t now_us);

// Whether a delay DSN is due now (not sent yet: flags lack spool::status_delay_warned).
bool delay_warning_due(const retry_policy& p, uint64_t arrival_us, uint64_t now_us, uint8_t flags);

}  // namespace tern::queue
