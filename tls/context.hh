#pragma once
// tls/: TLS for tern, wolfSSL behind tern's own small interface.
//
// What it is for: a `context` holds one shard thread's TLS policy (client or server, minimum
// version, trust anchors, the server's certificate) and, on the client side, the small
// per-destination session cache used for TLS 1.3 resumption. A `tls::transport`
// (tls/transport.hh) is one connection; it implements net::transport, and wolfSSL never
// touches a socket: the ring does all socket I/O and wolfSSL only sees memory.
//
// Why everything is set explicitly: wolfSSL's defaults are unsafe. Measured on Debian 12's
// 5.5.4, a client allowing TLS 1.2 with VERIFY_PEER still accepted anonymous DH
// (ADH-AES128-SHA), NULL and RC4 suites, and a TLS 1.3-only client accepted the
// integrity-only TLS13-SHA256-SHA256. So every context sets an AEAD-only cipher list, the
// key-share groups (X25519, then P-256: the default key share is P-256 after P-521, the slow
// path), the minimum version and the verification mode.
//
// Trust: the CA file and the server key are trusted configuration. Everything from the
// peer is untrusted and handled by wolfSSL; a failure is a status plus a reason text.
// Threads: a context and its transports belong to one thread; nothing here is shared
// between threads except wolfSSL's own global state (library_init).
//
// Nothing outside tls/ includes wolfSSL headers: these forward declarations are the seam.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>

struct WOLFSSL_CTX;
struct WOLFSSL_SESSION;

namespace tern::tls {

// Once per process, before any context; false (with a reason) when wolfSSL cannot start.
bool library_init(std::string& err);
void library_cleanup();
// Call when a shard thread exits: frees the thread's ECC fixed-point cache (FP_ECC keeps a
// per-thread table that is otherwise leaked at thread exit).
void thread_cleanup();

// The key that seals TLS 1.3 session tickets, made once per process and shared by the
// server contexts of all shards: a ticket issued by one shard then resumes on any other
// (with wolfSSL's default, each context has its own key and a client landing on another
// shard gets a full handshake). Read-only after creation. Not rotated: a restart makes a
// new one, which also ends every outstanding ticket.
class ticket_key {
 public:
  // nullptr and a reason when the kernel's random source fails.
  static std::shared_ptr<const ticket_key> create(std::string& err);
  unsigned char name[16];
  unsigned char key[32];
};

enum class role : uint8_t { client, server };
enum class version : uint8_t { v1_2, v1_3 };
// "1.2" or "1.3"; false for anything else.
bool parse_version(std::string_view s, version& out);

struct context_options {
  role side = role::client;
  version min_version = version::v1_3;
  // Trust anchors for verifying the peer (client). Empty: none (encrypt-only use).
  std::string ca_file = "/etc/ssl/certs/ca-certificates.crt";
  // The server's certificate chain and key (PEM); required for role::server.
  std::string cert_file;
  std::string key_file;
  // Client: destinations whose latest session (ticket) is remembered; the oldest entry
  // goes first when full.
  size_t session_cache_max = 1024;
  // Application bytes a transport holds while its handshake is still running; beyond it
  // on_send fails (the session should not write before the handshake anyway).
  size_t pending_app_max = 64 * 1024;
  // Server: issue TLS 1.3 session tickets so that clients (tern itself) resume.
  bool session_tickets = true;
  // Server: the process-wide ticket key (ticket_key::create); null: wolfSSL's own key for
  // this context only.
  std::shared_ptr<const ticket_key> tickets;
};

// Counted by the transports of this context (one thread: plain integers; their own cache
// line, since other threads may read them).
struct alignas(64) counters {
  uint64_t handshakes = 0;  // completed
  uint64_t resumed = 0;     // of those, resumed from a ticket
  uint64_t full = 0;        // of those, full handshakes
  uint64_t failed = 0;      // handshakes that ended in an error
};

class context {
 public:
  // nullptr and a reason on a configuration error (bad file, bad key, unusable options).
  static std::unique_ptr<context> create(const context_options& o, std::string& err);
  ~context();
  context(const context&) = delete;
  context& operator=(const context&) = delete;

  const context_options& options() const noexcept { return opts_; }
  const counters& stats() const noexcept { return stats_; }
  size_t cached_sessions() const noexcept { return sessions_.size(); }

  // For tls::transport only.
  WOLFSSL_CTX* native() const noexcept { return ctx_; }
  counters& mutable_stats() noexcept { return stats_; }
  // The cached session for `dest`, owned by the cache; nullptr when none.
  WOLFSSL_SESSION* find_session(std::string_view dest) const;
  // Takes ownership of `s` (one reference), replacing any older one for `dest`.
  void store_session(std::string_view dest, WOLFSSL_SESSION* s);
  void forget_session(std::string_view dest);

 private:
  context() = default;
  struct entry {
    WOLFSSL_SESSION* session;
    uint64_t stamp;  // insertion order, for eviction
  };
  context_options opts_;
  WOLFSSL_CTX* ctx_ = nullptr;
  counters stats_;
  std::unordered_map<std::string, entry> sessions_;
  uint64_t stamp_ = 0;
};

}  // namespace tern::tls
