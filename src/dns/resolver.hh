#pragma once
// The DNS resolver of delivery: smarthost and route host names to addresses (A and AAAA),
// and mail domains to their MX hosts with those hosts' addresses (RFC 5321 5.1), without
// ever blocking a shard thread.
//
// One resolver per process runs c-ares on a thread of its own with a poll(2) loop
// (docs/dns.md says why not on the shards' rings). Shards call lookup(), which queues the
// request and wakes that thread; the answer comes back through a plain callback on the
// resolver thread, which posts it to the asking shard's inbox. Answers are cached by TTL
// (clamped), failures that say "this name/type does not exist" for a fixed negative TTL;
// concurrent lookups of the same name share one query.
//
// What it trusts: /etc/resolv.conf, the hosts file and the configured servers to be the
// operator's (a recursive resolver the operator chose). Its callers, to keep their ctx
// alive until their callback has run.
// What it does not trust: DNS answers. Every packet is parsed with bounds checks (c-ares'
// parsers, and our own walk of the answer section for TTLs); names are length- and
// character-checked before they are asked for; the number of addresses per name, of MX
// hosts per domain, of outstanding lookups and of cache entries are all capped, so a
// hostile or broken zone cannot make the resolver allocate without bound. No DNSSEC: an
// answer is as good as the path to the configured resolver.
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "net/address.hh"

namespace tern::dns {

// What a lookup ended with. Delivery acts on these (docs/dns.md, "Statuses"):
// only null_mx and bad_name are permanent; everything else defers the message.
enum class status : uint8_t {
  ok = 0,        // at least one address (address) / one MX host with an address (mx)
  nxdomain = 1,  // the name does not exist (RCODE 3)
  nodata = 2,    // the name exists but has no record of the type asked; for mx: no MX
                 // host has an address (each host's own status says why)
  null_mx = 3,   // RFC 7505: the domain says it accepts no mail (MX 0 "."). Permanent.
  servfail = 4,  // the server could not answer (RCODE 2), after every try
  timeout = 5,   // no answer within query_timeout x tries
  refused = 6,   // the server refused to answer (RCODE 5)
  error = 7,     // anything else: malformed answer, no servers, out of memory, ...
  bad_name = 8,  // not a valid host name (length, characters). Permanent: fix the config.
  shutdown = 9,  // the resolver stopped before the answer came
};
// "ok", "nxdomain", ...: for log lines and metrics labels.
const char* status_name(status s) noexcept;
// True for statuses that retrying cannot change (null_mx, bad_name).
bool is_permanent(status s) noexcept;

enum class kind : uint8_t {
  address = 0,  // A and AAAA of the name itself (a smarthost, a route host)
  mx = 1,       // MX of a mail domain, then A and AAAA of every MX host
};

// One address with the seconds it may still be used (its TTL, clamped, minus its age in
// the cache). Port 0: the caller sets the port it connects to.
struct address_ttl {
  net::address addr;
  uint32_t ttl = 0;
};

struct mx_host {
  std::string name;  // lower case, no trailing dot
  uint16_t preference = 0;
  status st = status::ok;  // the host's address lookup
  std::vector<address_ttl> addresses;
};

struct result {
  kind k = kind::address;
  std::string name;  // as normalised (lower case, no trailing dot), or the literal
  status st = status::error;
  // One line for the log: what was asked and what came back ("mx.example: MX: 2 hosts,
  // 3 addresses", "nx.example: A/AAAA: name does not exist (NXDOMAIN)").
  std::string text;
  // kind::address: every A and AAAA (IPv6 first is NOT implied; A before AAAA).
  std::vector<address_ttl> addresses;
  // kind::mx: the MX hosts by preference (ties in random order, RFC 5321 5.1), each with
  // its addresses. Filled for ok and for nodata-because-no-host-has-an-address.
  std::vector<mx_host> mx;
  // kind::mx: the domain has no MX records, so mx holds the domain itself at preference
  // 0 (RFC 5321 5.1 implicit MX).
  bool implicit_mx = false;
  // How long this answer may be reused (the minimum over its parts), in seconds.
  uint32_t ttl = 0;
};

// Runs on the resolver thread (or, when lookup() returns submit::done, on the caller's
// thread before lookup() returns). It must not block and must not call stop(); it may call lookup().
// It may move from r. Not std::function: one pointer and one ctx, no allocation.
using callback = void (*)(void* ctx, result&& r);

// What lookup() did with a request.
enum class submit : uint8_t {
  queued = 0,   // the callback will run on the resolver thread, exactly once
  done = 1,     // an IP literal, or a name that is not a host name (bad_name): the
                // callback already ran, on this thread, before lookup() returned
  full = 2,     // max_outstanding lookups are in flight: not queued, no callback
  stopped = 3,  // the resolver is not running: not queued, no callback
};

using clock_fn = std::chrono::steady_clock::time_point (*)();

struct options {
  // DNS servers as "ip", "ip:port" or "[ipv6]:port", tried in order. Empty: the
  // nameservers of /etc/resolv.conf (as the system resolver would).
  std::vector<std::string> servers;
  // Where the servers, "options timeout: attempts:" (used when the two below are 0)
  // come from; empty is c-ares' default, /etc/resolv.conf.
  std::string resolv_conf;
  // The port of servers named without one (every resolv.conf server: its syntax has no
  // port). 53 but for tests.
  uint16_t default_port = 53;
  // Answer address lookups from the hosts file first, like "hosts: files dns".
  bool use_hosts = true;
  std::string hosts_file = "/etc/hosts";
  // Per-try timeout (c-ares doubles it on each round over the servers) and the number
  // of tries. 0: take them from resolv.conf's "options timeout: attempts:" or c-ares'.
  std::chrono::milliseconds query_timeout{3000};
  unsigned tries = 2;
  // Lookups accepted and not yet answered; beyond this lookup() returns submit::full.
  size_t max_outstanding = 1024;
  // Cache entries (one per name and kind). When full, expired entries go first, then
  // the entry closest to expiry.
  size_t cache_entries = 4096;
  // Clamp every positive TTL into [min_ttl, max_ttl] seconds. min_ttl keeps a TTL of 0
  // from turning every delivery into a query; max_ttl lets a changed smarthost address
  // be picked up within the hour whatever the zone says.
  uint32_t min_ttl = 5;
  uint32_t max_ttl = 3600;
  // How long NXDOMAIN and NODATA are cached, in seconds. servfail, timeout and refused
  // are never cached: the next delivery attempt asks again.
  uint32_t negative_ttl = 60;
  // Caps against hostile zones: MX hosts kept per domain (the most preferred), and
  // addresses kept per name and type.
  size_t max_mx_hosts = 10;
  size_t max_addresses = 16;
  // The cache's clock; nullptr is std::chrono::steady_clock::now. Tests inject one to
  // expire entries without sleeping.
  clock_fn clock = nullptr;
};

// Counters, readable from any thread at any time (each is exact; the set is not a
// snapshot of one instant).
struct stats {
  uint64_t lookups = 0;      // accepted by lookup() (literals included)
  uint64_t refused_full = 0; // refused with submit::full
  uint64_t cache_hits = 0;   // cache lookups answered from the cache (MX hosts included)
  uint64_t cache_misses = 0;
  uint64_t hosts_hits = 0;   // answered from the hosts file
  uint64_t coalesced = 0;    // joined a query already in flight for the same name
  uint64_t queries = 0;      // DNS queries sent (A, AAAA and MX each count one)
  uint64_t evictions = 0;    // live cache entries dropped because the cache was full
  uint64_t outstanding = 0;  // lookups accepted and not yet answered, now
  uint64_t cache_size = 0;   // entries, now
};

class resolver {
 public:
  resolver();
  ~resolver();  // stop()s
  resolver(const resolver&) = delete;
  resolver& operator=(const resolver&) = delete;

  // Set up c-ares (resolv.conf, servers override, timeouts) and start the thread. On
  // failure returns false with err saying what failed (which option, which c-ares call);
  // nothing is left running. Not thread-safe; call once (again only after stop()).
  bool start(const options& o, std::string& err);

  // Stop the thread. Every lookup still queued or in flight gets its callback, with
  // status::shutdown, on the resolver thread before stop() returns; lookups made after
  // stop() began return submit::stopped (lookup() may race with stop(); not with the
  // destructor). Counters stay readable. Idempotent. Not from a callback.
  void stop();

  // Any thread. Resolve name (a host name, or an IP literal "192.0.2.1", "2001:db8::1",
  // "[2001:db8::1]") for kind k, then call cb(ctx, result) exactly once, unless the
  // return value says no callback will come (full, stopped). Never blocks on the
  // network: takes a mutex for the hand-off and writes an eventfd.
  submit lookup(std::string_view name, kind k, callback cb, void* ctx);

  stats counters() const noexcept;

  struct impl;

 private:
  std::unique_ptr<impl> impl_;
};

// Exposed for tests. Lower-case name and strip one trailing dot; false if it is not a
// host name we will ask DNS for (empty, longer than 253, a label empty or longer than 63,
// a character outside [A-Za-z0-9-_]).
bool normalise_name(std::string_view in, std::string& out);

// Exposed for tests. The smallest TTL of the answer-section records of type `type` in a
// DNS message; false when there is none or the message is malformed (bounds-checked).
bool min_answer_ttl(const unsigned char* msg, size_t len, uint16_t type, uint32_t& ttl) noexcept;

}  // namespace tern::dns
