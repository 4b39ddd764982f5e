// tls/: a tern client transport against a tern server transport in memory (bytes pumped
// between them, no sockets), then against real OpenSSL peers on loopback, and a wolfSSL
// server that offers only the integrity-only TLS 1.3 suite. Certificates are made at test
// time with the openssl CLI: a test CA, smarthost.test (also 127.0.0.1), a wrong name, an
// expired one, and one from a CA the client does not trust.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>
#include <fcntl.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include <wolfssl/options.h>
#include <wolfssl/ssl.h>
#include <wolfssl/wolfio.h>

#include "tests/unit/common/tmpdir.hh"
#include "tls/context.hh"
#include "tls/transport.hh"

using namespace tern;
using namespace tern::tls;
using net::transport_status;

namespace {

struct sink final : net::byte_sink {
  std::string got;
  void put(const char* p, size_t n) override { got.append(p, n); }
};

int sh(const std::string& cmd) { return std::system(("(" + cmd + ") >/dev/null 2>&1").c_str()); }

// The certificates, made once for the whole suite.
struct certs {
  tmpdir dir;
  std::string path(const std::string& f) const { return dir.path + "/" + f; }
  bool ok = false;

  certs() {
    const std::string d = dir.path;
    auto key = [&](const std::string& name) {
      return "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout " + d +
             "/" + name + ".key -out " + d + "/" + name + ".csr -subj /CN=";
    };
    std::ofstream(d + "/ca.cnf")
        << "[ca]\ndefault_ca = tca\n[tca]\ndatabase = " << d << "/index.txt\nserial = " << d
        << "/serial\nnew_certs_dir = " << d << "\ndefault_md = sha256\npolicy = pol\n"
        << "unique_subject = no\n[pol]\ncommonName = supplied\n"
        << "[ext]\nsubjectAltName = $ENV::SAN\nbasicConstraints = CA:FALSE\n";
    std::ofstream(d + "/index.txt");
    std::ofstream(d + "/serial") << "1000\n";
    // sign(name, cn, san, ca, dates)
    auto sign = [&](const std::string& name, const std::string& cn, const std::string& san,
                    const std::string& ca, const std::string& dates) {
      return sh(key(name) + cn) == 0 &&
             sh("SAN='" + san + "' openssl ca -batch -notext -config " + d + "/ca.cnf -cert " + d +
                "/" + ca + ".crt -keyfile " + d + "/" + ca + ".key -in " + d + "/" + name +
                ".csr -out " + d + "/" + name + ".crt -extensions ext " + dates) == 0;
    };
    auto make_ca = [&](const std::string& name, const std::string& cn) {
      return sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout " +
                d + "/" + name + ".key -out " + d + "/" + name + ".crt -days 3650 -subj '/CN=" +
                cn + "'") == 0;
    };
    ok = make_ca("ca", "tern test CA") && make_ca("other", "some other CA") &&
         sign("good", "smarthost.test", "DNS:smarthost.test,IP:127.0.0.1", "ca", "-days 365") &&
         sign("wrong", "wrong.test", "DNS:wrong.test", "ca", "-days 365") &&
         sign("expired", "smarthost.test", "DNS:smarthost.test", "ca",
              "-startdate 20200101000000Z -enddate 20210101000000Z") &&
         sign("unknown", "smarthost.test", "DNS:smarthost.test", "other", "-days 365");
  }
};

certs* g_certs = nullptr;

class tls_test : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::string err;
    ASSERT_TRUE(library_init(err)) << err;
    g_certs = new certs();
  }
  static void TearDownTestSuite() {
    delete g_certs;
    g_certs = nullptr;
    thread_cleanup();
    library_cleanup();
  }
  void SetUp() override { ASSERT_TRUE(g_certs->ok) << "openssl could not make the test certificates"; }

  static std::unique_ptr<context> server_ctx(const std::string& cert) {
    context_options o;
    o.side = role::server;
    o.cert_file = g_certs->path(cert + ".crt");
    o.key_file = g_certs->path(cert + ".key");
    std::string err;
    auto c = context::create(o, err);
    EXPECT_NE(c, nullptr) << err;
    return c;
  }
  static std::unique_ptr<context> client_ctx(version v = version::v1_3) {
    context_options o;
    o.side = role::client;
    o.min_version = v;
    o.ca_file = g_certs->path("ca.crt");
    std::string err;
    auto c = context::create(o, err);
    EXPECT_NE(c, nullptr) << err;
    return c;
  }
  static peer_options to_smarthost(verify_policy p = verify_policy::verify,
                                   std::string dest = "") {
    peer_options o;
    o.policy = p;
    o.sni = "smarthost.test";
    o.destination = std::move(dest);
    return o;
  }
};

// A client and a server transport with the bytes in flight between them.
struct pair {
  std::unique_ptr<transport> c, s;
  sink c_app, s_app;
  std::string c2s, s2c;
  std::string first_c2s, first_s2c;  // ClientHello, ServerHello flight
  transport_status cst = transport_status::ok, sst = transport_status::ok;

  pair(context& cctx, context& sctx, const peer_options& p) {
    std::string err;
    c = transport::client(cctx, p, err);
    EXPECT_NE(c, nullptr) << err;
    s = transport::server(sctx, err);
    EXPECT_NE(s, nullptr) << err;
  }
  // Moves bytes until neither side has anything to say or one side fails.
  void pump() {
    for (int round = 0; round < 1000; ++round) {
      if (c2s.empty() && s2c.empty()) return;
      if (!c2s.empty()) {
        std::string in;
        in.swap(c2s);
        if (first_c2s.empty()) first_c2s = in;
        sst = s->on_recv(in.data(), in.size(), s_app, s2c);
      }
      if (!s2c.empty()) {
        std::string in;
        in.swap(s2c);
        if (first_s2c.empty()) first_s2c = in;
        cst = c->on_recv(in.data(), in.size(), c_app, c2s);
      }
      if (cst == transport_status::error || sst == transport_status::error) {
        // Deliver the alert a failing side produced, as a relay would before closing.
        if (!s2c.empty() && cst != transport_status::error) {
          cst = c->on_recv(s2c.data(), s2c.size(), c_app, c2s);
        }
        if (!c2s.empty() && sst != transport_status::error) {
          sst = s->on_recv(c2s.data(), c2s.size(), s_app, s2c);
        }
        return;
      }
    }
    ADD_FAILURE() << "pump did not settle";
  }
  void handshake() {
    EXPECT_EQ(c->start(c2s), transport_status::ok);
    pump();
  }
};

// ---- in memory, tern against tern ----

TEST_F(tls_test, handshake_verifies_and_uses_tls13_aead) {
  auto sctx = server_ctx("good");
  auto cctx = client_ctx();
  pair p(*cctx, *sctx, to_smarthost());
  p.handshake();
  ASSERT_TRUE(p.c->handshake_done()) << p.c->error();
  ASSERT_TRUE(p.s->handshake_done()) << p.s->error();
  EXPECT_EQ(p.c->protocol(), "TLSv1.3");
  EXPECT_EQ(p.c->cipher(), "TLS13-AES128-GCM-SHA256");
  EXPECT_TRUE(p.c->verified());
  EXPECT_TRUE(p.c->secure());
  EXPECT_EQ(p.c->peer_cn(), "smarthost.test");
  EXPECT_FALSE(p.c->resumed());
  EXPECT_EQ(cctx->stats().handshakes, 1u);
  EXPECT_EQ(cctx->stats().full, 1u);
}

TEST_F(tls_test, wrong_name_fails_with_hostname_reason) {
  auto sctx = server_ctx("wrong");
  auto cctx = client_ctx();
  pair p(*cctx, *sctx, to_smarthost());
  p.handshake();
  EXPECT_FALSE(p.c->handshake_done());
  EXPECT_TRUE(p.c->failed());
  EXPECT_NE(p.c->error().find("hostname mismatch"), std::string_view::npos) << p.c->error();
  EXPECT_FALSE(p.s->handshake_done());
  EXPECT_EQ(cctx->stats().failed, 1u);
  EXPECT_EQ(cctx->stats().handshakes, 0u);
}

// A smarthost given as an IP literal: the name checked is the address, against the
// certificate's iPAddress subjectAltName (good.crt has 127.0.0.1, no SNI is sent).
TEST_F(tls_test, ip_literal_is_checked_against_ip_san) {
  auto sctx = server_ctx("good");
  auto cctx = client_ctx();
  for (const char* ip : {"127.0.0.1", "127.0.0.2"}) {
    peer_options o;
    o.verify_name = ip;
    pair p(*cctx, *sctx, o);
    p.handshake();
    EXPECT_EQ(p.c->handshake_done(), std::string(ip) == "127.0.0.1") << ip << ": " << p.c->error();
  }
}

TEST_F(tls_test, expired_certificate_fails) {
  auto sctx = server_ctx("expired");
  auto cctx = client_ctx();
  pair p(*cctx, *sctx, to_smarthost());
  p.handshake();
  EXPECT_FALSE(p.c->handshake_done());
  EXPECT_NE(p.c->error().find("expired"), std::string_view::npos) << p.c->error();
}

TEST_F(tls_test, unknown_ca_fails) {
  auto sctx = server_ctx("unknown");
  auto cctx = client_ctx();
  pair p(*cctx, *sctx, to_smarthost());
  p.handshake();
  EXPECT_FALSE(p.c->handshake_done());
  EXPECT_NE(p.c->error().find("unknown CA"), std::string_view::npos) << p.c->error();
}

TEST_F(tls_test, verify_policy_needs_a_name) {
  auto cctx = client_ctx();
  peer_options o;
  std::string err;
  EXPECT_EQ(transport::client(*cctx, o, err), nullptr);
  EXPECT_FALSE(err.empty());
}

TEST_F(tls_test, encrypt_policy_accepts_unverifiable_but_says_so) {
  for (const char* cert : {"unknown", "wrong", "expired"}) {
    auto sctx = server_ctx(cert);
    auto cctx = client_ctx();
    pair p(*cctx, *sctx, to_smarthost(verify_policy::encrypt));
    p.handshake();
    ASSERT_TRUE(p.c->handshake_done()) << cert << ": " << p.c->error();
    EXPECT_FALSE(p.c->verified()) << cert;
    EXPECT_EQ(p.c->protocol(), "TLSv1.3");
    // Still encrypted: application bytes do not appear on the wire.
    std::string secret = "MAIL FROM:<secret-sender@example.org>\r\n", wire;
    std::string out = secret;
    ASSERT_EQ(p.c->on_send(out, wire), transport_status::ok);
    EXPECT_EQ(wire.find("secret-sender"), std::string::npos);
    ASSERT_EQ(p.s->on_recv(wire.data(), wire.size(), p.s_app, p.s2c), transport_status::ok);
    EXPECT_EQ(p.s_app.got, secret);
  }
}

TEST_F(tls_test, app_data_both_ways_byte_exact) {
  auto sctx = server_ctx("good");
  auto cctx = client_ctx();
  pair p(*cctx, *sctx, to_smarthost());
  ASSERT_EQ(p.c->start(p.c2s), transport_status::ok);
  // Written before the handshake completes: held (buffered() counts it), then sent.
  std::string early = "EHLO client.test\r\n";
  ASSERT_EQ(p.c->on_send(early, p.c2s), transport_status::ok);
  EXPECT_TRUE(early.empty());
  EXPECT_EQ(p.c->buffered(), 18u);
  p.pump();
  ASSERT_TRUE(p.c->handshake_done()) << p.c->error();
  EXPECT_EQ(p.c->buffered(), 0u);
  EXPECT_EQ(p.s_app.got, "EHLO client.test\r\n");
  p.s_app.got.clear();

  std::mt19937 rng(42);
  std::string up(1 << 20, '\0'), down(300 * 1000 + 7, '\0');
  for (auto& ch : up) ch = static_cast<char>(rng());
  for (auto& ch : down) ch = static_cast<char>(rng());
  // Several on_send calls of odd sizes, each several records.
  for (size_t off = 0; off < up.size(); off += 100003) {
    std::string chunk = up.substr(off, 100003);
    ASSERT_EQ(p.c->on_send(chunk, p.c2s), transport_status::ok);
  }
  std::string d = down;
  ASSERT_EQ(p.s->on_send(d, p.s2c), transport_status::ok);
  EXPECT_GT(p.c2s.size(), up.size());  // record overhead: really encrypted records
  // Deliver in uneven pieces so records straddle on_recv calls.
  std::string c2s, s2c;
  c2s.swap(p.c2s);
  s2c.swap(p.s2c);
  for (size_t off = 0; off < c2s.size(); off += 1000) {
    ASSERT_EQ(p.s->on_recv(c2s.data() + off, std::min<size_t>(1000, c2s.size() - off), p.s_app, p.s2c),
              transport_status::ok);
  }
  for (size_t off = 0; off < s2c.size(); off += 7777) {
    ASSERT_EQ(p.c->on_recv(s2c.data() + off, std::min<size_t>(7777, s2c.size() - off), p.c_app, p.c2s),
              transport_status::ok);
  }
  EXPECT_TRUE(p.s_app.got == up);
  EXPECT_TRUE(p.c_app.got == down);
  // close_notify ends the peer's transport cleanly.
  std::string wire;
  ASSERT_EQ(p.c->shutdown(wire), transport_status::ok);
  EXPECT_EQ(p.s->on_recv(wire.data(), wire.size(), p.s_app, p.s2c), transport_status::closed);
}

TEST_F(tls_test, pending_app_data_is_bounded) {
  context_options o;
  o.ca_file = g_certs->path("ca.crt");
  o.pending_app_max = 100;
  std::string err;
  auto cctx = context::create(o, err);
  ASSERT_NE(cctx, nullptr) << err;
  auto c = transport::client(*cctx, to_smarthost(), err);
  std::string wire, app(101, 'x');
  ASSERT_EQ(c->start(wire), transport_status::ok);
  EXPECT_EQ(c->on_send(app, wire), transport_status::error);
  EXPECT_NE(c->error().find("pending_app_max"), std::string_view::npos);
}

TEST_F(tls_test, second_connection_to_same_destination_resumes) {
  auto sctx = server_ctx("good");
  auto cctx = client_ctx();
  {
    pair p(*cctx, *sctx, to_smarthost(verify_policy::verify, "smarthost.test:25"));
    p.handshake();
    ASSERT_TRUE(p.c->handshake_done()) << p.c->error();
    EXPECT_FALSE(p.c->resumed());
  }
  EXPECT_EQ(cctx->cached_sessions(), 1u);
  {
    pair p(*cctx, *sctx, to_smarthost(verify_policy::verify, "smarthost.test:25"));
    p.handshake();
    ASSERT_TRUE(p.c->handshake_done()) << p.c->error();
    EXPECT_TRUE(p.c->resumed());
    EXPECT_TRUE(p.s->resumed());
    EXPECT_EQ(p.c->protocol(), "TLSv1.3");
  }
  {
    // Another destination does not use that session.
    pair p(*cctx, *sctx, to_smarthost(verify_policy::verify, "other.test:25"));
    p.handshake();
    ASSERT_TRUE(p.c->handshake_done()) << p.c->error();
    EXPECT_FALSE(p.c->resumed());
  }
  EXPECT_EQ(cctx->stats().handshakes, 3u);
  EXPECT_EQ(cctx->stats().resumed, 1u);
  EXPECT_EQ(cctx->stats().full, 2u);
  EXPECT_EQ(sctx->stats().resumed, 1u);
  EXPECT_EQ(cctx->cached_sessions(), 2u);
}

// Regression: a session made under `encrypt` (certificate not checked) must not be resumed
// by a later `verify` connection to the same destination, which would then report
// verified=true without any check; nor a session verified for another name.
TEST_F(tls_test, resumption_never_skips_a_verification_the_first_session_did_not_do) {
  auto sctx = server_ctx("unknown");  // not verifiable with the client's CA
  auto cctx = client_ctx();
  {
    pair p(*cctx, *sctx, to_smarthost(verify_policy::encrypt, "smarthost.test:25"));
    p.handshake();
    ASSERT_TRUE(p.c->handshake_done()) << p.c->error();
  }
  ASSERT_EQ(cctx->cached_sessions(), 1u);
  {
    pair p(*cctx, *sctx, to_smarthost(verify_policy::verify, "smarthost.test:25"));
    p.handshake();
    EXPECT_FALSE(p.c->handshake_done());
    EXPECT_FALSE(p.c->verified());
    EXPECT_NE(p.c->error().find("unknown CA"), std::string_view::npos) << p.c->error();
  }
  // The encrypt session still resumes under encrypt.
  pair p(*cctx, *sctx, to_smarthost(verify_policy::encrypt, "smarthost.test:25"));
  p.handshake();
  EXPECT_TRUE(p.c->resumed());
  EXPECT_FALSE(p.c->verified());

  // Verified for one name, then asked to verify another at the same destination.
  auto good = server_ctx("good");
  auto cctx2 = client_ctx();
  {
    pair q(*cctx2, *good, to_smarthost(verify_policy::verify, "mx:25"));
    q.handshake();
    ASSERT_TRUE(q.c->handshake_done()) << q.c->error();
  }
  peer_options o = to_smarthost(verify_policy::verify, "mx:25");
  o.verify_name = "other.test";
  pair q(*cctx2, *good, o);
  q.handshake();
  EXPECT_FALSE(q.c->handshake_done());
  EXPECT_NE(q.c->error().find("hostname mismatch"), std::string_view::npos) << q.c->error();
}

// Two shards' server contexts: with the process-wide ticket key a ticket from one resumes
// on the other; with wolfSSL's per-context key (the control) or another process's key it
// cannot, and the handshake is a full one instead of an error.
TEST_F(tls_test, ticket_key_shared_between_server_contexts_resumes_across_them) {
  std::string err;
  auto key = ticket_key::create(err);
  ASSERT_NE(key, nullptr) << err;
  auto other_key = ticket_key::create(err);  // another process (a restart)
  ASSERT_NE(other_key, nullptr) << err;
  enum { shared_key, per_context, other_process };
  for (int mode : {shared_key, per_context, other_process}) {
    const bool shared = mode == shared_key;
    auto make = [&](std::shared_ptr<const ticket_key> k) {
      context_options o;
      o.side = role::server;
      o.cert_file = g_certs->path("good.crt");
      o.key_file = g_certs->path("good.key");
      o.tickets = std::move(k);
      auto c = context::create(o, err);
      EXPECT_NE(c, nullptr) << err;
      return c;
    };
    auto shard_a = make(mode == per_context ? nullptr : key);
    auto shard_b = make(mode == per_context ? nullptr : mode == other_process ? other_key : key);
    auto cctx = client_ctx();
    {
      pair p(*cctx, *shard_a, to_smarthost(verify_policy::verify, "smarthost.test:25"));
      p.handshake();
      ASSERT_TRUE(p.c->handshake_done()) << p.c->error();
    }
    ASSERT_EQ(cctx->cached_sessions(), 1u);
    pair p(*cctx, *shard_b, to_smarthost(verify_policy::verify, "smarthost.test:25"));
    p.handshake();
    ASSERT_TRUE(p.c->handshake_done()) << p.c->error();
    EXPECT_EQ(p.c->resumed(), shared);
    EXPECT_EQ(p.s->resumed(), shared);
    if (shared) {
      // And the same shard still resumes with the shared key.
      pair q(*cctx, *shard_b, to_smarthost(verify_policy::verify, "smarthost.test:25"));
      q.handshake();
      EXPECT_TRUE(q.c->resumed());
    }
  }
}

TEST_F(tls_test, session_cache_is_bounded) {
  auto sctx = server_ctx("good");
  context_options o;
  o.ca_file = g_certs->path("ca.crt");
  o.session_cache_max = 2;
  std::string err;
  auto cctx = context::create(o, err);
  ASSERT_NE(cctx, nullptr) << err;
  for (const char* d : {"a:25", "b:25", "c:25"}) {
    pair p(*cctx, *sctx, to_smarthost(verify_policy::verify, d));
    p.handshake();
    ASSERT_TRUE(p.c->handshake_done()) << p.c->error();
  }
  EXPECT_EQ(cctx->cached_sessions(), 2u);
  // "a" was the oldest: evicted, so a full handshake; "c" resumes.
  pair pa(*cctx, *sctx, to_smarthost(verify_policy::verify, "a:25"));
  pa.handshake();
  EXPECT_FALSE(pa.c->resumed());
  pair pc(*cctx, *sctx, to_smarthost(verify_policy::verify, "c:25"));
  pc.handshake();
  EXPECT_TRUE(pc.c->resumed());
}

// Walks a TLS handshake message's extensions (ClientHello when client, else ServerHello) and
// returns the first group of key_share (0x0033), or of supported_groups (0x000a) for the
// ClientHello; -1 when absent. Also collects the ClientHello's cipher suites.
int first_group(const std::string& rec, bool client_hello, uint16_t ext_type,
                std::vector<uint16_t>* suites = nullptr, int* ext_size = nullptr) {
  auto u8 = [&](size_t i) -> int { return i < rec.size() ? static_cast<unsigned char>(rec[i]) : -1; };
  auto u16 = [&](size_t i) -> int {
    return i + 1 < rec.size() ? (u8(i) << 8 | u8(i + 1)) : -1;
  };
  if (u8(0) != 22 || u8(5) != (client_hello ? 1 : 2)) return -1;
  size_t i = 5 + 4 + 2 + 32;  // record hdr, handshake hdr, version, random
  i += 1 + static_cast<size_t>(u8(i));  // session id
  if (client_hello) {
    int n = u16(i);
    if (n < 0) return -1;
    for (int k = 0; suites && k < n; k += 2) suites->push_back(static_cast<uint16_t>(u16(i + 2 + k)));
    i += 2 + static_cast<size_t>(n);
    i += 1 + static_cast<size_t>(u8(i));  // compression methods
  } else {
    i += 2 + 1;  // cipher suite, compression
  }
  int ext_len = u16(i);
  if (ext_len < 0) return -1;
  size_t end = i + 2 + static_cast<size_t>(ext_len);
  for (i += 2; i + 4 <= end;) {
    int type = u16(i), len = u16(i + 2);
    if (len < 0) return -1;
    if (type == ext_type) {
      if (ext_size) *ext_size = len;
      // ClientHello key_share and supported_groups start with a 2-byte list length.
      return client_hello ? u16(i + 6) : u16(i + 4);
    }
    i += 4 + static_cast<size_t>(len);
  }
  return -1;
}

TEST_F(tls_test, client_offers_x25519_first_and_only_aead_suites) {
  auto sctx = server_ctx("good");
  auto cctx = client_ctx();
  pair p(*cctx, *sctx, to_smarthost());
  p.handshake();
  ASSERT_TRUE(p.c->handshake_done()) << p.c->error();
  std::vector<uint16_t> suites;
  int key_share_size = 0;
  EXPECT_EQ(first_group(p.first_c2s, true, 0x0033, &suites, &key_share_size), 0x001d);
  // One key share only (list length 2 + group 2 + length 2 + 32 bytes): no P-256 or P-521
  // key generated and thrown away on every handshake.
  EXPECT_EQ(key_share_size, 2 + 2 + 2 + 32);
  EXPECT_EQ(first_group(p.first_c2s, true, 0x000a), 0x001d);           // supported_groups
  EXPECT_EQ(first_group(p.first_s2c, false, 0x0033), 0x001d);          // negotiated: X25519
  ASSERT_FALSE(suites.empty());
  for (uint16_t s : suites) {
    // TLS_AES_128_GCM, TLS_AES_256_GCM, TLS_CHACHA20_POLY1305; 0x00ff is the
    // renegotiation SCSV, not a suite.
    EXPECT_TRUE(s == 0x1301 || s == 0x1302 || s == 0x1303 || s == 0x00ff) << std::hex << s;
  }
}

TEST_F(tls_test, tls12_allowed_offers_only_ecdhe_aead_suites) {
  auto cctx = client_ctx(version::v1_2);
  std::string err, hello;
  auto c = transport::client(*cctx, to_smarthost(), err);
  ASSERT_NE(c, nullptr) << err;
  ASSERT_EQ(c->start(hello), transport_status::ok);
  std::vector<uint16_t> suites;
  EXPECT_EQ(first_group(hello, true, 0x0033, &suites), 0x001d);
  ASSERT_FALSE(suites.empty());
  bool has_12 = false;
  for (uint16_t s : suites) {
    // The TLS 1.3 AEADs; ECDHE-{ECDSA,RSA}-AES{128,256}-GCM; ECDHE-*-CHACHA20-POLY1305;
    // the renegotiation SCSV. Anything else (ADH, NULL, RC4, CBC, static RSA) fails.
    static const uint16_t allowed[] = {0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030,
                                       0xcca9, 0xcca8, 0x00ff};
    EXPECT_NE(std::find(std::begin(allowed), std::end(allowed), s), std::end(allowed)) << std::hex << s;
    has_12 = has_12 || s == 0xc02b;
  }
  EXPECT_TRUE(has_12);
}

TEST_F(tls_test, garbage_from_the_peer_is_an_error_not_a_crash) {
  auto sctx = server_ctx("good");
  std::string err;
  auto s = transport::server(*sctx, err);
  ASSERT_NE(s, nullptr) << err;
  std::string junk = "EHLO this is not TLS\r\n", out;
  junk += std::string(5000, '\x16');
  sink app;
  EXPECT_EQ(s->on_recv(junk.data(), junk.size(), app, out), transport_status::error);
  EXPECT_TRUE(s->failed());
  EXPECT_FALSE(s->error().empty());
  EXPECT_TRUE(app.got.empty());
  EXPECT_EQ(s->on_recv(junk.data(), junk.size(), app, out), transport_status::error);
  EXPECT_EQ(sctx->stats().failed, 1u);
}

// ---- a wolfSSL server offering only TLS13-SHA256-SHA256 (integrity, no encryption) ----

struct mem_pipe {
  std::string in;
  std::string* out;
};
int mem_recv(WOLFSSL*, char* buf, int sz, void* ctx) {
  auto* m = static_cast<mem_pipe*>(ctx);
  if (m->in.empty()) return WOLFSSL_CBIO_ERR_WANT_READ;
  size_t n = std::min(m->in.size(), static_cast<size_t>(sz));
  std::memcpy(buf, m->in.data(), n);
  m->in.erase(0, n);
  return static_cast<int>(n);
}
int mem_send(WOLFSSL*, char* buf, int sz, void* ctx) {
  static_cast<mem_pipe*>(ctx)->out->append(buf, static_cast<size_t>(sz));
  return sz;
}

// Runs a raw wolfSSL server with only the integrity-only suite against `client`; returns
// whether the client finished its handshake.
bool against_sha256_only_server(const std::function<bool(std::string& c2s, const std::string& s2c)>& client,
                                bool* server_ok) {
  WOLFSSL_CTX* ctx = wolfSSL_CTX_new(wolfTLSv1_3_server_method());
  EXPECT_NE(ctx, nullptr);
  // The premise of the test: this server really can offer the suite.
  EXPECT_EQ(wolfSSL_CTX_set_cipher_list(ctx, "TLS13-SHA256-SHA256"), WOLFSSL_SUCCESS);
  EXPECT_EQ(wolfSSL_CTX_use_certificate_file(ctx, g_certs->path("good.crt").c_str(), WOLFSSL_FILETYPE_PEM),
            WOLFSSL_SUCCESS);
  EXPECT_EQ(wolfSSL_CTX_use_PrivateKey_file(ctx, g_certs->path("good.key").c_str(), WOLFSSL_FILETYPE_PEM),
            WOLFSSL_SUCCESS);
  WOLFSSL* ssl = wolfSSL_new(ctx);
  std::string s2c, c2s;
  mem_pipe pipe{"", &s2c};
  wolfSSL_SSLSetIORecv(ssl, mem_recv);
  wolfSSL_SSLSetIOSend(ssl, mem_send);
  wolfSSL_SetIOReadCtx(ssl, &pipe);
  wolfSSL_SetIOWriteCtx(ssl, &pipe);
  bool done = false;
  *server_ok = false;
  for (int round = 0; round < 20; ++round) {
    std::string out;
    done = client(out, s2c);
    s2c.clear();
    if (out.empty()) break;
    pipe.in += out;
    int r = wolfSSL_accept(ssl);
    if (r == WOLFSSL_SUCCESS) *server_ok = true;
  }
  wolfSSL_free(ssl);
  wolfSSL_CTX_free(ctx);
  return done;
}

TEST_F(tls_test, integrity_only_tls13_server_is_refused) {
  // Control: a wolfSSL client left at its defaults completes the handshake with that server
  // (so the server is real and the danger is real).
  {
    WOLFSSL_CTX* cctx = wolfSSL_CTX_new(wolfTLSv1_3_client_method());
    wolfSSL_CTX_set_verify(cctx, WOLFSSL_VERIFY_NONE, nullptr);
    WOLFSSL* ssl = wolfSSL_new(cctx);
    std::string out_buf;
    mem_pipe pipe{"", &out_buf};
    wolfSSL_SSLSetIORecv(ssl, mem_recv);
    wolfSSL_SSLSetIOSend(ssl, mem_send);
    wolfSSL_SetIOReadCtx(ssl, &pipe);
    wolfSSL_SetIOWriteCtx(ssl, &pipe);
    bool server_ok = false;
    std::string cipher;
    bool done = against_sha256_only_server(
        [&](std::string& c2s, const std::string& s2c) {
          pipe.in += s2c;
          int r = wolfSSL_connect(ssl);
          c2s.swap(out_buf);
          out_buf.clear();
          if (r == WOLFSSL_SUCCESS) cipher = wolfSSL_get_cipher_name(ssl);
          return r == WOLFSSL_SUCCESS;
        },
        &server_ok);
    EXPECT_TRUE(done);
    EXPECT_EQ(cipher, "TLS13-SHA256-SHA256");
    wolfSSL_free(ssl);
    wolfSSL_CTX_free(cctx);
  }
  // tern's client, even under the encrypt policy, refuses it.
  auto cctx = client_ctx();
  std::string err;
  auto c = transport::client(*cctx, to_smarthost(verify_policy::encrypt), err);
  ASSERT_NE(c, nullptr) << err;
  bool started = false;
  sink app;
  bool server_ok = false;
  bool done = against_sha256_only_server(
      [&](std::string& c2s, const std::string& s2c) {
        if (!started) {
          started = true;
          c->start(c2s);
        } else if (!s2c.empty()) {
          c->on_recv(s2c.data(), s2c.size(), app, c2s);
        }
        return c->handshake_done();
      },
      &server_ok);
  EXPECT_FALSE(done) << c->cipher();
  EXPECT_FALSE(server_ok);
  EXPECT_FALSE(c->handshake_done());
  EXPECT_TRUE(c->failed());
  EXPECT_FALSE(c->error().empty());
}

// ---- real OpenSSL peers on loopback ----

int free_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

// An `openssl s_server` on 127.0.0.1 for one test.
struct s_server {
  pid_t pid = -1;
  int port = 0;
  explicit s_server(const std::vector<std::string>& extra) {
    port = free_port();
    std::vector<std::string> args = {"openssl", "s_server", "-quiet", "-accept",
                                      "127.0.0.1:" + std::to_string(port)};
    args.insert(args.end(), extra.begin(), extra.end());
    pid = fork();
    if (pid == 0) {
      int devnull = open("/dev/null", O_RDWR);
      dup2(devnull, 0);
      dup2(devnull, 1);
      dup2(devnull, 2);
      std::vector<char*> argv;
      for (auto& s : args) argv.push_back(s.data());
      argv.push_back(nullptr);
      execvp("openssl", argv.data());
      _exit(127);
    }
  }
  ~s_server() {
    if (pid > 0) {
      kill(pid, SIGTERM);
      waitpid(pid, nullptr, 0);
    }
  }
  // Connects, waiting for the server to listen (polling, not a timed assertion).
  int connect_fd() const {
    for (int i = 0; i < 500; ++i) {
      int fd = socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_port = htons(static_cast<uint16_t>(port));
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
        timeval tv{20, 0};  // a hung peer ends the test instead of hanging it
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        return fd;
      }
      close(fd);
      usleep(20 * 1000);
    }
    return -1;
  }
};

bool write_all(int fd, const std::string& s) {
  for (size_t off = 0; off < s.size();) {
    ssize_t r = write(fd, s.data() + off, s.size() - off);
    if (r <= 0) return false;
    off += static_cast<size_t>(r);
  }
  return true;
}

// Drives a tern client over a blocking socket until the handshake is done or fails.
void drive(int fd, transport& c) {
  std::string wire;
  sink app;
  ASSERT_EQ(c.start(wire), transport_status::ok);
  ASSERT_TRUE(write_all(fd, wire));
  char buf[16384];
  while (!c.handshake_done() && !c.failed()) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0) break;
    wire.clear();
    transport_status st = c.on_recv(buf, static_cast<size_t>(n), app, wire);
    write_all(fd, wire);
    if (st != transport_status::ok) break;
  }
}

// With `echo_line`, also sends it after the handshake and reads until s_server -rev
// answers (by then the server's NewSessionTickets have been read too).
std::unique_ptr<transport> run_against_openssl(s_server& srv, context& cctx, verify_policy policy,
                                               const std::string& dest = "",
                                               std::string* echo_reply = nullptr) {
  int fd = srv.connect_fd();
  EXPECT_GE(fd, 0) << "openssl s_server did not start";
  std::string err;
  peer_options o;
  o.policy = policy;
  o.sni = "smarthost.test";
  o.destination = dest;
  auto c = transport::client(cctx, o, err);
  EXPECT_NE(c, nullptr) << err;
  if (fd >= 0 && c) {
    drive(fd, *c);
    if (echo_reply && c->handshake_done()) {
      std::string app = "hello\n", wire;
      sink got;
      EXPECT_EQ(c->on_send(app, wire), transport_status::ok);
      write_all(fd, wire);
      char buf[16384];
      while (got.got.find('\n') == std::string::npos) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0) break;
        wire.clear();
        if (c->on_recv(buf, static_cast<size_t>(n), got, wire) != transport_status::ok) break;
        write_all(fd, wire);
      }
      *echo_reply = got.got;
    }
    close(fd);
  }
  return c;
}

std::vector<std::string> good_cert() {
  return {"-cert", g_certs->path("good.crt"), "-key", g_certs->path("good.key")};
}

std::vector<std::string> operator+(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

}  // namespace

// Control for the tests below: the harness does complete a real handshake.
TEST_F(tls_test, openssl_tls13_server_verifies) {
  s_server srv(good_cert() + std::vector<std::string>{"-tls1_3"});
  auto cctx = client_ctx();
  auto c = run_against_openssl(srv, *cctx, verify_policy::verify);
  ASSERT_TRUE(c->handshake_done()) << c->error();
  EXPECT_EQ(c->protocol(), "TLSv1.3");
  EXPECT_TRUE(c->verified());
  EXPECT_EQ(c->peer_cn(), "smarthost.test");
}

TEST_F(tls_test, openssl_tls12_only_server_fails_under_min_13) {
  s_server srv(good_cert() + std::vector<std::string>{"-tls1_2"});
  auto cctx = client_ctx(version::v1_3);
  auto c = run_against_openssl(srv, *cctx, verify_policy::encrypt);
  EXPECT_FALSE(c->handshake_done());
  EXPECT_TRUE(c->failed());
  EXPECT_NE(c->error().find("version"), std::string_view::npos) << c->error();
  // Control: allowing 1.2, the same kind of server is reached with an ECDHE AEAD suite.
  s_server srv12(good_cert() + std::vector<std::string>{"-tls1_2"});
  auto cctx12 = client_ctx(version::v1_2);
  auto c12 = run_against_openssl(srv12, *cctx12, verify_policy::verify);
  ASSERT_TRUE(c12->handshake_done()) << c12->error();
  EXPECT_EQ(c12->protocol(), "TLSv1.2");
  EXPECT_EQ(c12->cipher().substr(0, 6), "ECDHE-");
  EXPECT_NE(c12->cipher().find("GCM"), std::string_view::npos) << c12->cipher();
}

TEST_F(tls_test, openssl_anonymous_null_rc4_server_is_refused_with_tls12_allowed) {
  s_server srv({"-nocert", "-tls1_2", "-cipher", "ADH-AES128-SHA:aNULL:eNULL:RC4:@SECLEVEL=0"});
  auto cctx = client_ctx(version::v1_2);
  auto c = run_against_openssl(srv, *cctx, verify_policy::encrypt);
  EXPECT_FALSE(c->handshake_done());
  EXPECT_TRUE(c->failed());
  EXPECT_FALSE(c->error().empty());
  // Control: the server is up and does speak anonymous DH to a client that offers it.
  EXPECT_EQ(sh("echo | openssl s_client -connect 127.0.0.1:" + std::to_string(srv.port) +
               " -tls1_2 -cipher 'ADH-AES128-SHA:@SECLEVEL=0' 2>&1 | grep -q 'Cipher is ADH-AES128-SHA'"),
            0);
}

// tern's client resumes with a real OpenSSL TLS 1.3 server (a smarthost) from its ticket.
TEST_F(tls_test, openssl_server_session_resumes) {
  s_server srv(good_cert() + std::vector<std::string>{"-tls1_3", "-rev"});
  auto cctx = client_ctx();
  std::string reply;
  auto c1 = run_against_openssl(srv, *cctx, verify_policy::verify, "smarthost.test:25", &reply);
  ASSERT_TRUE(c1->handshake_done()) << c1->error();
  EXPECT_EQ(reply, "olleh\n");
  EXPECT_FALSE(c1->resumed());
  EXPECT_EQ(cctx->cached_sessions(), 1u);
  auto c2 = run_against_openssl(srv, *cctx, verify_policy::verify, "smarthost.test:25", &reply);
  ASSERT_TRUE(c2->handshake_done()) << c2->error();
  EXPECT_TRUE(c2->resumed());
  EXPECT_TRUE(c2->verified());
  EXPECT_EQ(reply, "olleh\n");
  EXPECT_EQ(cctx->stats().resumed, 1u);
}
