#include "tls/transport.hh"

#include <wolfssl/options.h>
#include <wolfssl/error-ssl.h>
#include <wolfssl/ssl.h>
#include <wolfssl/wolfcrypt/error-crypt.h>
#include <wolfssl/wolfio.h>

#include <algorithm>
#include <climits>
#include <cstring>

namespace tern::tls {

using net::transport_status;

namespace {

const char* alert_name(int code) {
  switch (code) {
    case 10: return "unexpected_message";
    case 20: return "bad_record_mac";
    case 40: return "handshake_failure";
    case 42: return "bad_certificate";
    case 43: return "unsupported_certificate";
    case 44: return "certificate_revoked";
    case 45: return "certificate_expired";
    case 46: return "certificate_unknown";
    case 47: return "illegal_parameter";
    case 48: return "unknown_ca";
    case 50: return "decode_error";
    case 51: return "decrypt_error";
    case 70: return "protocol_version";
    case 71: return "insufficient_security";
    case 80: return "internal_error";
    case 109: return "missing_extension";
    case 112: return "unrecognized_name";
    default: return "alert";
  }
}

// Why a handshake or record failed, in words an operator can act on. The hostname check
// surfaces only in wolfSSL_get_error (DOMAIN_NAME_MISMATCH): wolfSSL_get_verify_result
// still says 0 then (and it exists only in OPENSSL_EXTRA builds), so the error code is
// what is mapped.
std::string reason(WOLFSSL* ssl, int e) {
  switch (e) {
    case DOMAIN_NAME_MISMATCH: return "certificate verify failed: hostname mismatch";
    case ASN_AFTER_DATE_E: return "certificate verify failed: expired";
    case ASN_BEFORE_DATE_E: return "certificate verify failed: not yet valid";
    case ASN_NO_SIGNER_E: return "certificate verify failed: unknown CA";
    case ASN_SELF_SIGNED_E: return "certificate verify failed: self-signed";
    case ASN_SIG_CONFIRM_E: return "certificate verify failed: bad signature";
    case VERSION_ERROR: return "protocol version";
    case MATCH_SUITE_ERROR: return "no shared cipher suite";
    case FATAL_ERROR: {
      WOLFSSL_ALERT_HISTORY h{};
      wolfSSL_get_alert_history(ssl, &h);
      return std::string("peer sent alert ") + alert_name(h.last_rx.code) + " (" +
             std::to_string(h.last_rx.code) + ")";
    }
    default: break;
  }
  char buf[WOLFSSL_MAX_ERROR_SZ];
  wolfSSL_ERR_error_string_n(static_cast<unsigned long>(e), buf, sizeof buf);
  return "tls error " + std::to_string(e) + ": " + buf;
}

// FNV-1a over the current ticket; 0 when there is none.
uint64_t ticket_hash(WOLFSSL* ssl) {
  unsigned char buf[2048];
  word32 sz = sizeof buf;
  if (wolfSSL_get_SessionTicket(ssl, buf, &sz) != WOLFSSL_SUCCESS || sz == 0) return 0;
  uint64_t h = 1469598103934665603ull;
  for (word32 i = 0; i < sz; ++i) h = (h ^ buf[i]) * 1099511628211ull;
  return h == 0 ? 1 : h;
}

}  // namespace

int transport::recv_cb(WOLFSSL*, char* buf, int sz, void* self) {
  auto* t = static_cast<transport*>(self);
  if (t->in_len_ == 0 || sz <= 0) return WOLFSSL_CBIO_ERR_WANT_READ;
  size_t n = std::min(t->in_len_, static_cast<size_t>(sz));
  std::memcpy(buf, t->in_, n);
  t->in_ += n;
  t->in_len_ -= n;
  return static_cast<int>(n);
}

int transport::send_cb(WOLFSSL*, char* buf, int sz, void* self) {
  auto* t = static_cast<transport*>(self);
  // Outside one of our calls there is nowhere to put bytes; wolfSSL retries later.
  if (t->wire_ == nullptr) return WOLFSSL_CBIO_ERR_WANT_WRITE;
  t->wire_->append(buf, static_cast<size_t>(sz));
  return sz;
}

namespace {
// Points the callbacks at the caller's buffers for the duration of one call.
struct io_scope {
  const char*& in;
  size_t& in_len;
  std::string*& wire;
  io_scope(const char*& i, size_t& l, std::string*& w, const char* p, size_t n, std::string* out)
      : in(i), in_len(l), wire(w) {
    in = p;
    in_len = n;
    wire = out;
  }
  ~io_scope() {
    in = nullptr;
    in_len = 0;
    wire = nullptr;
  }
};
}  // namespace

std::unique_ptr<transport> transport::client(context& ctx, const peer_options& p, std::string& err) {
  if (ctx.options().side != role::client) {
    err = "tls: a client transport needs a client context";
    return nullptr;
  }
  if (p.sni.size() > 255 || p.verify_name.size() > 255) {
    err = "tls: a name longer than 255 bytes";
    return nullptr;
  }
  const std::string& vname = p.verify_name.empty() ? p.sni : p.verify_name;
  if (p.policy == verify_policy::verify && vname.empty()) {
    err = "tls: the verify policy needs a name to check";
    return nullptr;
  }
  WOLFSSL* ssl = wolfSSL_new(ctx.native());
  if (ssl == nullptr) {
    err = "tls: wolfSSL_new failed";
    return nullptr;
  }
  std::unique_ptr<transport> t(new transport(ctx, ssl, true));
  t->policy_ = p.policy;
  if (!p.destination.empty()) {
    // The cache key carries the policy and the name checked: a session made under
    // `encrypt` (nothing verified), or verified for another name, must never let a later
    // `verify` connection skip the certificate check by resuming.
    t->destination_ = p.destination;
    t->destination_ += p.policy == verify_policy::verify ? "\n+verify:" : "\n+encrypt";
    if (p.policy == verify_policy::verify) t->destination_ += vname;
  }
  wolfSSL_SSLSetIORecv(ssl, recv_cb);
  wolfSSL_SSLSetIOSend(ssl, send_cb);
  wolfSSL_SetIOReadCtx(ssl, t.get());
  wolfSSL_SetIOWriteCtx(ssl, t.get());
  if (p.policy == verify_policy::encrypt) {
    wolfSSL_set_verify(ssl, WOLFSSL_VERIFY_NONE, nullptr);
  } else if (wolfSSL_check_domain_name(ssl, vname.c_str()) != WOLFSSL_SUCCESS) {
    err = "tls: cannot set the name to verify";
    return nullptr;
  }
  if (!p.sni.empty() && wolfSSL_UseSNI(ssl, WOLFSSL_SNI_HOST_NAME, p.sni.data(),
                                       static_cast<unsigned short>(p.sni.size())) != WOLFSSL_SUCCESS) {
    err = "tls: cannot set the SNI name";
    return nullptr;
  }
  // Generate the X25519 key share up front (the context lists X25519 first, but say it).
  if (wolfSSL_UseKeyShare(ssl, WOLFSSL_ECC_X25519) != WOLFSSL_SUCCESS) {
    err = "tls: cannot create an X25519 key share";
    return nullptr;
  }
  if (!t->destination_.empty()) {
    if (WOLFSSL_SESSION* s = ctx.find_session(t->destination_)) {
      // A stale or unusable session is refused here; the handshake is then a full one.
      wolfSSL_set_session(ssl, s);
    }
  }
  return t;
}

std::unique_ptr<transport> transport::server(context& ctx, std::string& err) {
  if (ctx.options().side != role::server) {
    err = "tls: a server transport needs a server context";
    return nullptr;
  }
  WOLFSSL* ssl = wolfSSL_new(ctx.native());
  if (ssl == nullptr) {
    err = "tls: wolfSSL_new failed";
    return nullptr;
  }
  std::unique_ptr<transport> t(new transport(ctx, ssl, false));
  wolfSSL_SSLSetIORecv(ssl, recv_cb);
  wolfSSL_SSLSetIOSend(ssl, send_cb);
  wolfSSL_SetIOReadCtx(ssl, t.get());
  wolfSSL_SetIOWriteCtx(ssl, t.get());
  return t;
}

transport::~transport() { wolfSSL_free(ssl_); }

transport_status transport::fail(int ret) {
  int e = wolfSSL_get_error(ssl_, ret);
  error_ = reason(ssl_, e);
  if (!done_) {
    ++ctx_.mutable_stats().failed;
    // A session that led to a failed handshake is not offered again.
    if (client_ && !destination_.empty()) ctx_.forget_session(destination_);
  }
  failed_ = true;
  return transport_status::error;
}

void transport::on_handshake_done() {
  done_ = true;
  resumed_ = wolfSSL_session_reused(ssl_) != 0;
  verified_ = client_ && policy_ == verify_policy::verify;
  auto& st = ctx_.mutable_stats();
  ++st.handshakes;
  ++(resumed_ ? st.resumed : st.full);
  if (const char* v = wolfSSL_get_version(ssl_)) protocol_ = v;
  if (const char* c = wolfSSL_get_cipher_name(ssl_)) cipher_ = c;
  if (WOLFSSL_X509* x = wolfSSL_get_peer_certificate(ssl_)) {
    if (const char* cn = wolfSSL_X509_get_subjectCN(x)) peer_cn_ = cn;
    wolfSSL_X509_free(x);
  }
  if (client_ && !destination_.empty()) ticket_seen_ = ticket_hash(ssl_);
}

// TLS 1.3 tickets arrive after the handshake (NewSessionTicket) and wolfSSL 5.5 has no
// callback for them, so the client looks for a ticket that differs from the one it started
// with until it has stored one.
void transport::maybe_store_ticket() {
  if (!client_ || destination_.empty() || ticket_stored_ || !done_) return;
  uint64_t h = ticket_hash(ssl_);
  if (h == 0 || h == ticket_seen_) return;
  if (WOLFSSL_SESSION* s = wolfSSL_get1_session(ssl_)) {
    ctx_.store_session(destination_, s);
    ticket_stored_ = true;
  }
}

transport_status transport::flush_pending() {
  if (pending_app_.empty()) return transport_status::ok;
  int r = wolfSSL_write(ssl_, pending_app_.data(), static_cast<int>(pending_app_.size()));
  if (r <= 0) return fail(r);
  pending_app_.clear();
  return transport_status::ok;
}

transport_status transport::advance(net::byte_sink* app) {
  if (!done_) {
    int r = wolfSSL_negotiate(ssl_);
    if (r != WOLFSSL_SUCCESS) {
      int e = wolfSSL_get_error(ssl_, r);
      if (e == WOLFSSL_ERROR_WANT_READ || e == WOLFSSL_ERROR_WANT_WRITE) return transport_status::ok;
      return fail(r);
    }
    on_handshake_done();
    if (auto st = flush_pending(); st != transport_status::ok) return st;
  }
  if (app == nullptr) return transport_status::ok;
  char buf[16 * 1024];
  for (;;) {
    int r = wolfSSL_read(ssl_, buf, sizeof buf);
    if (r > 0) {
      app->put(buf, static_cast<size_t>(r));
      continue;
    }
    int e = wolfSSL_get_error(ssl_, r);
    if (e == WOLFSSL_ERROR_WANT_READ || e == WOLFSSL_ERROR_WANT_WRITE) break;
    if (e == WOLFSSL_ERROR_ZERO_RETURN) return transport_status::closed;
    return fail(r);
  }
  maybe_store_ticket();
  return transport_status::ok;
}

transport_status transport::start(std::string& wire_out) {
  if (failed_) return transport_status::error;
  io_scope s(in_, in_len_, wire_, nullptr, 0, &wire_out);
  return advance(nullptr);
}

transport_status transport::on_recv(const char* p, size_t n, net::byte_sink& app,
                                    std::string& wire_out) {
  if (failed_) return transport_status::error;
  io_scope s(in_, in_len_, wire_, p, n, &wire_out);
  return advance(&app);
}

transport_status transport::on_send(std::string& app_out, std::string& wire_out) {
  if (failed_) return transport_status::error;
  if (!done_) {
    if (pending_app_.size() + app_out.size() > ctx_.options().pending_app_max) {
      error_ = "application data before the handshake exceeds pending_app_max";
      failed_ = true;
      return transport_status::error;
    }
    pending_app_.append(app_out);
    app_out.clear();
    return transport_status::ok;
  }
  io_scope s(in_, in_len_, wire_, nullptr, 0, &wire_out);
  const char* p = app_out.data();
  size_t n = app_out.size();
  while (n > 0) {
    int chunk = static_cast<int>(std::min<size_t>(n, INT_MAX / 2));
    int r = wolfSSL_write(ssl_, p, chunk);
    if (r <= 0) return fail(r);
    p += r;
    n -= static_cast<size_t>(r);
  }
  app_out.clear();
  return transport_status::ok;
}

transport_status transport::shutdown(std::string& wire_out) {
  if (failed_) return transport_status::error;
  io_scope s(in_, in_len_, wire_, nullptr, 0, &wire_out);
  wolfSSL_shutdown(ssl_);  // sends close_notify; the peer's reply is not awaited
  return transport_status::ok;
}

}  // namespace tern::tls
