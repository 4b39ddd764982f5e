#include "src/queue/routing.hh"

#include <gtest/gtest.h>

#include <map>

#include "spool/record.hh"
#include "src/queue/schedule.hh"

using namespace tern;
using namespace tern::queue;

namespace {
config::config load(const std::string& extra) {
  std::string err;
  auto c = config::load_string("[[listen]]\naddress = \"127.0.0.1:0\"\n" + extra, "t.toml", err);
  EXPECT_TRUE(c) << err;
  return c ? *c : config::config{};
}

const char* two_tier = R"(
[[smarthost]]
host = "a.example"
priority = 10
weight = 1
[[smarthost]]
host = "b.example"
priority = 10
weight = 3
[[smarthost]]
host = "backup.example"
priority = 20
[[route]]
domains = ["internal.example", ".corp.example"]
host = "10.0.0.1"
tls = "none"
[[route]]
domains = ["internal.example", ".corp.example"]
host = "10.0.0.2"
tls = "none"
priority = 5
[[route]]
domains = ["mbox.example"]
host = "lmtp.example"
protocol = "lmtp"
tls = "may"
)";
}  // namespace

TEST(Routing, RoutesBeforeSmarthostsAndGroupsEqualDomainLists) {
  routing r(load(two_tier));
  ASSERT_EQ(r.size(), 3u);
  uint32_t internal = r.route_for("u@internal.example");
  EXPECT_EQ(r.route_for("u@x.CORP.example"), internal) << "case-insensitive, subdomain pattern";
  EXPECT_EQ(r[internal].hops.size(), 2u) << "two [[route]] tables with one domain list: one destination";
  uint32_t mbox = r.route_for("u@mbox.example");
  EXPECT_NE(mbox, internal);
  EXPECT_EQ(r[mbox].hops[0].protocol, config::next_hop_protocol::lmtp);
  uint32_t sh = r.route_for("u@elsewhere.example");
  EXPECT_TRUE(r[sh].smarthost);
  EXPECT_EQ(r.route_for("u@corp.example"), sh) << "\".corp.example\" matches subdomains only";
  EXPECT_EQ(r.route_for("no-domain"), sh);
  EXPECT_EQ(r.route_for("\"a@b\"@mbox.example"), mbox) << "the domain is after the last '@'";
}

TEST(Routing, NoSmarthostMeansNoDestination) {
  routing r(load("[[route]]\ndomains = [\"a.example\"]\nhost = \"h.example\"\n"));
  EXPECT_NE(r.route_for("x@a.example"), no_destination);
  EXPECT_EQ(r.route_for("x@b.example"), no_destination);
  routing none(load(""));
  EXPECT_EQ(none.route_for("x@b.example"), no_destination);
}

TEST(Routing, PriorityThenWeight) {
  routing r(load(two_tier));
  uint32_t sh = r.route_for("u@elsewhere.example");
  rng g(42);
  std::map<int, int> seen;
  for (int i = 0; i < 4000; ++i) ++seen[r.pick_host(sh, 0, g)];
  EXPECT_EQ(seen.count(2), 0u) << "the backup is not used while a priority-10 host is up";
  // weight 1 : 3 -> about 1000 : 3000
  EXPECT_GT(seen[0], 800);
  EXPECT_LT(seen[0], 1200);
  EXPECT_GT(seen[1], 2800);
}

TEST(Routing, FailedHostsAreSkippedAtOnceAndComeBack) {
  routing r(load(two_tier));
  uint32_t sh = r.route_for("u@elsewhere.example");
  rng g(7);
  r.host_failed(sh, 0, 1000, 60000, 3600000);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(r.pick_host(sh, 1000, g), 1);
  r.host_failed(sh, 1, 1000, 60000, 3600000);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(r.pick_host(sh, 1000, g), 2) << "the next priority at once";
  r.host_failed(sh, 2, 1000, 60000, 3600000);
  EXPECT_EQ(r.pick_host(sh, 1000, g), -1);
  EXPECT_EQ(r.next_up_ms(sh), 61000u);
  EXPECT_NE(r.pick_host(sh, 61000, g), -1);
  // Back-off doubles with consecutive failures, up to the cap, and resets on success.
  r.host_failed(sh, 0, 100000, 60000, 200000);
  EXPECT_EQ(r[sh].down_until_ms[0], 100000u + 120000u);
  r.host_failed(sh, 0, 100000, 60000, 200000);
  EXPECT_EQ(r[sh].down_until_ms[0], 100000u + 200000u);
  r.host_ok(sh, 0);
  EXPECT_EQ(r[sh].down_until_ms[0], 0u);
  EXPECT_EQ(r[sh].failures[0], 0u);
}

TEST(Schedule, RetryScheduleLastRepeatsWithBoundedJitter) {
  retry_policy p;
  p.retry_s = {60, 300, 3600};
  p.jitter_percent = 10;
  p.max_lifetime_s = 5 * 86400;
  rng g(1);
  const uint64_t s = 1000000, now = 1000 * s;
  for (int i = 0; i < 1000; ++i) {
    uint64_t a1 = next_attempt_us(p, 1, now, now, g) - now;
    EXPECT_GE(a1, 54 * s);
    EXPECT_LE(a1, 66 * s);
    uint64_t a9 = next_attempt_us(p, 9, now, now, g) - now;
    EXPECT_GE(a9, 3240 * s);
    EXPECT_LE(a9, 3960 * s);
  }
  p.jitter_percent = 0;
  EXPECT_EQ(next_attempt_us(p, 2, now, now, g), now + 300 * s);
  // Spread: 1000 messages deferred at once do not come back in the same second.
  p.jitter_percent = 10;
  std::map<uint64_t, int> per_second;
  for (int i = 0; i < 1000; ++i) ++per_second[next_attempt_us(p, 3, now, now, g) / s];
  int worst = 0;
  for (auto& [sec, n] : per_second) worst = std::max(worst, n);
  EXPECT_LT(worst, 20);
}

TEST(Schedule, NeverPastExpiryAndExpiresOnTime) {
  retry_policy p;
  p.retry_s = {3600};
  p.jitter_percent = 0;
  p.max_lifetime_s = 7200;
  rng g(3);
  const uint64_t s = 1000000, arrival = 5000 * s;
  EXPECT_EQ(next_attempt_us(p, 1, arrival + 6000 * s, arrival, g), arrival + 7200 * s)
      << "the last attempt happens at the lifetime, not an interval later";
  EXPECT_FALSE(expired(p, arrival, arrival + 7199 * s));
  EXPECT_TRUE(expired(p, arrival, arrival + 7200 * s));
}

TEST(Schedule, DelayWarningOnceWhenConfigured) {
  retry_policy p;
  const uint64_t s = 1000000;
  EXPECT_FALSE(delay_warning_due(p, 0, 1000000 * s, 0)) << "off by default";
  p.delay_warning_s = 4 * 3600;
  EXPECT_FALSE(delay_warning_due(p, 0, 4 * 3600 * s - 1, 0));
  EXPECT_TRUE(delay_warning_due(p, 0, 4 * 3600 * s, 0));
  EXPECT_FALSE(delay_warning_due(p, 0, 5 * 3600 * s, spool::status_delay_warned));
}
