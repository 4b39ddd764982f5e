// Byte-exact SMTP dialogues against the sans-I/O session, with a fake host (fixed clock,
// fixed queue ids, a spool that succeeds or fails on demand).
#include "src/smtp/session.hh"

#include <gtest/gtest.h>

#include <algorithm>
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
    conn_info ci;
    ci.client = *net::address::from_ip(client, 40000);
    ci.peer = ci.client;
    init(ci);
  }
  explicit harness(const conn_info& ci) { init(ci); }
  void init(const conn_info& ci) {
    pol.hostname = "relay.test";
    pol.limits.message_size = 1000;
    pol.limits.recipients = 3;
    pol.limits.line_length = 512;
    pol.limits.errors = 5;
    pol.relay_networks.push_back(*net::cidr::parse("127.0.0.0/8"));
    pol.relay_domains = {"example.com", ".sub.example.org"};
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
  EXPECT_EQ(c.rfind("Received: from [127.0.0.1] (helo=client.test)\r\n\tby relay.test (tern) with ESMTP id "
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

// Regression: each RCPT over limits.recipients counted as an error, so a client that
// pipelined more recipients than the limit (1,030 against 1,000 with errors = 20) lost its
// connection, and its transaction, instead of sending the rest in the next one.
TEST(Session, RecipientsOverTheLimitAreNotErrors) {
  harness h;  // recipients = 3, errors = 5
  h.talk("");
  std::string in = "EHLO c\r\nMAIL FROM:<a@b.test>\r\n";
  for (int i = 0; i < 33; ++i) in += "RCPT TO:<u" + std::to_string(i) + "@x.test>\r\n";
  in += "DATA\r\n";
  std::string want = std::string(ehlo_reply) + "250 2.1.0 Ok\r\n";
  for (int i = 0; i < 3; ++i) want += "250 2.1.5 Ok\r\n";
  for (int i = 0; i < 30; ++i) want += "452 4.5.3 Error: too many recipients\r\n";
  // DATA is a sync point: nothing was pipelined after it, so it is answered.
  want += "354 End data with <CR><LF>.<CR><LF>\r\n";
  EXPECT_EQ(h.talk(in), want);
  EXPECT_FALSE(h.s.closing());
  EXPECT_EQ(h.s.errors(), 0u);
  EXPECT_EQ(h.talk("x\r\n.\r\n"), "250 2.0.0 Ok: queued as 000000000000000001\r\n");
  spool::record_view rv;
  ASSERT_EQ(spool::read_record({reinterpret_cast<const unsigned char*>(h.last_record.data()), h.last_record.size()}, 0, rv),
            spool::read_status::ok);
  spool::message_view m;
  ASSERT_TRUE(spool::decode_message(rv.payload, m));
  EXPECT_EQ(m.nrcpt, 3u);
  std::vector<std::string> rs;
  ASSERT_TRUE(spool::for_each_rcpt(m, [&](const spool::rcpt_view& r) { rs.emplace_back(r.addr); }));
  EXPECT_EQ(rs, (std::vector<std::string>{"u0@x.test", "u1@x.test", "u2@x.test"}));
}

// Beyond limits.recipient_overshoot excess RCPTs count as errors again (postfix's
// smtpd_recipient_overshoot_limit), so RCPT cannot be used to hold a session forever.
TEST(Session, RecipientOvershootCountsErrors) {
  harness h;
  h.pol.limits.recipient_overshoot = 2;
  h.talk("");
  h.talk("EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\n");
  std::string out;
  for (int i = 0; i < 7; ++i) out += h.talk("RCPT TO:<u@x.test>\r\n");
  std::string want;
  for (int i = 0; i < 7; ++i) want += "452 4.5.3 Error: too many recipients\r\n";
  want += "421 4.7.0 relay.test Error: too many errors\r\n";  // 2 free, then 5 errors
  EXPECT_EQ(out, want);
  EXPECT_TRUE(h.s.closing());
}

TEST(Session, RoutedRecipientsAreRefusedForUntrustedClients) {
  const char* routed[] = {
      "user%host.evil@example.com",      "user@host.evil@example.com",    "\"user@host.evil\"@example.com",
      "user!host.evil!x@example.com",    "@a.evil,@b.evil:user@example.com", "@a.evil:user@example.com",
      "\"u%h\"@EXAMPLE.COM",              "u\\@h@example.com",              "u%evil.test@deep.sub.example.org",
  };
  harness h("198.18.0.9");  // not in relay networks
  h.pol.limits.errors = 100;
  h.talk("");
  h.talk("EHLO c\r\nMAIL FROM:<a@b.test>\r\n");
  for (const char* r : routed)
    EXPECT_EQ(h.talk(std::string("RCPT TO:<") + r + ">\r\n"), std::string("554 5.7.1 <") + r + ">: Relay access denied\r\n");
  // Plain addresses under the relay domains still pass.
  EXPECT_EQ(h.talk("RCPT TO:<user@example.com>\r\n"), "250 2.1.5 Ok\r\n");
  EXPECT_EQ(h.talk("RCPT TO:<\"user name\"@deep.sub.example.org>\r\n"), "250 2.1.5 Ok\r\n");
  // Clients in relay.networks keep their permission, routing or not (postfix: the
  // routing check is part of permit_auth_destination, after permit_mynetworks).
  harness t;
  t.pol.limits.recipients = 100;
  t.talk("");
  t.talk("EHLO c\r\nMAIL FROM:<a@b.test>\r\n");
  for (const char* r : routed) EXPECT_EQ(t.talk(std::string("RCPT TO:<") + r + ">\r\n"), "250 2.1.5 Ok\r\n") << r;
}

TEST(Session, FromProxyAndFromSocket) {
  config::listener L;
  L.allow_bare_lf = true;
  auto peer = *net::address::from_ip("127.0.0.1", 5000);
  net::proxy_header h;
  h.version = 2;
  h.src = *net::address::from_ip("198.18.7.7", 40000);
  auto ci = from_proxy(h, peer, L);
  EXPECT_EQ(ci.client.to_string(), "198.18.7.7:40000");
  EXPECT_EQ(ci.peer.to_string(), "127.0.0.1:5000");
  EXPECT_TRUE(ci.proxied);
  EXPECT_FALSE(ci.proxy_local);
  EXPECT_TRUE(ci.relay_by_address);
  EXPECT_TRUE(ci.allow_bare_lf);
  EXPECT_EQ(ci.proxy_version, 2);
  net::proxy_header local;
  local.version = 1;
  local.local = true;
  ci = from_proxy(local, peer, L);
  EXPECT_EQ(ci.client.to_string(), "127.0.0.1:5000");
  EXPECT_FALSE(ci.proxied);
  EXPECT_TRUE(ci.proxy_local);
  EXPECT_FALSE(ci.relay_by_address);
  L.local_relay = true;
  EXPECT_TRUE(from_proxy(local, peer, L).relay_by_address);
  L.allow_bare_lf = false;
  ci = from_socket(peer, L);
  EXPECT_EQ(ci.client.to_string(), "127.0.0.1:5000");
  EXPECT_FALSE(ci.proxied || ci.proxy_local || ci.allow_bare_lf);
  EXPECT_TRUE(ci.relay_by_address);
}

// A PROXY health check (v2 LOCAL, v1 UNKNOWN, v2 UNSPEC/UNIX) is the proxy talking from
// its own address, which is usually inside relay.networks: it may speak SMTP, send to
// relay domains, but not relay elsewhere unless the listener says local_relay = true.
TEST(Session, ProxyHealthCheckDoesNotInheritRelayPermission) {
  config::listener L;
  net::proxy_header local;
  local.version = 2;
  local.local = true;
  auto proxy = *net::address::from_ip("127.0.0.1", 5000);
  {
    harness h(from_proxy(local, proxy, L));
    h.talk("");
    h.talk("EHLO check\r\nMAIL FROM:<a@b.test>\r\n");
    EXPECT_EQ(h.talk("RCPT TO:<u@elsewhere.test>\r\n"), "554 5.7.1 <u@elsewhere.test>: Relay access denied\r\n");
    EXPECT_EQ(h.talk("RCPT TO:<u@example.com>\r\n"), "250 2.1.5 Ok\r\n");
  }
  L.local_relay = true;
  {
    harness h(from_proxy(local, proxy, L));
    h.talk("");
    h.talk("EHLO check\r\nMAIL FROM:<a@b.test>\r\n");
    EXPECT_EQ(h.talk("RCPT TO:<u@elsewhere.test>\r\n"), "250 2.1.5 Ok\r\n");
  }
  // A proxied client is judged by the address the proxy reports, not by the proxy's.
  L.local_relay = false;
  net::proxy_header p;
  p.version = 1;
  p.src = *net::address::from_ip("198.18.1.1", 1);
  {
    harness h(from_proxy(p, proxy, L));
    h.talk("");
    h.talk("EHLO c\r\nMAIL FROM:<a@b.test>\r\n");
    EXPECT_EQ(h.talk("RCPT TO:<u@elsewhere.test>\r\n"), "554 5.7.1 <u@elsewhere.test>: Relay access denied\r\n");
  }
  p.src = *net::address::from_ip("127.0.0.9", 1);
  {
    harness h(from_proxy(p, proxy, L));
    h.talk("");
    h.talk("EHLO c\r\nMAIL FROM:<a@b.test>\r\n");
    EXPECT_EQ(h.talk("RCPT TO:<u@elsewhere.test>\r\n"), "250 2.1.5 Ok\r\n");
  }
}

TEST(Session, BareLfCommandIsRefusedAndCloses) {
  for (const char* in : {"EHLO c\n", "HELO c\nQUIT\r\n", "\n"}) {
    harness h;
    h.talk("");
    EXPECT_EQ(h.talk(in), "550 5.5.2 Error: bare <LF> received\r\n") << in;
    EXPECT_TRUE(h.s.closing());
  }
  // After good pipelined commands: those are answered, then the bare LF ends the session.
  harness h;
  h.talk("");
  EXPECT_EQ(h.talk("NOOP\r\nNOOP\nNOOP\r\n"), "250 2.0.0 Ok\r\n550 5.5.2 Error: bare <LF> received\r\n");
  EXPECT_TRUE(h.s.closing());
}

TEST(Session, AllowBareLfAcceptsLegacyCommandsButNotBareLfData) {
  config::listener L;
  L.allow_bare_lf = true;
  harness h(from_socket(*net::address::from_ip("127.0.0.1", 1), L));
  h.talk("");
  EXPECT_EQ(h.talk("EHLO c\nMAIL FROM:<a@b.test>\nRCPT TO:<u@x.test>\nDATA\n"),
            std::string(ehlo_reply) + "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n");
  // The smuggling defence is unchanged: "\n.\n" does not end the message.
  EXPECT_EQ(h.talk("a\n.\nMAIL FROM:<x@y.test>\n"), "");
  EXPECT_EQ(h.talk("\r\n.\r\n"), "550 5.5.2 Error: bare <CR> or <LF> in message data (RFC 5321 2.3.8)\r\n");
  EXPECT_EQ(h.talk("MAIL FROM:<a@b.test>\nRCPT TO:<u@x.test>\nDATA\n"),
            "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n");
  EXPECT_EQ(h.talk("ok\r\n.\r\n"), "250 2.0.0 Ok: queued as 000000000000000002\r\n");
}

TEST(Session, JunkCommandLimitCloses) {
  harness h;
  h.pol.limits.junk_commands = 4;
  h.talk("");
  std::string out = h.talk("NOOP\r\nRSET\r\nVRFY u\r\nHELP\r\nNOOP\r\nNOOP\r\n");
  EXPECT_EQ(out,
            "250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n"
            "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"
            "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP\r\n"
            "421 4.7.0 relay.test Error: too many junk commands\r\n");
  EXPECT_TRUE(h.s.closing());
  EXPECT_EQ(h.s.errors(), 0u);
}

TEST(Session, JunkCountStartsAgainAfterAQueuedMessage) {
  harness h;
  h.pol.limits.junk_commands = 2;
  h.talk("");
  EXPECT_EQ(h.talk("NOOP\r\nNOOP\r\nEHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@x.test>\r\nDATA\r\n"),
            "250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n" + std::string(ehlo_reply) +
                "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n");
  EXPECT_EQ(h.talk("x\r\n.\r\n"), "250 2.0.0 Ok: queued as 000000000000000001\r\n");
  EXPECT_EQ(h.talk("RSET\r\nNOOP\r\n"), "250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n");
  EXPECT_EQ(h.talk("NOOP\r\n"), "421 4.7.0 relay.test Error: too many junk commands\r\n");
}

TEST(Session, NonAsciiAddressesNeedSmtputf8) {
  harness h;
  h.pol.limits.errors = 100;
  h.talk("");
  h.talk("EHLO c\r\n");
  EXPECT_EQ(h.talk("MAIL FROM:<d\xc3\xb6rte@b.test>\r\n"), "553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n");
  EXPECT_EQ(h.talk("MAIL FROM:<a@b.test>\r\n"), "250 2.1.0 Ok\r\n");
  EXPECT_EQ(h.talk("RCPT TO:<d\xc3\xb6rte@x.test>\r\n"), "553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n");
  EXPECT_EQ(h.talk("RCPT TO:<u@b\xc3\xbc" "cher.test>\r\n"), "553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n");
  EXPECT_EQ(h.talk("RSET\r\nMAIL FROM:<d\xc3\xb6rte@b.test> SMTPUTF8\r\n"), "250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n");
  // With SMTPUTF8 the bytes must be UTF-8.
  EXPECT_EQ(h.talk("RCPT TO:<d\xf6rte@x.test>\r\n"), "501 5.1.3 Bad recipient address syntax\r\n");
  EXPECT_EQ(h.talk("RCPT TO:<\xed\xa0\x80@x.test>\r\n"), "501 5.1.3 Bad recipient address syntax\r\n");
}

TEST(Session, Smtputf8ReceivedKeepsTheRecipient) {
  harness h;
  h.talk("");
  h.talk("EHLO c\r\nMAIL FROM:<\xe7\x94\xa8\xe6\x88\xb7@b.test> SMTPUTF8\r\nRCPT TO:<d\xc3\xb6rte@m\xc3\xbcller.test>\r\nDATA\r\n");
  EXPECT_EQ(h.talk("x\r\n.\r\n"), "250 2.0.0 Ok: queued as 000000000000000001\r\n");
  std::string c = content_of(h.last_record);
  EXPECT_EQ(c.rfind("Received: from [127.0.0.1] (helo=c)\r\n\tby relay.test (tern) with UTF8SMTP id "
                    "000000000000000001\r\n\tfor <d\xc3\xb6rte@m\xc3\xbcller.test>; ",
                    0),
            0u)
      << c;
}

// Regression: the HELO name went into Received: as "from <helo> (...)" with only control
// characters replaced, so "EHLO x ([6.6.6.6]) by mx.trusted.example" forged a plausible
// "from x ([6.6.6.6]) by mx.trusted.example" trace for anything that reads the header.
TEST(Session, HeloCannotForgeReceivedStructure) {
  harness h;
  h.talk("");
  h.talk("EHLO x ([6.6.6.6]) by mx.trusted.example; \"q\\\xc3\xa9\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@x.test>\r\nDATA\r\n");
  h.talk("x\r\n.\r\n");
  std::string c = content_of(h.last_record);
  // ('#' stands for '?' here: "??)" would be a trigraph in the literal.)
  std::string want = "Received: from [127.0.0.1] (helo=x###6.6.6.6###by#mx.trusted.example###q###)\r\n\tby relay.test "
                     "(tern) with ESMTP id 000000000000000001\r\n\tfor <u@x.test>; ";
  std::replace(want.begin(), want.end(), '#', '?');
  EXPECT_EQ(c.rfind(want, 0), 0u) << c;
  // An address-literal HELO loses its brackets to '?', and nothing else.
  harness v("::1");
  v.talk("");
  v.talk("EHLO [IPv6:::1]\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.com>\r\nRCPT TO:<w@example.com>\r\nDATA\r\n");
  v.talk("x\r\n.\r\n");
  c = content_of(v.last_record);
  EXPECT_EQ(c.rfind("Received: from [IPv6:::1] (helo=?IPv6:::1?)\r\n\tby relay.test (tern) with ESMTP id "
                    "000000000000000001; ",
                    0),
            0u)
      << c;
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
  EXPECT_EQ(content_of(rec).rfind("Received: from [198.18.5.5] (helo=c)\r\n", 0), 0u);
}
