// Byte-exact SMTP dialogues against the sans-I/O session, with a fake host (fixed clock,
// fixed queue ids, a spool that succeeds or fails on demand).
#include "src/smtp/session.hh"

#include <gtest/gtest.h>

#include <cstring>
#include <string>

#include "spool/record.hh"

using namespace tern;
using namespace tern::smtp;

namespace {

struct fake_host : session_host {
  int next = 0;
  bool healthy = true;
  void new_queue_id(char (&out)[queue_id_len + 1]) override {
    snprintf(out, sizeof out, "%018d", ++next);
  }
  bool spool_healthy() const override { return healthy; }
  uint64_t wall_us() const override { return 1'700'000'000'000'000ull; }
};

struct harness {
  policy pol;
  fake_host host;
  session s;
  std::string last_record;
  bool commit_ok = true;

  explicit harness(const char* client = "127.0.0.1") {
    pol.hostname = "relay.test";
    pol.limits.message_size = 1000;
    pol.limits.recipients = 3;
    pol.limits.line_length = 512;
    pol.limits.errors = 5;
    pol.relay_networks.push_back(*net::cidr::parse("127.0.0.0/8"));
    pol.relay_domains = {"example.com", ".sub.example.org"};
    conn_info ci;
    ci.client = *net::address::from_ip(client, 40000);
    ci.peer = ci.client;
    s.reset(&pol, &host, ci);
    s.start();
  }
  // Feed bytes; complete any commit the way the shard would; return everything sent.
  std::string talk(const std::string& in) {
    s.feed(in.data(), in.size());
    s.process();
    std::string out, chunk;
    for (;;) {
      if (s.has_output()) {
        s.take_output(chunk);
        out += chunk;
      }
      if (s.want_commit()) {
        last_record = std::string(s.record());
        s.commit_done(commit_ok);
        s.process();
        continue;
      }
      if (!s.has_output()) break;
    }
    return out;
  }
};

const char* banner = "220 relay.test ESMTP tern\r\n";
const char* ehlo_reply =
    "250-relay.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
    "250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 DSN\r\n";

std::string content_of(const std::string& rec) {
  spool::record_view rv;
  auto st = spool::read_record({reinterpret_cast<const unsigned char*>(rec.data()), rec.size()}, 0, rv);
  EXPECT_EQ(st, spool::read_status::ok);
  spool::message_view m;
  EXPECT_TRUE(spool::decode_message(rv.payload, m));
  return std::string(m.content);
}

}  // namespace

TEST(Session, FullDialogueByteExact) {
  harness h;
  EXPECT_EQ(h.talk(""), banner);
  EXPECT_EQ(h.talk("EHLO client.test\r\n"), ehlo_reply);
  EXPECT_EQ(h.talk("MAIL FROM:<a@b.test>\r\n"), "250 2.1.0 Ok\r\n");
  EXPECT_EQ(h.talk("RCPT TO:<x@anywhere.test>\r\n"), "250 2.1.5 Ok\r\n");
  EXPECT_EQ(h.talk("DATA\r\n"), "354 End data with <CR><LF>.<CR><LF>\r\n");
  EXPECT_EQ(h.talk("Subject: hi\r\n\r\n..dot\r\n.\r\n"), "250 2.0.0 Ok: queued as 000000000000000001\r\n");
  std::string c = content_of(h.last_record);
  EXPECT_EQ(c.rfind("Received: from client.test ([127.0.0.1])\r\n\tby relay.test (tern) with ESMTP id "
                    "000000000000000001\r\n\tfor <x@anywhere.test>; ",
                    0),
            0u)
      << c;
  EXPECT_NE(c.find("\r\n\r\n.dot\r\n"), std::string::npos);
  EXPECT_EQ(h.talk("QUIT\r\n"), "221 2.0.0 Bye\r\n");
  EXPECT_TRUE(h.s.closing());
}

TEST(Session, PipelinedTransactionsAnswerInOrder) {
  harness h;
  h.talk("");
  std::string out = h.talk(
      "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n");
  EXPECT_EQ(out, std::string(ehlo_reply) + "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n");
  out = h.talk("body\r\n.\r\nMAIL FROM:<c@d.test>\r\nRCPT TO:<z@y.test>\r\nDATA\r\n");
  EXPECT_EQ(out,
            "250 2.0.0 Ok: queued as 000000000000000001\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
            "354 End data with <CR><LF>.<CR><LF>\r\n");
}

TEST(Session, SequenceErrors) {
  harness h;
  h.talk("");
  EXPECT_EQ(h.talk("MAIL FROM:<a@b>\r\n"), "503 5.5.1 Error: send HELO/EHLO first\r\n");
  h.talk("HELO c\r\n");
  EXPECT_EQ(h.talk("RCPT TO:<a@b>\r\n"), "503 5.5.1 Error: need MAIL command\r\n");
  EXPECT_EQ(h.talk("DATA\r\n"), "503 5.5.1 Error: need MAIL command\r\n");
  EXPECT_EQ(h.talk("MAIL FROM:<a@b.test>\r\n"), "250 2.1.0 Ok\r\n");
  EXPECT_EQ(h.talk("MAIL FROM:<a@b.test>\r\n"), "503 5.5.1 Error: nested MAIL command\r\n");
}

TEST(Session, MiscCommands) {
  harness h;
  h.talk("");
  EXPECT_EQ(h.talk("NOOP\r\n"), "250 2.0.0 Ok\r\n");
  EXPECT_EQ(h.talk("RSET\r\n"), "250 2.0.0 Ok\r\n");
  EXPECT_EQ(h.talk("VRFY root\r\n"), "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n");
  EXPECT_EQ(h.talk("HELP\r\n").substr(0, 10), "214 2.0.0 ");
  EXPECT_EQ(h.talk("STARTTLS\r\n"), "502 5.5.1 Error: command not implemented\r\n");
  EXPECT_EQ(h.talk("BOGUS\r\n"), "500 5.5.2 Error: command not recognized\r\n");
  EXPECT_EQ(h.talk("HELO c\r\n"), "250 relay.test\r\n");
  // ESMTP parameters need EHLO.
  EXPECT_EQ(h.talk("MAIL FROM:<a@b.test> SIZE=10\r\n"),
            "555 5.5.4 Unsupported option (send EHLO for ESMTP parameters)\r\n");
}

TEST(Session, RelayPolicy) {
  harness h("198.18.0.9");  // not in relay networks
  h.talk("");
  h.talk("EHLO c\r\nMAIL FROM:<a@b.test>\r\n");
  EXPECT_EQ(h.talk("RCPT TO:<u@sub.example.org>\r\n"), "554 5.7.1 <u@sub.example.org>: Relay access denied\r\n");
  EXPECT_EQ(h.talk("RCPT TO:<u@evil.example.net>\r\n"), "554 5.7.1 <u@evil.example.net>: Relay access denied\r\n");
  EXPECT_EQ(h.talk("RCPT TO:<u@example.com.evil>\r\n"), "554 5.7.1 <u@example.com.evil>: Relay access denied\r\n");
  EXPECT_EQ(h.talk("RCPT TO:<u@example.com>\r\n"), "250 2.1.5 Ok\r\n");
  EXPECT_EQ(h.talk("RCPT TO:<u@EXAMPLE.COM>\r\n"), "250 2.1.5 Ok\r\n");
  EXPECT_EQ(h.talk("RCPT TO:<u@deep.sub.example.org>\r\n"), "250 2.1.5 Ok\r\n");
}

TEST(Session, TooManyRecipients) {
  harness h;
  h.talk("");
  h.talk("EHLO c\r\nMAIL FROM:<a@b.test>\r\n");
  for (int i = 0; i < 3; ++i) EXPECT_EQ(h.talk("RCPT TO:<u@x.test>\r\n"), "250 2.1.5 Ok\r\n");
  EXPECT_EQ(h.talk("RCPT TO:<u@x.test>\r\n"), "452 4.5.3 Error: too many recipients\r\n");
}

TEST(Session, SizeLimits) {
  harness h;
  h.talk("");
  h.talk("EHLO c\r\n");
  EXPECT_EQ(h.talk("MAIL FROM:<a@b.test> SIZE=1001\r\n"), "552 5.3.4 Message size exceeds fixed limit\r\n");
  h.talk("MAIL FROM:<a@b.test>\r\nRCPT TO:<u@x.test>\r\nDATA\r\n");
  std::string big(1200, 'x');
  EXPECT_EQ(h.talk(big + "\r\n.\r\n"), "552 5.3.4 Error: message file too big\r\n");
  // The session goes on: a new transaction works.
  h.talk("MAIL FROM:<a@b.test>\r\nRCPT TO:<u@x.test>\r\nDATA\r\n");
  EXPECT_EQ(h.talk("ok\r\n.\r\n"), "250 2.0.0 Ok: queued as 000000000000000002\r\n");
}

TEST(Session, LongLineIsAnsweredAndSkipped) {
  harness h;
  h.talk("");
  std::string longline(600, 'A');
  EXPECT_EQ(h.talk(longline + "\r\nNOOP\r\n"), "500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n");
  // Split across reads: the prefix is discarded as it arrives, then answered once.
  EXPECT_EQ(h.talk(std::string(700, 'B')), "");
  EXPECT_EQ(h.talk(std::string(700, 'B')), "");
  EXPECT_EQ(h.talk("\r\nNOOP\r\n"), "500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n");
}

TEST(Session, TooManyErrorsCloses) {
  harness h;
  h.talk("");
  std::string out = h.talk("A\r\nB\r\nC\r\nD\r\nE\r\nNOOP\r\n");
  EXPECT_NE(out.find("421 4.7.0 relay.test Error: too many errors\r\n"), std::string::npos);
  EXPECT_EQ(out.find("250 2.0.0 Ok"), std::string::npos);  // nothing after the 421
  EXPECT_TRUE(h.s.closing());
}

TEST(Session, PipeliningBefore354IsASyncError) {
  harness h;
  h.talk("");
  h.talk("EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@x.test>\r\n");
  EXPECT_EQ(h.talk("DATA\r\nSubject: early\r\n\r\nbody\r\n.\r\n"), "554 5.5.0 Error: SMTP protocol synchronization\r\n");
  EXPECT_TRUE(h.s.closing());
  EXPECT_EQ(h.host.next, 0);  // nothing was queued or even started
}

// SMTP smuggling: a bare-LF end marker followed by a second transaction must neither end
// the first message nor start a second one; the whole thing is rejected after the real end.
TEST(Session, SmugglingAttemptIsRejectedWhole) {
  harness h;
  h.talk("");
  h.talk("EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@x.test>\r\nDATA\r\n");
  std::string out = h.talk(
      "Subject: first\r\n\r\nhi\n.\nMAIL FROM:<admin@bank.test>\r\nRCPT TO:<victim@x.test>\r\nDATA\r\n"
      "Subject: smuggled\r\n\r\n.\r\n");
  EXPECT_EQ(out, "550 5.5.2 Error: bare <CR> or <LF> in message data (RFC 5321 2.3.8)\r\n");
  EXPECT_TRUE(h.last_record.empty());
}

TEST(Session, NulIsRejected) {
  harness h;
  h.talk("");
  h.talk("EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@x.test>\r\nDATA\r\n");
  EXPECT_EQ(h.talk(std::string("a\0b\r\n.\r\n", 8)), "550 5.6.0 Error: NUL character in message data\r\n");
}

TEST(Session, BdatChunks) {
  harness h;
  h.talk("");
  h.talk("EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@x.test>\r\n");
  EXPECT_EQ(h.talk("BDAT 5\r\nabc\r\n"), "250 2.0.0 5 octets received\r\n");
  EXPECT_EQ(h.talk("BDAT 6 LAST\r\nde\r\n\r\n"), "250 2.0.0 Ok: queued as 000000000000000001\r\n");
  std::string c = content_of(h.last_record);
  EXPECT_EQ(c.substr(c.size() - 11), "abc\r\nde\r\n\r\n");
  // A chunk without a transaction is read and refused, and the stream stays in sync.
  EXPECT_EQ(h.talk("BDAT 4\r\nNOOPNOOP\r\n"), "503 5.5.1 Error: need MAIL command\r\n250 2.0.0 Ok\r\n");
  // Bad BDAT syntax cannot be resynchronised.
  EXPECT_EQ(h.talk("BDAT x\r\n"), "501 5.5.4 Syntax: BDAT size [LAST]\r\n");
  EXPECT_TRUE(h.s.closing());
}

TEST(Session, BdatTooBig) {
  harness h;
  h.talk("");
  h.talk("EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@x.test>\r\n");
  EXPECT_EQ(h.talk("BDAT 1200\r\n" + std::string(1200, 'x')), "552 5.3.4 Error: message file too big\r\n");
  EXPECT_EQ(h.talk("BDAT 3 LAST\r\nabc"), "503 5.5.1 Error: transaction failed, send RSET\r\n");
}

TEST(Session, SpoolFailureGives451AndUnhealthySpoolRefusesMail) {
  harness h;
  h.commit_ok = false;
  h.talk("");
  h.talk("EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@x.test>\r\nDATA\r\n");
  EXPECT_EQ(h.talk("x\r\n.\r\n"), "451 4.3.0 Error: queue file write error, try again later\r\n");
  h.host.healthy = false;
  EXPECT_EQ(h.talk("MAIL FROM:<a@b.test>\r\n"), "452 4.3.1 Insufficient system storage\r\n");
}

TEST(Session, DsnParametersAreStored) {
  harness h;
  h.talk("");
  h.talk("EHLO c\r\nMAIL FROM:<a@b.test> RET=HDRS ENVID=abc123\r\n"
         "RCPT TO:<u@x.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;u@x.test\r\nRCPT TO:<v@x.test>\r\nDATA\r\n");
  h.talk("x\r\n.\r\n");
  spool::record_view rv;
  ASSERT_EQ(spool::read_record({reinterpret_cast<const unsigned char*>(h.last_record.data()), h.last_record.size()}, 0, rv),
            spool::read_status::ok);
  spool::message_view m;
  ASSERT_TRUE(spool::decode_message(rv.payload, m));
  EXPECT_EQ(m.ret, spool::dsn_ret::hdrs);
  EXPECT_EQ(m.envid, "abc123");
  EXPECT_EQ(m.nrcpt, 2u);
  std::vector<spool::rcpt_view> rs;
  ASSERT_TRUE(spool::for_each_rcpt(m, [&](const spool::rcpt_view& r) { rs.push_back(r); }));
  EXPECT_EQ(rs[0].notify, spool::notify_failure | spool::notify_delay);
  EXPECT_EQ(rs[0].orcpt, "rfc822;u@x.test");
  EXPECT_EQ(rs[1].addr, "v@x.test");
}

TEST(Session, ProxiedClientIsTheOneInReceived) {
  policy pol;
  pol.hostname = "relay.test";
  pol.relay_networks.push_back(*net::cidr::parse("198.18.0.0/15"));
  fake_host host;
  session s;
  conn_info ci;
  ci.peer = *net::address::from_ip("127.0.0.1", 1);
  ci.client = *net::address::from_ip("198.18.5.5", 2);
  ci.proxied = true;
  s.reset(&pol, &host, ci);
  s.start();
  std::string in = "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@x.test>\r\nDATA\r\n";
  s.feed(in.data(), in.size());
  s.process();
  std::string body = "x\r\n.\r\n";
  s.feed(body.data(), body.size());
  s.process();
  ASSERT_TRUE(s.want_commit());
  std::string rec(s.record());
  EXPECT_NE(content_of(rec).find("([198.18.5.5])"), std::string::npos);
}
