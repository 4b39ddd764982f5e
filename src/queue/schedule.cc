#include "src/queue/schedule.hh"

#include <algorithm>

#include "spool/record.hh"

namespace tern::queue {

retry_policy retry_policy::from(const config::queue_settings& q) {
  retry_policy p;
  p.retry_s = q.retry_s;
  p.jitter_percent = q.jitter_percent;
  p.max_lifetime_s = q.max_lifetime_s;
  p.delay_warning_s = q.delay_warning_s;
  return p;
}

uint64_t next_attempt_us(const retry_policy& p, uint32_t attempts, uint64_t now_us, uint64_t arrival_us, rng& r) {
  uint32_t n = std::max<uint32_t>(attempts, 1);
  uint64_t base_s = p.retry_s.empty() ? 300 : p.retry_s[std::min<size_t>(n - 1, p.retry_s.size() - 1)];
  uint64_t base_us = base_s * 1000000;
  uint64_t spread = base_us * std::min<uint32_t>(p.jitter_percent, 50) / 100;
  // Uniform in [base - spread, base + spread].
  uint64_t delay = base_us - spread + (spread ? r.below(2 * spread + 1) : 0);
  uint64_t at = now_us + delay;
  uint64_t expiry = arrival_us + p.max_lifetime_s * 1000000;
  if (expiry > now_us) at = std::min(at, expiry);
  return at;
}

bool expired(const retry_policy& p, uint64_t arrival_us, uint64_t now_us) {
  return now_us >= arrival_us + p.max_lifetime_s * 1000000;
}

bool delay_warning_due(const retry_policy& p, uint64_t arrival_us, uint64_t now_us, uint8_t flags) {
  return p.delay_warning_s && !(flags & spool::status_delay_warned) &&
         now_us >= arrival_us + p.delay_warning_s * 1000000;
}

}  // namespace tern::queue
