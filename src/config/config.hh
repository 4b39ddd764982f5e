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
  uint32_t output_buffer = 64 * 1024;        // unsent reply bytes at which input stops being read
  uint32_t input_buffer = 256 * 1024;        // unprocessed input bytes at which reading pauses
  uint32_t send_timeout = 300;               // seconds a send may make no progress
  uint64_t message_memory = 256ull << 20;    // per shard: bytes of buffered message data
  uint32_t shutdown_timeout = 5;             // seconds to finish sessions at stop
};

struct config {
  std::string source = "(embedded default)";
  std::string hostname;
  uint32_t shards = 0;  // 0 = one per core
  struct {
    std::string dir = "var/spool";
    uint64_t segment_size = 64ull << 20;
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
