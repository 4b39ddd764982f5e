#pragma once
// tern's configuration: one TOML file (docs/configuration.md documents every key).
// load() validates everything up front and reports the first problem as
// "FILE:LINE: key: problem"; unknown keys are errors, so typos do not pass silently.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "net/address.hh"

namespace tern::config {

struct listener {
  std::string address_text;  // as written, for logs
  net::address address;
  bool proxy_protocol = false;
  std::vector<net::cidr> trusted_proxies;
  uint32_t proxy_timeout_ms = 5000;
  uint32_t proxy_max_header = 4096;
  bool tls = false;
  bool auth = false;
  // A PROXY health check (v2 LOCAL, v2 UNSPEC/AF_UNIX, v1 UNKNOWN) has no client address:
  // the session sees the proxy's own. When false (the default) such a session may talk
  // SMTP but never relays on the strength of the proxy's address matching relay.networks.
  bool local_relay = false;
  // Accept a bare LF as the end of a command line (legacy clients). Default: refuse it
  // with 550 5.5.2 and close, like postfix's smtpd_forbid_bare_newline = reject.
  bool allow_bare_lf = false;
  int line = 0;  // where the [[listen]] table starts in the file, for messages
};

struct limits {
  uint64_t message_size = 10 * 1024 * 1024;  // bytes, SIZE= advertised
  uint32_t recipients = 1000;                // per message; more get 452 4.5.3
  uint32_t recipient_overshoot = 1000;       // 452s per message before each counts as an error
  uint32_t line_length = 2048;               // SMTP command line, incl. CRLF
  uint32_t errors = 20;                      // per session, then 421 and close
  uint32_t junk_commands = 100;              // NOOP/RSET/VRFY/HELP per session, then 421 and close
  uint32_t idle_timeout = 300;               // seconds without a complete command/chunk
  uint32_t session_timeout = 1800;           // seconds per connection in total
  uint32_t connections = 1024;               // per shard: session slots
  uint32_t output_buffer = 64 * 1024;        // unsent reply bytes at which input stops being read
  uint32_t input_buffer = 256 * 1024;        // unprocessed input bytes at which reading pauses
  uint32_t send_timeout = 300;               // seconds a send may make no progress
  uint64_t message_memory = 256ull << 20;    // per shard: bytes of buffered message data
  uint32_t shutdown_timeout = 5;             // seconds to finish sessions at stop
};

// Delivery (docs/configuration.md, "[[smarthost]]", "[[route]]", "[queue]", "[dns]").
enum class tls_policy : uint8_t { none, may, encrypt, verify };
enum class next_hop_protocol : uint8_t { smtp, lmtp };

// One next hop: a smarthost, or the host of a route.
struct next_hop {
  std::string host;          // an IP literal or a DNS name (as written, lower case)
  bool host_is_ip = false;
  uint16_t port = 25;
  uint32_t priority = 0;     // lower is tried first
  uint32_t weight = 1;       // among hosts of equal priority
  tls_policy tls = tls_policy::verify;
  bool tls_min_13 = true;    // tls_min_version "1.3" (default) or "1.2"
  std::string ca_file;       // empty: the system bundle
  std::string verify_name;   // empty: host (for MX: the MX host name)
  std::string auth_user;
  std::string auth_password_file;
  bool mx = false;           // use the MX records of host (a name), like postfix's relayhost without []
  std::string source_address;  // bind outbound connections to this IP (empty: the kernel's choice)
  std::string helo_name;       // EHLO name (empty: hostname)
  next_hop_protocol protocol = next_hop_protocol::smtp;
  int line = 0;
};

// Mail for `domains` goes to the route's hosts; routes with the same domain list form one
// destination whose hosts are tried by priority and weight, like the smarthosts.
struct route {
  std::vector<std::string> domains;  // lower case; ".example.com" also matches subdomains
  next_hop hop;
};

struct queue_settings {
  std::vector<uint32_t> retry_s{60, 300, 900, 3600};  // the last one repeats
  uint32_t max_lifetime_s = 5 * 86400;   // then bounce
  uint32_t delay_warning_s = 0;          // 0: off
  uint32_t concurrency = 20;             // connections per destination per shard
  uint32_t messages_per_connection = 100;
  uint32_t connection_idle_s = 5;        // an idle outbound connection is closed after this
  uint32_t jitter_percent = 10;          // retry times are spread by up to this share
  uint64_t bounce_size_limit = 50000;    // a bounce returns the whole original up to this size (RET unset)
  // Client timeouts (seconds), postfix's smtp_*_timeout defaults.
  uint32_t connect_timeout_s = 30;
  uint32_t greeting_timeout_s = 300;
  uint32_t helo_timeout_s = 300;
  uint32_t starttls_timeout_s = 300;
  uint32_t mail_timeout_s = 300;
  uint32_t rcpt_timeout_s = 300;
  uint32_t data_init_timeout_s = 120;
  uint32_t data_xfer_timeout_s = 180;
  uint32_t data_done_timeout_s = 600;
  uint32_t quit_timeout_s = 300;
};

struct dns_settings {
  std::vector<std::string> servers;  // "IP" or "IP:PORT"; empty: /etc/resolv.conf
  bool use_hosts = true;             // consult /etc/hosts first
  uint32_t timeout_ms = 5000;        // per query try
  uint32_t tries = 2;
};

// [ha]: VRRPv3 for a floating address (docs/configuration.md, "[ha]"; ha/).
struct ha_settings {
  bool enabled = false;               // true when the file has an [ha] table
  std::string interface;              // required: the interface VRRP runs on
  uint8_t vrid = 0;                   // required: 1..255
  uint8_t priority = 100;             // 1..255; 255 = address owner
  uint32_t advert_interval_ms = 1000; // 10ms..40.95s in 10 ms steps (centiseconds on the wire)
  std::vector<net::cidr> virtual_addresses;  // required, IPv4, at most 20
  bool preempt = true;
  uint32_t preempt_delay_ms = 0;      // up to 1000 s
  std::vector<net::address> unicast_peers;   // IPv4; empty: multicast 224.0.0.18
  bool dpdk = false;                  // backend = "dpdk" (default "kernel")
  std::string dpdk_args;              // EAL arguments; empty: derived from interface (see docs)
  bool use_vmac = false;              // a macvlan vrrp.<vrid> with 00:00:5e:00:01:<vrid> carries the addresses
  uint32_t garp_burst = 5;            // gratuitous ARPs per address on becoming master (1..100)
  uint32_t garp_refresh_ms = 60000;   // one more per address this often while master; 0 = off
  uint32_t health_priority_drop = 0;  // unhealthy: 0 = resign at once (priority-0 advert), N = lower by N
  uint32_t heartbeat_timeout_ms = 1000; // a shard whose loop has not turned for this long is stuck
  uint32_t address_lifetime_s = 5;    // virtual addresses expire unless renewed (each lifetime/5); 0 = permanent
  int line = 0;
};

struct config {
  std::string source = "(embedded default)";
  std::string hostname;
  uint32_t shards = 0;  // 0 = one per core
  struct {
    std::string dir = "var/spool";
    uint64_t segment_size = 64ull << 20;
    // false: the 250 is sent after the write without fdatasync. Dangerous: acknowledged
    // mail is lost on power loss or kernel crash (battery-backed or throw-away setups).
    bool fsync = true;
    uint64_t max_batch_bytes = 64ull << 20;  // a group-commit batch stops growing here
    // "zero": segments are written full of zeros ahead of use (appends overwrite, fdatasync
    // commits no metadata); "reserve": fallocate(KEEP_SIZE), the size grows per batch.
    bool prezero = true;
  } spool;
  std::vector<listener> listen;
  struct {
    std::vector<net::cidr> networks;
    std::vector<std::string> domains;  // lower case; ".example.com" also matches subdomains
  } relay;
  struct limits limits;
  struct {
    std::string cert, key;
  } tls;
  struct {
    uint32_t recv_buffers = 1024;      // provided-buffer ring entries per shard (power of 2)
    uint32_t recv_buffer_size = 16384;
    bool pin_shards = true;            // pin shard i to core i % ncpu
    uint32_t listen_backlog = 4096;    // listen(2) backlog per socket (the kernel caps it at somaxconn)
    uint32_t accept_resume = 0;        // free slots at which a paused accept resumes; 0 = connections / 16
    uint32_t ring_entries = 1024;      // io_uring submission queue entries per shard
    uint32_t buffer_keep = 64 * 1024;  // bytes a session slot's buffers keep between uses
    uint32_t idle_poll_us = 100;       // a shard polls its ring this long before sleeping (0: never)
  } tuning;
  std::string log_level = "info";
  std::vector<next_hop> smarthosts;
  std::vector<route> routes;
  queue_settings queue;
  dns_settings dns;
  ha_settings ha;
  // Not errors, but what the operator should know (--check-config prints them).
  std::vector<std::string> warnings;
};

// Outbound connection slots per shard: queue.concurrency for each destination (smarthosts
// as one, each distinct route domain list as one), at least 16, at most limits.connections.
uint32_t outbound_slots(const config& c) noexcept;
// File descriptors one shard can hold: inbound and outbound slots, listeners, spool
// segments and the rest (64).
uint64_t fds_per_shard(const config& c) noexcept;

// "30s", "5m", "2h", "5d", "250ms", or an integer (seconds). Returns milliseconds, or
// nullopt when the text is not a duration.
std::optional<uint64_t> parse_duration_ms(std::string_view text) noexcept;
// Whether `domain` (lower case) matches an entry of relay.domains / route.domains:
// "example.com" matches itself; ".example.com" matches its subdomains.
bool domain_matches(std::string_view domain, std::string_view pattern) noexcept;

// A DNS host name as RFC 1035 2.3.1 / RFC 1123 2.1 allow it: dot-separated labels of
// letters, digits and hyphens, 1 to 63 bytes each, not starting or ending with a hyphen,
// at most 253 bytes in all, no empty label (no leading, trailing or double dot).
bool valid_dns_name(std::string_view name) noexcept;

// The configuration used when ternd runs without --config.
extern const char* const embedded_default;

// Parse and validate. On error returns nullopt and sets err to "FILE:LINE: key: problem".
std::optional<config> load_file(const std::string& path, std::string& err);
std::optional<config> load_string(const std::string& text, const std::string& source_name,
                                  std::string& err);

}  // namespace tern::config
