#pragma once
// Where a recipient's mail goes: the destinations built from [[route]] and [[smarthost]]
// (docs/configuration.md), and the choice of host inside a destination.
//
// A destination is a group of next hops tried by priority (lower first) and by weight
// among equal priorities: all smarthosts form one destination, and the routes with the
// same domain list form one each. A recipient domain is matched against the routes first
// (first route in file order whose list matches), then falls to the smarthosts; with no
// smarthost it has no destination and its mail stays queued (deferred: no route).
//
// Host state: a host that failed (connection refused, timeout, TLS failure, 4xx greeting)
// is marked down until a back-off passes, and the next host is tried at once.
//
// Pure: no I/O, no clock (times are passed in), randomness from an injected generator so
// that tests are deterministic. Trusts the validated config; recipient domains are
// untrusted bytes (compared after lower-casing, never parsed further).
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "src/config/config.hh"

namespace tern::queue {

// xorshift64*: a small, seedable generator (jitter, weighted choice). Not cryptographic.
class rng {
 public:
  explicit rng(uint64_t seed) noexcept : s_(seed ? seed : 0x9E3779B97F4A7C15ull) {}
  uint64_t next() noexcept {
    s_ ^= s_ >> 12;
    s_ ^= s_ << 25;
    s_ ^= s_ >> 27;
    return s_ * 0x2545F4914F6CDD1Dull;
  }
  // Uniform in [0, n) (n > 0).
  uint64_t below(uint64_t n) noexcept { return next() % n; }

 private:
  uint64_t s_;
};

inline constexpr uint32_t no_destination = UINT32_MAX;

struct destination {
  std::string name;   // for logs: "smarthost" or "route:example.com,..."
  bool smarthost = false;
  std::vector<config::next_hop> hops;
  // Per-host state, indexed like hops.
  std::vector<uint64_t> down_until_ms;
  std::vector<uint32_t> failures;  // consecutive failures (back-off grows with them)
};

class routing {
 public:
  explicit routing(const config::config& cfg);
  // The destination for a recipient address (its domain after the last '@'), or
  // no_destination when no route matches and there is no smarthost.
  uint32_t route_for(std::string_view address) const;
  size_t size() const noexcept { return dest_.size(); }
  destination& operator[](uint32_t i) noexcept { return dest_[i]; }
  const destination& operator[](uint32_t i) const noexcept { return dest_[i]; }

  // The host to try next in destination d at now_ms: the lowest priority that has a host
  // not down, a weighted choice among those. Returns -1 when every host is down (the
  // destination waits for the earliest down_until_ms: see next_up_ms).
  int pick_host(uint32_t d, uint64_t now_ms, rng& r) const;
  uint64_t next_up_ms(uint32_t d) const;
  // A host failed: it is down for base_ms x 2^(failures-1), at most max_ms.
  void host_failed(uint32_t d, int host, uint64_t now_ms, uint64_t base_ms, uint64_t max_ms);
  void host_ok(uint32_t d, int host);

 private:
  std::vector<destination> dest_;
  // (domain pattern, destination) in the order the routes were written.
  std::vector<std::pair<std::string, uint32_t>> domain_rules_;
  uint32_t smarthost_ = no_destination;
};

}  // namespace tern::queue
