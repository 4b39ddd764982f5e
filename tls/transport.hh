#pragma once
// One TLS connection as a net::transport (tls/context.hh says what tls/ is for).
//
// wolfSSL is driven through memory I/O callbacks: on_recv hands it the ciphertext the ring
// read, plaintext goes to the byte_sink, and whatever wolfSSL wants to send (handshake,
// alerts, tickets) is appended to the caller's wire_out, which the ring writes. on_send
// encrypts application bytes into wire_out. No socket, no blocking, no exceptions.
//
// Buffering is bounded: ciphertext is consumed as wolfSSL parses it (wolfSSL itself holds
// at most one partial record), and application bytes handed over before the handshake
// completes are held up to context_options::pending_app_max.
//
// After an error, wire_out may hold an alert for the peer: send it, then close.
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "net/transport.hh"
#include "tls/context.hh"

struct WOLFSSL;

namespace tern::tls {

enum class verify_policy : uint8_t {
  verify,   // the chain must lead to a trusted CA and the certificate must carry the name
  encrypt,  // TLS without authentication (opportunistic SMTP): still encrypted, AEAD only
};

// Client side, per connection.
struct peer_options {
  verify_policy policy = verify_policy::verify;
  std::string sni;          // server_name sent; empty: none (never an IP literal, RFC 6066)
  // Name the certificate must carry (DNS subjectAltName, else CN); an IP literal is matched
  // against iPAddress subjectAltNames. Empty: the sni.
  std::string verify_name;
  // Session cache key (e.g. "mx.example:25"); empty: no resumption. The policy and the
  // name verified are added to it, so a session only resumes under the same checks.
  std::string destination;
};

class transport final : public net::transport {
 public:
  // nullptr and a reason when wolfSSL cannot create the connection (out of memory, or a
  // context of the wrong role).
  static std::unique_ptr<transport> client(context& ctx, const peer_options& p, std::string& err);
  static std::unique_ptr<transport> server(context& ctx, std::string& err);
  ~transport() override;
  transport(const transport&) = delete;
  transport& operator=(const transport&) = delete;

  // Client: starts the handshake, appending the ClientHello to wire_out.
  net::transport_status start(std::string& wire_out);
  net::transport_status on_recv(const char* p, size_t n, net::byte_sink& app,
                                std::string& wire_out) override;
  net::transport_status on_send(std::string& app_out, std::string& wire_out) override;
  // Sends close_notify (appended to wire_out).
  net::transport_status shutdown(std::string& wire_out);
  size_t buffered() const noexcept override { return pending_app_.size(); }
  bool secure() const noexcept override { return done_; }
  std::string_view name() const noexcept override { return "tls"; }

  // After the handshake.
  bool handshake_done() const noexcept { return done_; }
  bool failed() const noexcept { return failed_; }
  bool resumed() const noexcept { return resumed_; }
  // The peer's certificate chain and name were verified (always false under `encrypt`).
  bool verified() const noexcept { return verified_; }
  std::string_view protocol() const noexcept { return protocol_; }  // "TLSv1.3"
  std::string_view cipher() const noexcept { return cipher_; }      // "TLS13-AES128-GCM-SHA256"
  std::string_view peer_cn() const noexcept { return peer_cn_; }    // empty when resumed
  // Why the transport failed, e.g. "certificate verify failed: hostname mismatch".
  std::string_view error() const noexcept { return error_; }

 private:
  transport(context& ctx, WOLFSSL* ssl, bool client) : ctx_(ctx), ssl_(ssl), client_(client) {}
  static int recv_cb(WOLFSSL* ssl, char* buf, int sz, void* self);
  static int send_cb(WOLFSSL* ssl, char* buf, int sz, void* self);
  net::transport_status advance(net::byte_sink* app);
  net::transport_status fail(int ret);
  void on_handshake_done();
  void maybe_store_ticket();
  net::transport_status flush_pending();

  context& ctx_;
  WOLFSSL* ssl_;
  bool client_;
  bool done_ = false;
  bool failed_ = false;
  bool resumed_ = false;
  bool verified_ = false;
  bool ticket_stored_ = false;
  verify_policy policy_ = verify_policy::verify;
  // Set only during a call: the ciphertext wolfSSL may read, where its output goes.
  const char* in_ = nullptr;
  size_t in_len_ = 0;
  std::string* wire_ = nullptr;
  std::string pending_app_;
  std::string destination_;  // the cache key: destination, policy, name verified
  uint64_t ticket_seen_ = 0;  // hash of the ticket at handshake time (resumed connections)
  std::string protocol_;
  std::string cipher_;
  std::string peer_cn_;
  std::string error_;
};

}  // namespace tern::tls
