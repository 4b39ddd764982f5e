#include "tls/context.hh"

// options.h first: it carries the build's feature macros that the other headers test.
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>
#include <wolfssl/wolfcrypt/chacha20_poly1305.h>
#include <wolfssl/wolfcrypt/ecc.h>

#include <sys/random.h>

#include <atomic>
#include <cstring>

namespace tern::tls {

namespace {

// AEAD only. TLS 1.3: the three standard AEAD suites (never TLS13-SHA256-SHA256, the
// integrity-only suite wolfSSL accepts by default). TLS 1.2, only when allowed: forward
// secret ECDHE with AES-GCM or ChaCha20-Poly1305 (never ADH, NULL, RC4, CBC).
constexpr const char* ciphers_13 =
    "TLS13-AES128-GCM-SHA256:TLS13-AES256-GCM-SHA384:TLS13-CHACHA20-POLY1305-SHA256";
constexpr const char* ciphers_12 =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";

// The ticket nonce: unique per key because the key lives for one process and this counter
// only grows. Shared by the shards' threads (one atomic add per ticket issued).
std::atomic<uint64_t> ticket_nonce{0};

// Seals and opens tickets with ChaCha20-Poly1305 under the process-wide key. wolfSSL gives
// 16 bytes of IV space (the 12-byte nonce goes there) and 32 of MAC space (the 16-byte
// tag); the key name, IV and length are authenticated too.
int ticket_cb(WOLFSSL*, unsigned char key_name[WOLFSSL_TICKET_NAME_SZ],
              unsigned char iv[WOLFSSL_TICKET_IV_SZ], unsigned char mac[WOLFSSL_TICKET_MAC_SZ],
              int enc, unsigned char* ticket, int in_len, int* out_len, void* user) {
  const auto* k = static_cast<const ticket_key*>(user);
  if (k == nullptr || in_len < 0) return WOLFSSL_TICKET_RET_FATAL;
  if (enc) {
    std::memcpy(key_name, k->name, WOLFSSL_TICKET_NAME_SZ);
    // counter || start of the key name: wolfSSL refuses an all-zero IV.
    uint64_t n = ticket_nonce.fetch_add(1, std::memory_order_relaxed) + 1;
    std::memcpy(iv, &n, sizeof n);
    std::memcpy(iv + sizeof n, k->name, WOLFSSL_TICKET_IV_SZ - sizeof n);
  } else if (std::memcmp(key_name, k->name, WOLFSSL_TICKET_NAME_SZ) != 0) {
    return WOLFSSL_TICKET_RET_REJECT;  // another process's ticket: a full handshake
  }
  unsigned char aad[WOLFSSL_TICKET_NAME_SZ + WOLFSSL_TICKET_IV_SZ + 2];
  std::memcpy(aad, key_name, WOLFSSL_TICKET_NAME_SZ);
  std::memcpy(aad + WOLFSSL_TICKET_NAME_SZ, iv, WOLFSSL_TICKET_IV_SZ);
  aad[sizeof aad - 2] = static_cast<unsigned char>(in_len >> 8);
  aad[sizeof aad - 1] = static_cast<unsigned char>(in_len);
  auto len = static_cast<word32>(in_len);
  int r = enc ? wc_ChaCha20Poly1305_Encrypt(k->key, iv, aad, sizeof aad, ticket, len, ticket, mac)
              : wc_ChaCha20Poly1305_Decrypt(k->key, iv, aad, sizeof aad, ticket, len, mac, ticket);
  if (r != 0) return enc ? WOLFSSL_TICKET_RET_FATAL : WOLFSSL_TICKET_RET_REJECT;
  *out_len = in_len;
  return WOLFSSL_TICKET_RET_OK;
}

}  // namespace

std::shared_ptr<const ticket_key> ticket_key::create(std::string& err) {
  auto k = std::make_shared<ticket_key>();
  unsigned char buf[sizeof k->name + sizeof k->key];
  if (getrandom(buf, sizeof buf, 0) != static_cast<ssize_t>(sizeof buf)) {
    err = "tls: getrandom failed for the ticket key";
    return nullptr;
  }
  std::memcpy(k->name, buf, sizeof k->name);
  std::memcpy(k->key, buf + sizeof k->name, sizeof k->key);
  return k;
}

bool library_init(std::string& err) {
  if (wolfSSL_Init() != WOLFSSL_SUCCESS) {
    err = "wolfSSL_Init failed";
    return false;
  }
  return true;
}

void library_cleanup() { wolfSSL_Cleanup(); }

void thread_cleanup() {
#ifdef FP_ECC
  wc_ecc_fp_free();
#endif
}

bool parse_version(std::string_view s, version& out) {
  if (s == "1.2") {
    out = version::v1_2;
  } else if (s == "1.3") {
    out = version::v1_3;
  } else {
    return false;
  }
  return true;
}

std::unique_ptr<context> context::create(const context_options& o, std::string& err) {
  std::unique_ptr<context> c(new context());
  c->opts_ = o;
  const bool server = o.side == role::server;
  const bool only_13 = o.min_version == version::v1_3;
  WOLFSSL_METHOD* m;
  if (server) {
    m = only_13 ? wolfTLSv1_3_server_method() : wolfSSLv23_server_method();
  } else {
    m = only_13 ? wolfTLSv1_3_client_method() : wolfSSLv23_client_method();
  }
  if (m == nullptr || (c->ctx_ = wolfSSL_CTX_new(m)) == nullptr) {
    err = "tls: cannot create a wolfSSL context";
    return nullptr;
  }
  WOLFSSL_CTX* ctx = c->ctx_;
  if (!only_13 && wolfSSL_CTX_SetMinVersion(ctx, WOLFSSL_TLSV1_2) != WOLFSSL_SUCCESS) {
    err = "tls: cannot set the minimum version 1.2";
    return nullptr;
  }
  std::string list = ciphers_13;
  if (!only_13) {
    list += ':';
    list += ciphers_12;
  }
  if (wolfSSL_CTX_set_cipher_list(ctx, list.c_str()) != WOLFSSL_SUCCESS) {
    err = "tls: the AEAD cipher list is not supported by this wolfSSL build";
    return nullptr;
  }
  // X25519 first (the fast one), then P-256; nothing else.
  int groups[] = {WOLFSSL_ECC_X25519, WOLFSSL_ECC_SECP256R1};
  if (wolfSSL_CTX_set_groups(ctx, groups, 2) != WOLFSSL_SUCCESS ||
      wolfSSL_CTX_UseSupportedCurve(ctx, WOLFSSL_ECC_X25519) != WOLFSSL_SUCCESS ||
      wolfSSL_CTX_UseSupportedCurve(ctx, WOLFSSL_ECC_SECP256R1) != WOLFSSL_SUCCESS) {
    err = "tls: X25519/P-256 groups are not supported by this wolfSSL build";
    return nullptr;
  }
  if (server) {
    if (o.cert_file.empty() || o.key_file.empty()) {
      err = "tls: a server context needs a certificate and a key file";
      return nullptr;
    }
    if (wolfSSL_CTX_use_certificate_chain_file(ctx, o.cert_file.c_str()) != WOLFSSL_SUCCESS) {
      err = "tls: cannot load the certificate chain " + o.cert_file;
      return nullptr;
    }
    if (wolfSSL_CTX_use_PrivateKey_file(ctx, o.key_file.c_str(), WOLFSSL_FILETYPE_PEM) !=
        WOLFSSL_SUCCESS) {
      err = "tls: cannot load the private key " + o.key_file;
      return nullptr;
    }
    // wolfSSL's process-wide session cache is shared by all threads behind a lock; the
    // server resumes from stateless tickets instead. (Not on the client: there wolfSSL
    // refuses wolfSSL_set_session when its cache is off.)
    wolfSSL_CTX_set_session_cache_mode(ctx, WOLFSSL_SESS_CACHE_OFF);
    // SMTP servers do not ask clients for certificates.
    wolfSSL_CTX_set_verify(ctx, WOLFSSL_VERIFY_NONE, nullptr);
    if (!o.session_tickets) {
      wolfSSL_CTX_set_num_tickets(ctx, 0);
    } else if (o.tickets) {
      // The context keeps opts_ (and so the key) alive as long as wolfSSL may call back.
      if (wolfSSL_CTX_set_TicketEncCb(ctx, ticket_cb) != WOLFSSL_SUCCESS ||
          wolfSSL_CTX_set_TicketEncCtx(ctx, const_cast<ticket_key*>(c->opts_.tickets.get())) !=
              WOLFSSL_SUCCESS) {
        err = "tls: cannot install the ticket key";
        return nullptr;
      }
    }
  } else {
    if (!o.ca_file.empty() &&
        wolfSSL_CTX_load_verify_locations(ctx, o.ca_file.c_str(), nullptr) != WOLFSSL_SUCCESS) {
      err = "tls: cannot load the CA file " + o.ca_file;
      return nullptr;
    }
    // Per connection, the transport sets VERIFY_PEER or VERIFY_NONE (policy encrypt).
    wolfSSL_CTX_set_verify(ctx, WOLFSSL_VERIFY_PEER, nullptr);
  }
  return c;
}

context::~context() {
  for (auto& [dest, e] : sessions_) {
    wolfSSL_SESSION_free(e.session);
  }
  if (ctx_ != nullptr) {
    wolfSSL_CTX_free(ctx_);
  }
}

WOLFSSL_SESSION* context::find_session(std::string_view dest) const {
  // C++20 heterogeneous lookup would need a transparent hash; destinations are short.
  auto it = sessions_.find(std::string(dest));
  return it == sessions_.end() ? nullptr : it->second.session;
}

void context::store_session(std::string_view dest, WOLFSSL_SESSION* s) {
  auto [it, inserted] = sessions_.try_emplace(std::string(dest), entry{s, ++stamp_});
  if (!inserted) {
    wolfSSL_SESSION_free(it->second.session);
    it->second = entry{s, stamp_};
    return;
  }
  if (sessions_.size() > opts_.session_cache_max) {
    // Evict the oldest. A linear scan, only when the cache is full: a full cache means
    // more destinations than the limit, where one scan per new ticket is cheap next to
    // the handshake that produced it.
    auto oldest = sessions_.end();
    for (auto i = sessions_.begin(); i != sessions_.end(); ++i) {
      if (oldest == sessions_.end() || i->second.stamp < oldest->second.stamp) oldest = i;
    }
    wolfSSL_SESSION_free(oldest->second.session);
    sessions_.erase(oldest);
  }
}

void context::forget_session(std::string_view dest) {
  auto it = sessions_.find(std::string(dest));
  if (it != sessions_.end()) {
    wolfSSL_SESSION_free(it->second.session);
    sessions_.erase(it);
  }
}

}  // namespace tern::tls
