#pragma once
// tern's configuration: one TOML file (docs/configuration.md documents every key).
// load() validates everything up front and reports the first problem as
// "FILE:LINE: key: problem"; unknown keys are errors, so typos do not pass silently.
#include <cstdint>
#include <optional>
#include <string>
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
};

struct limits {
  uint64_t message_size = 10 * 1024 * 1024;  // bytes, SIZE= advertised
  uint32_t recipients = 1000;                // per message
  uint32_t line_length = 2048;               // SMTP command line, incl. CRLF
  uint32_t errors = 20;                      // per session, then 421 and close
  uint32_t idle_timeout = 300;               // seconds without a complete command/chunk
  uint32_t session_timeout = 1800;           // seconds per connection in total
  uint32_t connections = 1024;               // per shard: session slots
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
  } tuning;
  std::string log_level = "info";
};

// The configuration used when ternd runs without --config.
extern const char* const embedded_default;

// Parse and validate. On error returns nullopt and sets err to "FILE:LINE: key: problem".
std::optional<config> load_file(const std::string& path, std::string& err);
std::optional<config> load_string(const std::string& text, const std::string& source_name,
                                  std::string& err);

}  // namespace tern::config
