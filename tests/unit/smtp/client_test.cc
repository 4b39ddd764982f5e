// Byte-exact SMTP and LMTP client dialogues against the sans-I/O client: the test plays the
// server (it feeds the server's bytes) and the host (it takes the output, pulls the body,
// reports TLS results, timeouts and lost connections).
#include "src/smtp/client.hh"

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "tests/unit/common/alloc_counter.hh"

using namespace tern;
using namespace tern::smtp;

namespace {

const char* greeting = "220 mx.test ESMTP\r\n";

struct harness {
  client_config cfg;
  client c;
  std::vector<spool::rcpt_view> rcpts{{"x@y.test", 0, {}}, {"z@y.test", 0, {}}};
  std::string content = "Subject: t\r\n\r\nhello\r\n";  // 21 bytes
  client_message msg;
  size_t budget = 1 << 20;

  harness() {
    cfg.helo_name = "relay.test";
    cfg.tls = tls_policy::may;
    cfg.tls_available = true;
    msg.sender = "a@b.test";
  }
  // Connect and take the greeting; returns what the client sent.
  std::string start(std::string_view greet = greeting) {
    c.reset(cfg);
    c.connected();
    EXPECT_EQ(c.stage(), client_stage::greeting);
    return talk(greet);
  }
  // Feed server bytes; pull the body when the client is in stage body; return the output.
  std::string talk(std::string_view in) {
    c.feed(in);
    return drain();
  }
  std::string drain() {
    std::string out, chunk;
    for (;;) {
      c.take_output(chunk);
      out += chunk;
      if (c.stage() != client_stage::body) break;
      size_t n = c.produce(budget);
      EXPECT_LE(n, budget);
    }
    return out;
  }
  std::string send() {
    msg.rcpts = rcpts;
    msg.content = content;
    EXPECT_TRUE(c.send(msg));
    return drain();
  }
  const rcpt_result& res(size_t i) { return c.results()[i]; }
};

// What produce() must make of stored content: an independent, byte-at-a-time reference.
std::string reference_body(std::string_view s) {
  std::string o;
  bool bol = true;
  for (size_t i = 0; i < s.size(); ++i) {
    char ch = s[i];
    if (ch == '\r') {
      if (i + 1 < s.size() && s[i + 1] == '\n') ++i;
      o += "\r\n";
      bol = true;
      continue;
    }
    if (ch == '\n') {
      o += "\r\n";
      bol = true;
      continue;
    }
    if (bol && ch == '.') o += '.';
    o += ch;
    bol = false;
  }
  if (!bol) o += "\r\n";
  return o + ".\r\n";
}

// No CR without LF after it, no LF without CR before it, and the text ends in CRLF.
bool clean_crlf(std::string_view s) {
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\r' && (i + 1 == s.size() || s[i + 1] != '\n')) return false;
    if (s[i] == '\n' && (i == 0 || s[i - 1] != '\r')) return false;
  }
  return s.empty() || s.ends_with("\r\n");
}

}  // namespace

TEST(Client, PlainSmtpWithoutPipelining) {
  harness h;
  h.cfg.tls = tls_policy::none;
  EXPECT_EQ(h.start(), "EHLO relay.test\r\n");
  EXPECT_EQ(h.c.stage(), client_stage::ehlo);
  EXPECT_EQ(h.talk("250-mx.test\r\n250-8BITMIME\r\n250 STARTTLS\r\n"), "");  // policy none: no STARTTLS
  EXPECT_EQ(h.c.stage(), client_stage::idle);
  h.msg.body = spool::body_type::eight_bit_mime;
  EXPECT_EQ(h.send(), "MAIL FROM:<a@b.test> BODY=8BITMIME\r\n");
  EXPECT_EQ(h.c.stage(), client_stage::mail);
  EXPECT_EQ(h.talk("250 2.1.0 Ok\r\n"), "RCPT TO:<x@y.test>\r\n");
  EXPECT_EQ(h.c.stage(), client_stage::rcpt);
  EXPECT_EQ(h.talk("250 2.1.5 Ok\r\n"), "RCPT TO:<z@y.test>\r\n");
  EXPECT_EQ(h.talk("550 5.1.1 <z@y.test>: no such user\r\n"), "DATA\r\n");
  EXPECT_EQ(h.c.stage(), client_stage::data_init);
  EXPECT_EQ(h.talk("354 go ahead\r\n"), "Subject: t\r\n\r\nhello\r\n.\r\n");
  EXPECT_EQ(h.c.stage(), client_stage::data_done);
  EXPECT_FALSE(h.c.has_results());
  EXPECT_EQ(h.talk("250 2.0.0 Ok: queued as 1\r\n"), "");
  EXPECT_EQ(h.c.stage(), client_stage::idle);
  ASSERT_TRUE(h.c.has_results());
  ASSERT_EQ(h.c.results().size(), 2u);
  EXPECT_EQ(h.res(0).status, rcpt_status::delivered);
  EXPECT_EQ(h.res(0).reply.code, 250);
  EXPECT_STREQ(h.res(0).reply.status, "2.0.0");
  EXPECT_EQ(h.res(0).reply.cmd, client_cmd::dot);
  EXPECT_EQ(h.res(1).status, rcpt_status::failed);
  EXPECT_EQ(h.res(1).reply.code, 550);
  EXPECT_STREQ(h.res(1).reply.status, "5.1.1");
  EXPECT_EQ(h.res(1).reply.text, "5.1.1 <z@y.test>: no such user");
  EXPECT_STREQ(command_name(h.res(1).reply.cmd), "RCPT TO");
  h.c.quit();
  EXPECT_EQ(h.drain(), "QUIT\r\n");
  EXPECT_EQ(h.c.stage(), client_stage::quit);
  h.talk("221 2.0.0 Bye\r\n");
  EXPECT_EQ(h.c.stage(), client_stage::done);
  EXPECT_FALSE(h.c.failed());
  EXPECT_EQ(h.c.messages(), 1u);
}

TEST(Client, PlainSmtpWithPipelining) {
  harness h;
  h.start();
  h.talk("250-mx.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n");
  EXPECT_EQ(h.send(),
            "MAIL FROM:<a@b.test> SIZE=21\r\nRCPT TO:<x@y.test>\r\nRCPT TO:<z@y.test>\r\nDATA\r\n");
  EXPECT_EQ(h.c.stage(), client_stage::mail);
  EXPECT_EQ(h.talk("250 Ok\r\n250 Ok\r\n"), "");
  EXPECT_EQ(h.c.stage(), client_stage::rcpt);
  EXPECT_EQ(h.talk("451 4.3.0 try later\r\n354 go\r\n"), "Subject: t\r\n\r\nhello\r\n.\r\n");
  EXPECT_EQ(h.talk("250 Ok\r\n"), "");
  EXPECT_EQ(h.res(0).status, rcpt_status::delivered);
  EXPECT_EQ(h.res(1).status, rcpt_status::deferred);
  EXPECT_STREQ(h.res(1).reply.status, "4.3.0");
  // Reply without an enhanced code: synthesised from the class.
  EXPECT_STREQ(h.res(0).reply.status, "2.0.0");
}

TEST(Client, LmtpMixedResultsAfterData) {
  harness h;
  h.cfg.protocol = client_protocol::lmtp;
  h.rcpts = {{"a@l.test", 0, {}}, {"b@l.test", 0, {}}, {"c@l.test", 0, {}}, {"d@l.test", 0, {}}};
  EXPECT_EQ(h.start("220 lmtp.test LMTP\r\n"), "LHLO relay.test\r\n");
  h.talk("250-lmtp.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n");
  EXPECT_EQ(h.send(),
            "MAIL FROM:<a@b.test>\r\nRCPT TO:<a@l.test>\r\nRCPT TO:<b@l.test>\r\nRCPT TO:<c@l.test>\r\n"
            "RCPT TO:<d@l.test>\r\nDATA\r\n");
  EXPECT_EQ(h.talk("250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 unknown\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n354 go\r\n"),
            "Subject: t\r\n\r\nhello\r\n.\r\n");
  EXPECT_EQ(h.c.stage(), client_stage::data_done);
  h.talk("250 2.0.0 a saved\r\n");
  EXPECT_EQ(h.c.stage(), client_stage::data_done);  // two more replies owed
  EXPECT_FALSE(h.c.has_results());
  h.talk("452 4.2.2 mailbox full\r\n552 5.2.2 too big for d\r\n");
  EXPECT_EQ(h.c.stage(), client_stage::idle);
  ASSERT_TRUE(h.c.has_results());
  EXPECT_EQ(h.res(0).status, rcpt_status::delivered);
  EXPECT_EQ(h.res(1).status, rcpt_status::failed);
  EXPECT_EQ(h.res(1).reply.cmd, client_cmd::rcpt);
  EXPECT_EQ(h.res(2).status, rcpt_status::deferred);
  EXPECT_STREQ(h.res(2).reply.status, "4.2.2");
  EXPECT_EQ(h.res(2).reply.cmd, client_cmd::dot);
  EXPECT_EQ(h.res(3).status, rcpt_status::failed);
  EXPECT_EQ(h.res(3).reply.text, "5.2.2 too big for d");
}

TEST(Client, LmtpLhloRefusedHasNoHeloFallback) {
  harness h;
  h.cfg.protocol = client_protocol::lmtp;
  h.start();
  EXPECT_EQ(h.talk("500 5.5.1 what\r\n"), "");
  EXPECT_EQ(h.c.stage(), client_stage::done);
  EXPECT_TRUE(h.c.failed());
  EXPECT_EQ(h.c.failure().code, 500);
  EXPECT_EQ(h.c.failure().cmd, client_cmd::lhlo);
}

TEST(Client, TlsRequiredButNotOfferedSendsNothingElse) {
  for (auto pol : {tls_policy::encrypt, tls_policy::verify}) {
    harness h;
    h.cfg.tls = pol;
    std::string out = h.start();
    out += h.talk("250-mx.test\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n");
    EXPECT_EQ(out, "EHLO relay.test\r\n");
    EXPECT_EQ(h.c.stage(), client_stage::done);
    EXPECT_TRUE(h.c.failed());
    EXPECT_FALSE(h.c.failure_is_permanent());
    EXPECT_EQ(h.c.failure().text, "TLS is required, but was not offered by host");
    EXPECT_STREQ(h.c.failure().status, "4.7.4");
    h.msg.rcpts = h.rcpts;
    EXPECT_FALSE(h.c.send(h.msg));
    h.c.quit();
    EXPECT_EQ(h.drain(), "");
  }
}

TEST(Client, TlsRequiredButEngineUnavailable) {
  harness h;
  h.cfg.tls = tls_policy::encrypt;
  h.cfg.tls_available = false;
  h.start();
  EXPECT_EQ(h.talk("250-mx.test\r\n250 STARTTLS\r\n"), "");
  EXPECT_TRUE(h.c.failed());
  EXPECT_EQ(h.c.failure().text, "TLS is required, but our TLS engine is unavailable");
}

TEST(Client, StartTlsRefusedUnderMayContinuesInClear) {
  harness h;
  h.start();
  EXPECT_EQ(h.talk("250-mx.test\r\n250-STARTTLS\r\n250 PIPELINING\r\n"), "STARTTLS\r\n");
  EXPECT_EQ(h.c.stage(), client_stage::starttls);
  EXPECT_EQ(h.talk("454 4.7.0 TLS not available\r\n"), "");
  EXPECT_EQ(h.c.stage(), client_stage::idle);
  EXPECT_FALSE(h.c.secure());
  EXPECT_EQ(h.send(), "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nRCPT TO:<z@y.test>\r\nDATA\r\n");
}

TEST(Client, StartTlsRefusedUnderEncryptFails) {
  harness h;
  h.cfg.tls = tls_policy::encrypt;
  h.start();
  EXPECT_EQ(h.talk("250-mx.test\r\n250 STARTTLS\r\n"), "STARTTLS\r\n");
  EXPECT_EQ(h.talk("454 4.7.0 TLS not available\r\n"), "");
  EXPECT_EQ(h.c.stage(), client_stage::done);
  EXPECT_TRUE(h.c.failed());
  EXPECT_EQ(h.c.failure().text, "TLS is required, but host refused to start TLS: 454 4.7.0 TLS not available");
  EXPECT_STREQ(h.c.failure().status, "4.7.4");
}

TEST(Client, TlsHandshakeFailureEndsTheConnection) {
  for (auto pol : {tls_policy::may, tls_policy::encrypt}) {
    harness h;
    h.cfg.tls = pol;
    h.start();
    EXPECT_EQ(h.talk("250-mx.test\r\n250 STARTTLS\r\n"), "STARTTLS\r\n");
    h.talk("220 2.0.0 go\r\n");
    EXPECT_EQ(h.c.stage(), client_stage::tls_handshake);
    h.c.tls_done(false);
    EXPECT_EQ(h.drain(), "");
    EXPECT_EQ(h.c.stage(), client_stage::done);
    EXPECT_EQ(h.c.failure().text, "Cannot start TLS: handshake failure");
  }
}

// STARTTLS response injection (CVE-2011-0411): a reply that came in clear with the 220 must
// not be taken as the reply to the EHLO sent over TLS.
TEST(Client, StartTlsResponseInjectionIsDiscarded) {
  harness h;
  h.cfg.tls = tls_policy::encrypt;
  h.start();
  EXPECT_EQ(h.talk("250-mx.test\r\n250-SIZE 10\r\n250-AUTH PLAIN\r\n250 STARTTLS\r\n"), "STARTTLS\r\n");
  EXPECT_TRUE(h.c.caps().size);
  EXPECT_EQ(h.talk("220 go ahead\r\n250 fake\r\n"), "");
  EXPECT_EQ(h.c.stage(), client_stage::tls_handshake);
  EXPECT_EQ(h.talk("250 more fake, before the handshake is done\r\n"), "");
  h.c.tls_done(true);
  EXPECT_EQ(h.drain(), "EHLO relay.test\r\n");
  EXPECT_TRUE(h.c.secure());
  EXPECT_EQ(h.c.stage(), client_stage::ehlo);
  // Capabilities learnt in clear are forgotten.
  EXPECT_FALSE(h.c.caps().size);
  EXPECT_FALSE(h.c.caps().starttls);
  EXPECT_FALSE(h.c.caps().auth);
  EXPECT_EQ(h.talk("250-mx.test\r\n250 PIPELINING\r\n"), "");
  EXPECT_EQ(h.c.stage(), client_stage::idle);
  EXPECT_TRUE(h.c.caps().pipelining);
  EXPECT_FALSE(h.c.caps().size);
  // The content is over the clear-text SIZE 10, but that limit no longer applies.
  EXPECT_EQ(h.send(), "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nRCPT TO:<z@y.test>\r\nDATA\r\n");
}

TEST(Client, AuthPlainOnlyAfterTls) {
  harness h;
  h.cfg.auth_user = "user";
  h.cfg.auth_password = "pass";
  h.start();
  EXPECT_EQ(h.talk("250-mx.test\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n"), "STARTTLS\r\n");
  h.talk("220 go\r\n");
  h.c.tls_done(true);
  EXPECT_EQ(h.drain(), "EHLO relay.test\r\n");
  EXPECT_EQ(h.talk("250-mx.test\r\n250 AUTH LOGIN PLAIN\r\n"), "AUTH PLAIN AHVzZXIAcGFzcw==\r\n");
  EXPECT_EQ(h.c.stage(), client_stage::auth);
  EXPECT_EQ(h.talk("235 2.7.0 Authentication successful\r\n"), "");
  EXPECT_EQ(h.c.stage(), client_stage::idle);
  EXPECT_EQ(h.send(), "MAIL FROM:<a@b.test>\r\n");
}

TEST(Client, AuthLoginExchange) {
  harness h;
  h.cfg.auth_user = "user";
  h.cfg.auth_password = "secret!";
  h.start();
  h.talk("250-mx.test\r\n250 STARTTLS\r\n");
  h.talk("220 go\r\n");
  h.c.tls_done(true);
  h.drain();
  EXPECT_EQ(h.talk("250-mx.test\r\n250 AUTH=LOGIN\r\n"), "AUTH LOGIN\r\n");  // the old AUTH= form
  EXPECT_EQ(h.talk("334 VXNlcm5hbWU6\r\n"), "dXNlcg==\r\n");
  EXPECT_EQ(h.talk("334 UGFzc3dvcmQ6\r\n"), "c2VjcmV0IQ==\r\n");
  EXPECT_EQ(h.talk("235 ok\r\n"), "");
  EXPECT_EQ(h.c.stage(), client_stage::idle);
}

TEST(Client, AuthFailureIsADeferral) {
  harness h;
  h.cfg.auth_user = "user";
  h.cfg.auth_password = "pass";
  h.start();
  h.talk("250-mx.test\r\n250 STARTTLS\r\n");
  h.talk("220 go\r\n");
  h.c.tls_done(true);
  h.drain();
  h.talk("250-mx.test\r\n250 AUTH PLAIN\r\n");
  EXPECT_EQ(h.talk("535 5.7.8 Authentication credentials invalid\r\n"), "");
  EXPECT_EQ(h.c.stage(), client_stage::done);
  EXPECT_TRUE(h.c.failed());
  EXPECT_FALSE(h.c.failure_is_permanent());
  EXPECT_EQ(h.c.failure().code, 535);
  EXPECT_EQ(h.c.failure().cmd, client_cmd::auth);
}

TEST(Client, CredentialsAreNeverSentInClear) {
  harness h;
  h.cfg.auth_user = "user";
  h.cfg.auth_password = "pass";
  h.start();
  // No STARTTLS offered (policy may would go on in clear), AUTH offered.
  EXPECT_EQ(h.talk("250-mx.test\r\n250 AUTH PLAIN LOGIN\r\n"), "");
  EXPECT_EQ(h.c.stage(), client_stage::done);
  EXPECT_TRUE(h.c.failed());
  EXPECT_FALSE(h.c.failure_is_permanent());
  EXPECT_NE(h.c.failure().text.find("not encrypted"), std::string::npos);
}

TEST(Client, SizeOverAdvertisedLimitFailsWithoutMail) {
  harness h;
  h.start();
  h.talk("250-mx.test\r\n250 SIZE 20\r\n");
  EXPECT_EQ(h.send(), "");
  EXPECT_EQ(h.c.stage(), client_stage::idle);
  ASSERT_TRUE(h.c.has_results());
  for (auto& r : h.c.results()) {
    EXPECT_EQ(r.status, rcpt_status::failed);
    EXPECT_STREQ(r.reply.status, "5.3.4");
    EXPECT_EQ(r.reply.text, "message size 21 exceeds size limit 20 of server");
    EXPECT_EQ(r.reply.code, 0);
  }
  // Nothing was sent: the next message needs no RSET.
  h.content = "small\r\n";
  EXPECT_EQ(h.send(), "MAIL FROM:<a@b.test> SIZE=7\r\n");
}

TEST(Client, Smtputf8RequiredButNotOffered) {
  harness h;
  h.start();
  h.talk("250-mx.test\r\n250 8BITMIME\r\n");
  h.msg.smtputf8 = true;
  EXPECT_EQ(h.send(), "");
  for (auto& r : h.c.results()) {
    EXPECT_EQ(r.status, rcpt_status::failed);
    EXPECT_STREQ(r.reply.status, "5.6.7");
    EXPECT_EQ(r.reply.text, "SMTPUTF8 is required, but was not offered by host");
  }
}

TEST(Client, ParametersOnlyWhenOffered) {
  std::vector<spool::rcpt_view> rcpts{
      {"x@y.test", spool::notify_success | spool::notify_delay, "rfc822;x+40y.test"},
      {"z@y.test", spool::notify_never, {}},
      {"w@y.test", spool::notify_failure, "bad orcpt"}};
  {
    harness h;
    h.rcpts = rcpts;
    h.start();
    h.talk("250 mx.test\r\n");
    h.msg.body = spool::body_type::eight_bit_mime;
    h.msg.ret = spool::dsn_ret::hdrs;
    h.msg.envid = "abc+2Bdef";
    EXPECT_EQ(h.send(), "MAIL FROM:<a@b.test>\r\n");
  }
  {
    harness h;
    h.rcpts = rcpts;
    h.start();
    h.talk("250-mx.test\r\n250-pipelining\r\n250-size\r\n250-8bitmime\r\n250-SmtpUtf8\r\n250 dsn\r\n");
    h.msg.body = spool::body_type::eight_bit_mime;
    h.msg.smtputf8 = true;
    h.msg.ret = spool::dsn_ret::hdrs;
    h.msg.envid = "abc+2Bdef";
    EXPECT_EQ(h.send(),
              "MAIL FROM:<a@b.test> SIZE=21 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=abc+2Bdef\r\n"
              "RCPT TO:<x@y.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;x+40y.test\r\n"
              "RCPT TO:<z@y.test> NOTIFY=NEVER\r\n"
              "RCPT TO:<w@y.test> NOTIFY=FAILURE\r\n"
              "DATA\r\n");
  }
  {  // SMTPUTF8 offered but not needed; a null sender; RET=FULL
    harness h;
    h.start();
    h.talk("250-mx.test\r\n250-SMTPUTF8\r\n250 DSN\r\n");
    h.msg.sender = "";
    h.msg.ret = spool::dsn_ret::full;
    EXPECT_EQ(h.send(), "MAIL FROM:<> RET=FULL\r\n");
  }
}

TEST(Client, DotStuffingAndLineEndNormalisation) {
  struct {
    const char* in;
    const char* out;
  } cases[] = {
      {".a\r\nb\rc\nd\r\n..e\r\n.\r\nlast", "..a\r\nb\r\nc\r\nd\r\n...e\r\n..\r\nlast\r\n.\r\n"},
      {"x\r", "x\r\n.\r\n"},
      {"", ".\r\n"},
      {"\n.x", "\r\n..x\r\n.\r\n"},
      {"a\r\r\nb\n\n", "a\r\n\r\nb\r\n\r\n.\r\n"},
      {"\r.\r\n", "\r\n..\r\n.\r\n"},
      {"end\r\n", "end\r\n.\r\n"},
  };
  for (auto& k : cases) {
    harness h;
    h.start();
    h.talk("250 mx.test\r\n");
    h.content = k.in;
    h.rcpts.resize(1);
    EXPECT_EQ(h.send(), "MAIL FROM:<a@b.test>\r\n");
    h.talk("250 ok\r\n");
    h.talk("250 ok\r\n");
    EXPECT_EQ(h.talk("354 go\r\n"), k.out) << k.in;
    EXPECT_EQ(reference_body(k.in), k.out);
  }
}

TEST(Client, LargeBodyProducedInBoundedPieces) {
  std::mt19937 rng(42);
  std::string content;
  const char alphabet[] = "ab.\r\n.xyz";
  while (content.size() < 200 * 1024) {
    size_t len = rng() % 100;
    for (size_t i = 0; i < len; ++i) content += alphabet[rng() % (sizeof alphabet - 1)];
    content += "\r\n";
  }
  content += ".tail";  // no final CRLF
  const std::string want = reference_body(content);
  for (size_t budget : {size_t(1), size_t(2), size_t(7), size_t(4096)}) {
    harness h;
    h.content = content;
    h.rcpts.resize(1);
    h.start();
    h.talk("250-mx.test\r\n250 PIPELINING\r\n");
    h.send();
    h.c.feed("250 ok\r\n250 ok\r\n354 go\r\n");
    std::string body, piece;
    h.c.take_output(piece);
    EXPECT_EQ(piece, "");
    size_t pieces = 0;
    while (h.c.stage() == client_stage::body) {
      size_t n = h.c.produce(budget);
      h.c.take_output(piece);
      ASSERT_EQ(n, piece.size());
      ASSERT_LE(piece.size(), budget);
      ASSERT_GT(piece.size(), 0u);
      body += piece;
      ++pieces;
    }
    EXPECT_EQ(body, want) << budget;
    EXPECT_TRUE(clean_crlf(body));
    EXPECT_GE(pieces, want.size() / budget);
    EXPECT_EQ(h.c.stage(), client_stage::data_done);
    h.talk("250 ok\r\n");
    EXPECT_EQ(h.res(0).status, rcpt_status::delivered);
  }
}

TEST(Client, DataAcceptedWithoutRecipientsGetsALoneDot) {
  harness h;
  h.start();
  h.talk("250-mx.test\r\n250 PIPELINING\r\n");
  h.send();
  EXPECT_EQ(h.talk("250 ok\r\n550 5.1.1 no x\r\n450 4.2.0 no z\r\n354 go\r\n"), ".\r\n");
  EXPECT_EQ(h.c.stage(), client_stage::data_done);
  EXPECT_EQ(h.talk("554 5.5.1 no valid recipients\r\n"), "");
  EXPECT_EQ(h.c.stage(), client_stage::idle);
  EXPECT_EQ(h.res(0).status, rcpt_status::failed);
  EXPECT_EQ(h.res(0).reply.cmd, client_cmd::rcpt);
  EXPECT_EQ(h.res(1).status, rcpt_status::deferred);
  EXPECT_EQ(h.c.messages(), 0u);
  // The dot ended the transaction at the server: no RSET.
  EXPECT_EQ(h.send(), "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nRCPT TO:<z@y.test>\r\nDATA\r\n");
}

TEST(Client, PipelinedMailRefusedDecidesForAll) {
  harness h;
  h.start();
  h.talk("250-mx.test\r\n250 PIPELINING\r\n");
  h.send();
  EXPECT_EQ(h.talk("553 5.7.1 sender rejected\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"
                   "503 5.5.1 need RCPT\r\n"),
            "");
  EXPECT_EQ(h.c.stage(), client_stage::idle);
  for (auto& r : h.c.results()) {
    EXPECT_EQ(r.status, rcpt_status::failed);
    EXPECT_EQ(r.reply.code, 553);
    EXPECT_EQ(r.reply.cmd, client_cmd::mail);
  }
  EXPECT_EQ(h.send(), "RSET\r\n");
}

TEST(Client, AllRecipientsRefusedWithoutPipeliningSendsNoDataThenRset) {
  harness h;
  h.start();
  h.talk("250 mx.test\r\n");
  EXPECT_EQ(h.send(), "MAIL FROM:<a@b.test>\r\n");
  EXPECT_EQ(h.talk("250 ok\r\n"), "RCPT TO:<x@y.test>\r\n");
  EXPECT_EQ(h.talk("550 no\r\n"), "RCPT TO:<z@y.test>\r\n");
  EXPECT_EQ(h.talk("450 later\r\n"), "");
  EXPECT_EQ(h.c.stage(), client_stage::idle);
  EXPECT_EQ(h.res(0).status, rcpt_status::failed);
  EXPECT_EQ(h.res(1).status, rcpt_status::deferred);
  EXPECT_STREQ(h.res(1).reply.status, "4.0.0");
  EXPECT_EQ(h.send(), "RSET\r\n");
  EXPECT_EQ(h.c.stage(), client_stage::rset);
  EXPECT_EQ(h.talk("250 ok\r\n"), "MAIL FROM:<a@b.test>\r\n");
  EXPECT_EQ(h.talk("250 ok\r\n"), "RCPT TO:<x@y.test>\r\n");
}

TEST(Client, MailRefusedWithoutPipelining) {
  harness h;
  h.start();
  h.talk("250 mx.test\r\n");
  EXPECT_EQ(h.send(), "MAIL FROM:<a@b.test>\r\n");
  EXPECT_EQ(h.talk("451 4.3.0 local error\r\n"), "");
  EXPECT_EQ(h.res(0).status, rcpt_status::deferred);
  EXPECT_EQ(h.res(1).status, rcpt_status::deferred);
  EXPECT_EQ(h.res(1).reply.cmd, client_cmd::mail);
  EXPECT_EQ(h.send(), "RSET\r\n");
}

TEST(Client, DataRefused) {
  harness h;
  h.start();
  h.talk("250-mx.test\r\n250 PIPELINING\r\n");
  h.send();
  EXPECT_EQ(h.talk("250 ok\r\n250 ok\r\n550 no z\r\n554 5.3.0 no DATA today\r\n"), "");
  EXPECT_EQ(h.res(0).status, rcpt_status::failed);
  EXPECT_EQ(h.res(0).reply.cmd, client_cmd::data);
  EXPECT_EQ(h.res(1).reply.cmd, client_cmd::rcpt);
  EXPECT_EQ(h.send(), "RSET\r\n");
}

TEST(Client, MultiLineReplies) {
  harness h;
  EXPECT_EQ(h.start("220-mx.test hello\r\n220-second line\r\n220 last\r\n"), "EHLO relay.test\r\n");
  h.talk("250-mx.test\r\n250 PIPELINING\r\n");
  h.send();
  // Lines may come in pieces, and LF alone ends a line as well.
  h.talk("250 ok\r\n550-5.1.1 first");
  h.talk(" part\r\n550-5.1.1 sec\x01nd\n");
  h.talk("550 5.1.1 third\r\n250 ok\r\n354 go\r\n");
  h.talk("250 ok\r\n");
  EXPECT_EQ(h.res(0).status, rcpt_status::failed);
  EXPECT_STREQ(h.res(0).reply.status, "5.1.1");
  EXPECT_EQ(h.res(0).reply.text, "5.1.1 first part 5.1.1 sec?nd 5.1.1 third");
  EXPECT_EQ(h.res(1).status, rcpt_status::delivered);
}

TEST(Client, ReplyTextIsCutToTheLimit) {
  harness h;
  h.cfg.limits.reply_text_length = 10;
  h.start();
  h.talk("250 mx.test\r\n");
  h.rcpts.resize(1);
  h.send();
  h.talk("250 ok\r\n");
  h.talk("550-0123456789abcdef\r\n550 more\r\n");
  EXPECT_EQ(h.res(0).reply.text, "0123456789");
}

TEST(Client, MalformedRepliesAreProtocolErrors) {
  const std::string long_line = "250 " + std::string(2100, 'a') + "\r\n";
  std::string many;
  for (int i = 0; i < 300; ++i) many += "250-x\r\n";
  const std::string cases[] = {
      "22 short\r\n", "abc oops\r\n", "2x0 bad\r\n", "250-a\r\n251 b\r\n", "2501 x\r\n", "250_x\r\n",
      long_line, std::string(3000, 'a'),  // no line end at all
      many, "150 wait\r\n", "620 x\r\n", "260 x\r\n", "\r\n", "354 what\r\n",
  };
  for (auto& k : cases) {
    harness h;
    h.start();
    ASSERT_EQ(h.c.stage(), client_stage::ehlo);
    EXPECT_EQ(h.talk(k), "") << k.substr(0, 40);
    EXPECT_EQ(h.c.stage(), client_stage::done) << k.substr(0, 40);
    EXPECT_TRUE(h.c.failed());
    EXPECT_STREQ(h.c.failure().status, "4.5.0");
    EXPECT_EQ(h.c.failure().text.rfind("protocol error", 0), 0u) << h.c.failure().text;
  }
}

TEST(Client, ReplyBoundsAreConfigurable) {
  harness h;
  h.cfg.limits.reply_lines = 3;
  h.cfg.limits.reply_line_length = 20;
  h.start();
  h.talk("250-mx.test\r\n250-a\r\n250 b\r\n");
  EXPECT_EQ(h.c.stage(), client_stage::idle);  // exactly at both bounds
  h.start();
  h.talk("250-mx.test\r\n250-a\r\n250-b\r\n250 c\r\n");
  EXPECT_TRUE(h.c.failed());
  h.start();
  h.talk("250 " + std::string(17, 'x') + "\r\n");
  EXPECT_TRUE(h.c.failed());
}

TEST(Client, ServerRunningAheadIsAProtocolError) {
  harness h;
  EXPECT_EQ(h.start("220 mx.test\r\n250 I answer before you ask\r\n"), "");
  EXPECT_TRUE(h.c.failed());
  EXPECT_EQ(h.c.failure().text, "protocol error: server sent data ahead of our command");
}

TEST(Client, UnsolicitedReplyWhileIdle) {
  harness h;
  h.start();
  h.talk("250 mx.test\r\n");
  h.talk("421 4.4.2 idle too long\r\n");
  EXPECT_TRUE(h.c.failed());
  EXPECT_EQ(h.c.failure().code, 421);
  h.start();
  h.talk("250 mx.test\r\n");
  h.talk("250 hello?\r\n");
  EXPECT_EQ(h.c.failure().text, "protocol error: reply without a command");
}

TEST(Client, ServerClosingMidTransaction) {
  harness h;
  h.start();
  h.talk("250-mx.test\r\n250 PIPELINING\r\n");
  h.send();
  EXPECT_EQ(h.talk("250 ok\r\n250 ok\r\n421 4.3.2 shutting down\r\n"), "");
  EXPECT_EQ(h.c.stage(), client_stage::done);
  EXPECT_TRUE(h.c.failed());
  EXPECT_EQ(h.c.failure().code, 421);
  ASSERT_TRUE(h.c.has_results());
  for (auto& r : h.c.results()) {
    EXPECT_EQ(r.status, rcpt_status::deferred);  // the accepted one too
    EXPECT_EQ(r.reply.code, 421);
    EXPECT_STREQ(r.reply.status, "4.3.2");
  }
}

TEST(Client, GreetingRefused) {
  harness h;
  EXPECT_EQ(h.start("554 5.7.1 go away\r\n"), "");
  EXPECT_TRUE(h.c.failed());
  EXPECT_TRUE(h.c.failure_is_permanent());
  EXPECT_EQ(h.c.failure().code, 554);
  EXPECT_EQ(h.c.failure().cmd, client_cmd::greeting);
  h.start("421 4.3.2 busy\r\n");
  EXPECT_TRUE(h.c.failed());
  EXPECT_FALSE(h.c.failure_is_permanent());
  EXPECT_EQ(h.c.failure().code, 421);
}

TEST(Client, TimeoutInEachStage) {
  struct step {
    client_stage stage;
    const char* phrase;
  };
  // Drive one dialogue and give up at the n-th stage.
  const step steps[] = {
      {client_stage::greeting, "receiving the initial server greeting"},
      {client_stage::ehlo, "performing the HELO handshake"},
      {client_stage::starttls, "receiving the STARTTLS reply"},
      {client_stage::tls_handshake, "performing the TLS handshake"},
      {client_stage::auth, "performing authentication"},
      {client_stage::mail, "sending MAIL FROM"},
      {client_stage::rcpt, "sending RCPT TO"},
      {client_stage::data_init, "sending DATA command"},
      {client_stage::body, "sending message content"},
      {client_stage::data_done, "sending end of data -- message may be sent more than once"},
  };
  for (size_t n = 0; n < std::size(steps); ++n) {
    harness h;
    h.cfg.auth_user = "u";
    h.cfg.auth_password = "p";
    h.c.reset(h.cfg);
    EXPECT_EQ(h.c.stage(), client_stage::connect);
    h.c.connected();
    auto at = [&](size_t k) {
      EXPECT_EQ(h.c.stage(), steps[k].stage) << k;
      return k == n;
    };
    [&] {
      if (at(0)) return;
      h.talk(greeting);
      if (at(1)) return;
      h.talk("250-mx.test\r\n250 STARTTLS\r\n");
      if (at(2)) return;
      h.talk("220 go\r\n");
      if (at(3)) return;
      h.c.tls_done(true);
      h.talk("250-mx.test\r\n250 AUTH PLAIN\r\n");
      if (at(4)) return;
      h.talk("235 ok\r\n");
      h.send();
      if (at(5)) return;
      h.talk("250 ok\r\n");
      if (at(6)) return;
      h.talk("250 ok\r\n");  // no pipelining: one reply at a time
      h.talk("250 ok\r\n");
      if (at(7)) return;
      h.c.feed("354 go\r\n");
      if (at(8)) return;
      h.drain();
      at(9);
    }();
    h.c.timeout();
    EXPECT_EQ(h.c.stage(), client_stage::done);
    EXPECT_TRUE(h.c.failed());
    EXPECT_STREQ(h.c.failure().status, "4.4.2");
    EXPECT_EQ(h.c.failure().text, std::string("conversation timed out while ") + steps[n].phrase);
    if (n >= 5) {
      ASSERT_TRUE(h.c.has_results()) << n;
      for (auto& r : h.c.results()) EXPECT_EQ(r.status, rcpt_status::deferred);
    }
  }
  {  // RSET
    harness h;
    h.start();
    h.talk("250 mx.test\r\n");
    h.send();
    h.talk("550 no\r\n");
    EXPECT_EQ(h.send(), "RSET\r\n");
    h.c.timeout();
    EXPECT_EQ(h.c.failure().text, "conversation timed out while sending RSET");
    for (auto& r : h.c.results()) EXPECT_EQ(r.status, rcpt_status::deferred);
  }
  {  // QUIT: done, without a failure
    harness h;
    h.start();
    h.talk("250 mx.test\r\n");
    h.c.quit();
    EXPECT_EQ(h.drain(), "QUIT\r\n");
    h.c.timeout();
    EXPECT_EQ(h.c.stage(), client_stage::done);
    EXPECT_FALSE(h.c.failed());
  }
}

TEST(Client, LostConnection) {
  harness h;
  h.start();
  h.talk("250-mx.test\r\n250 PIPELINING\r\n");
  h.send();
  h.talk("250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n");
  EXPECT_EQ(h.c.stage(), client_stage::data_done);
  h.c.lost();
  EXPECT_EQ(h.c.stage(), client_stage::done);
  EXPECT_EQ(h.c.failure().text,
            "lost connection while sending end of data -- message may be sent more than once");
  EXPECT_EQ(h.res(0).status, rcpt_status::deferred);
}

TEST(Client, ConnectionReuseForTwoMessages) {
  harness h;
  h.start();
  h.talk("250-mx.test\r\n250 PIPELINING\r\n");
  h.send();
  h.talk("250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n");
  h.talk("250 2.0.0 first\r\n");
  EXPECT_EQ(h.c.stage(), client_stage::idle);
  EXPECT_EQ(h.res(1).reply.text, "2.0.0 first");
  h.rcpts = {{"q@r.test", 0, {}}};
  h.content = "second\r\n";
  h.msg.sender = "s@b.test";
  EXPECT_EQ(h.send(), "MAIL FROM:<s@b.test>\r\nRCPT TO:<q@r.test>\r\nDATA\r\n");
  EXPECT_FALSE(h.c.has_results());
  EXPECT_EQ(h.talk("250 ok\r\n250 ok\r\n354 go\r\n"), "second\r\n.\r\n");
  h.talk("250 2.0.0 second\r\n");
  ASSERT_EQ(h.c.results().size(), 1u);
  EXPECT_EQ(h.res(0).status, rcpt_status::delivered);
  EXPECT_EQ(h.res(0).reply.text, "2.0.0 second");
  EXPECT_EQ(h.c.messages(), 2u);
  h.c.quit();
  EXPECT_EQ(h.drain(), "QUIT\r\n");
  h.c.lost();  // the server closed after 221 without us reading it: fine
  EXPECT_FALSE(h.c.failed());
}

TEST(Client, EhloRefusedFallsBackToHelo) {
  harness h;
  h.start();
  EXPECT_EQ(h.talk("502 5.5.2 EHLO not understood\r\n"), "HELO relay.test\r\n");
  EXPECT_EQ(h.c.stage(), client_stage::helo);
  EXPECT_EQ(h.talk("250 mx.test\r\n"), "");
  EXPECT_EQ(h.c.stage(), client_stage::idle);
  EXPECT_FALSE(h.c.caps().esmtp);
  h.msg.body = spool::body_type::eight_bit_mime;
  h.msg.ret = spool::dsn_ret::full;
  EXPECT_EQ(h.send(), "MAIL FROM:<a@b.test>\r\n");
}

TEST(Client, EhloRefusedWithTlsRequiredFails) {
  harness h;
  h.cfg.tls = tls_policy::encrypt;
  h.start();
  EXPECT_EQ(h.talk("502 5.5.2 EHLO not understood\r\n"), "");
  EXPECT_EQ(h.c.stage(), client_stage::done);
  EXPECT_TRUE(h.c.failed());
  EXPECT_FALSE(h.c.failure_is_permanent());
  EXPECT_EQ(h.c.failure().text, "TLS is required, but was not offered by host");
}

TEST(Client, EhloTemporaryRefusalFails) {
  harness h;
  h.start();
  EXPECT_EQ(h.talk("450 4.3.0 not now\r\n"), "");
  EXPECT_TRUE(h.c.failed());
  EXPECT_EQ(h.c.failure().code, 450);
}

TEST(Client, AddressesWithControlBytesAreNeverSent) {
  harness h;
  h.start();
  h.talk("250-mx.test\r\n250 PIPELINING\r\n");
  h.rcpts = {{"x@y.test\r\nDATA", 0, {}}, {"z@y.test", 0, {}}};
  EXPECT_EQ(h.send(), "MAIL FROM:<a@b.test>\r\nRCPT TO:<z@y.test>\r\nDATA\r\n");
  h.talk("250 ok\r\n250 ok\r\n354 go\r\n");
  h.talk("250 ok\r\n");
  EXPECT_EQ(h.res(0).status, rcpt_status::failed);
  EXPECT_STREQ(h.res(0).reply.status, "5.1.3");
  EXPECT_EQ(h.res(1).status, rcpt_status::delivered);
  h.msg.sender = "a\n@b";
  EXPECT_EQ(h.send(), "");
  EXPECT_STREQ(h.res(0).reply.status, "5.1.7");
}

TEST(Client, CapabilityParsing) {
  harness h;
  h.start();
  h.talk("250-mx.test greets you\r\n250-pipelining\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n"
         "250-smtputf8\r\n250-DSN\r\n250-CHUNKING\r\n250-ENHANCEDSTATUSCODES\r\n250-auth=plain\r\n"
         "250 AUTH CRAM-MD5 LOGIN\r\n");
  auto& k = h.c.caps();
  EXPECT_TRUE(k.esmtp && k.pipelining && k.size && k.eightbitmime && k.smtputf8 && k.dsn && k.chunking &&
              k.enhancedstatuscodes && k.auth && k.auth_plain && k.auth_login);
  EXPECT_FALSE(k.starttls);
  EXPECT_EQ(k.size_limit, 52428800u);
}

// A connection that is reused for message after message reaches a steady state in which the
// client allocates nothing: buffers, the reply queue and the result strings keep their
// capacity (the host's output string is swapped, not copied).
TEST(Client, SteadyStateMessagesAllocateNothing) {
  harness h;
  h.budget = 1000;
  h.rcpts = {{"first.recipient@example.net", spool::notify_failure, "rfc822;first.recipient@example.net"},
             {"second.recipient@example.net", 0, {}}};
  h.content = "Subject: steady\r\n\r\n";
  while (h.content.size() < 8192) h.content += ".x" + std::string(70, 'y') + "\n";
  h.start();
  h.talk("250-mx.example.net says hello\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250-8BITMIME\r\n250 DSN\r\n");
  h.msg.rcpts = h.rcpts;
  h.msg.content = h.content;
  const std::string replies =
      "250 2.1.0 sender ok, and a long text\r\n250 2.1.5 recipient ok, and a long text\r\n"
      "550-5.1.1 no such user here, with a text\r\n550 5.1.1 that runs on two lines\r\n354 go ahead\r\n";
  const std::string done = "250 2.0.0 Ok: queued as 0123456789ABCDEF\r\n";
  std::string out;
  size_t bytes = 0;
  auto one = [&] {
    if (!h.c.send(h.msg)) return false;
    h.c.take_output(out);
    h.c.feed(replies);
    while (h.c.stage() == client_stage::body) {
      h.c.produce(h.budget);
      h.c.take_output(out);
      bytes += out.size();
    }
    h.c.feed(done);
    return h.c.has_results() && h.res(0).status == rcpt_status::delivered &&
           h.res(1).status == rcpt_status::failed;
  };
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(one());
  long before = allocations.load();
  for (int i = 0; i < 100; ++i) ASSERT_TRUE(one());
  long during = allocations.load() - before;
  EXPECT_EQ(during, 0) << "heap allocations in 100 steady-state messages";
  EXPECT_GT(bytes, 100u * 8192u);
}
