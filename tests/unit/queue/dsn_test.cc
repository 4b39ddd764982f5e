#include "src/queue/dsn.hh"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>

using namespace tern;
using namespace tern::queue;

namespace {

constexpr uint64_t t_arrival = 1796394017ull * 1000000;  // Fri, 04 Dec 2026 14:20:17 UTC
constexpr uint64_t t_now = t_arrival + 3 * 3600ull * 1000000;
constexpr std::string_view dsn_id = "1A2B3C4D5E601000A1";

const std::string k_headers =
    "Received: from [192.0.2.9] (helo=client.example)\r\n"
    "\tby relay.example.net (tern) with ESMTP id 0123456789AB00001\r\n"
    "\tfor <u@example.org>; Fri, 04 Dec 2026 14:20:17 +0000 (UTC)\r\n"
    "From: Alice <alice@example.com>\r\n"
    "To: u@example.org\r\n"
    "Subject: hello\r\n"
    "Message-ID: <m1@example.com>\r\n";
const std::string k_content = k_headers + "\r\nbody line one\r\nbody line two\r\n";

spool::message_view make_msg(std::string_view content, std::string_view sender = "alice@example.com") {
  spool::message_view m;
  m.id = "0123456789AB00001";
  m.arrival_us = t_arrival;
  m.mail_from = sender;
  m.content = content;
  return m;
}

dsn_rcpt failed_rcpt(std::string_view addr = "u@example.org") {
  dsn_rcpt r;
  r.addr = addr;
  r.outcome = rcpt_outcome::failed;
  r.status = "5.1.1";
  r.remote_host = "mx.example.org";
  r.remote_ip = "192.0.2.1";
  r.diagnostic = "550 5.1.1 <u@example.org>: user unknown (in reply to RCPT TO command)";
  r.remote_reply = true;
  r.last_attempt_us = t_now;
  return r;
}

dsn_options opts() {
  dsn_options o;
  o.hostname = "relay.example.net";
  return o;
}

dsn_request req(dsn_kind k) {
  dsn_request r;
  r.kind = k;
  r.queue_id = dsn_id;
  r.now_us = t_now;
  r.retry_until_us = t_arrival + 5 * 86400ull * 1000000;
  return r;
}

// --- a small, strict MIME reader for the tests -----------------------------------------------

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(tolower(static_cast<unsigned char>(c)));
  return s;
}

struct fields {
  std::vector<std::pair<std::string, std::string>> list;  // lower-case name, unfolded value
  size_t count(std::string_view name) const {
    size_t n = 0;
    for (auto& [k, v] : list) n += k == name;
    return n;
  }
  std::string get(std::string_view name) const {
    for (auto& [k, v] : list)
      if (k == name) return v;
    return "";
  }
};

// Split text into lines; every line must end in CRLF (checked by callers separately).
std::vector<std::string> split_lines(std::string_view s) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < s.size()) {
    size_t e = s.find("\r\n", pos);
    if (e == std::string_view::npos) {
      out.emplace_back(s.substr(pos));
      break;
    }
    out.emplace_back(s.substr(pos, e - pos));
    pos = e + 2;
  }
  return out;
}

// Header block: lines up to an empty line; continuation lines start with SP or HTAB.
// Returns the offset after the empty line (or the end).
size_t parse_fields(std::string_view s, fields& f) {
  size_t pos = 0;
  while (pos < s.size()) {
    size_t e = s.find("\r\n", pos);
    if (e == std::string_view::npos) e = s.size();
    std::string_view line = s.substr(pos, e - pos);
    pos = std::min(e + 2, s.size());
    if (line.empty()) break;
    if (line[0] == ' ' || line[0] == '\t') {
      EXPECT_FALSE(f.list.empty()) << "continuation before any field";
      if (!f.list.empty()) f.list.back().second += std::string(line);
      continue;
    }
    auto colon = line.find(':');
    EXPECT_NE(colon, std::string_view::npos) << "not a header field: " << line;
    if (colon == std::string_view::npos) continue;
    std::string v(line.substr(colon + 1));
    while (!v.empty() && v[0] == ' ') v.erase(0, 1);
    f.list.emplace_back(lower(std::string(line.substr(0, colon))), v);
  }
  return pos;
}

struct part {
  fields h;
  std::string body;
};

struct parsed {
  fields top;
  std::string boundary;
  std::vector<part> parts;
  bool closed = false;
};

std::string param(const std::string& ct, const std::string& name) {
  std::string l = lower(ct);
  auto p = l.find(name + "=");
  if (p == std::string::npos) return "";
  p += name.size() + 1;
  if (ct[p] == '"') {
    auto e = ct.find('"', p + 1);
    return ct.substr(p + 1, e - p - 1);
  }
  auto e = ct.find_first_of("; \t", p);
  return ct.substr(p, e == std::string::npos ? std::string::npos : e - p);
}

parsed parse_dsn(const std::string& c) {
  parsed p;
  size_t body = parse_fields(c, p.top);
  p.boundary = param(p.top.get("content-type"), "boundary");
  EXPECT_FALSE(p.boundary.empty());
  std::string delim = "--" + p.boundary;
  // Delimiter lines (RFC 2046 5.1.1): CRLF "--" boundary, then "--" or CRLF.
  std::vector<std::pair<size_t, size_t>> marks;  // (start of the CRLF before, after the line)
  size_t pos = body;
  for (;;) {
    size_t at = c.find("\r\n" + delim, pos - 2);
    if (at == std::string::npos) break;
    size_t after = at + 2 + delim.size();
    bool close = c.compare(after, 2, "--") == 0;
    if (close) after += 2;
    EXPECT_EQ(c.compare(after, 2, "\r\n"), 0) << "boundary line continues";
    marks.emplace_back(at, after + 2);
    pos = after + 2;
    if (close) {
      p.closed = true;
      break;
    }
  }
  for (size_t i = 0; i + 1 < marks.size(); ++i) {
    part pt;
    std::string whole = c.substr(marks[i].second, marks[i + 1].first - marks[i].second);
    size_t b = parse_fields(whole, pt.h);
    pt.body = whole.substr(b);
    p.parts.push_back(std::move(pt));
  }
  return p;
}

// Groups of DSN fields separated by empty lines (RFC 3464 2.1).
std::vector<fields> dsn_groups(const std::string& body) {
  std::vector<fields> out;
  size_t pos = 0;
  while (pos < body.size()) {
    fields f;
    size_t n = parse_fields(std::string_view(body).substr(pos), f);
    if (!f.list.empty()) out.push_back(std::move(f));
    if (n == 0) break;
    pos += n;
  }
  return out;
}

// Every line ends in CRLF (no bare CR or LF) and is at most 998 bytes.
void expect_lines_ok(const std::string& c) {
  ASSERT_GE(c.size(), 2u);
  EXPECT_EQ(c.substr(c.size() - 2), "\r\n");
  size_t start = 0;
  for (size_t i = 0; i < c.size(); ++i) {
    if (c[i] == '\n') {
      ASSERT_TRUE(i > 0 && c[i - 1] == '\r') << "bare LF at " << i;
      EXPECT_LE(i - 1 - start, 998u) << "line at " << start;
      start = i + 1;
    } else if (c[i] == '\r') {
      ASSERT_TRUE(i + 1 < c.size() && c[i + 1] == '\n') << "bare CR at " << i;
    }
  }
}

dsn_message build_one(const spool::message_view& m, std::vector<dsn_rcpt> rcpts, dsn_kind k,
                      dsn_options o = opts()) {
  std::vector<uint32_t> which;
  for (uint32_t i = 0; i < rcpts.size(); ++i) which.push_back(i);
  dsn_message d;
  EXPECT_TRUE(build_dsn(o, m, rcpts, which, req(k), d));
  return d;
}

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

}  // namespace

TEST(Dsn, DateIsRfc5322AndLocaleFree) {
  EXPECT_EQ(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000 (UTC)");
  EXPECT_EQ(rfc5322_date(t_arrival + 999999), "Fri, 04 Dec 2026 14:20:17 +0000 (UTC)");
}

TEST(Dsn, FailureStructureParsesBack) {
  auto m = make_msg(k_content);
  auto r2 = failed_rcpt("v@example.org");
  r2.status = "5.4.7";
  r2.remote_host = "";
  r2.remote_ip = "";
  r2.remote_reply = false;
  r2.diagnostic = "delivery time expired";
  auto d = build_one(m, {failed_rcpt(), r2}, dsn_kind::failure);
  expect_lines_ok(d.content);
  EXPECT_EQ(d.sender, "");
  EXPECT_EQ(d.recipient, "alice@example.com");
  EXPECT_FALSE(d.smtputf8);
  EXPECT_FALSE(d.eight_bit);
  EXPECT_FALSE(d.headers_only);

  auto p = parse_dsn(d.content);
  EXPECT_EQ(p.top.get("from"), "MAILER-DAEMON@relay.example.net (Mail Delivery System)");
  EXPECT_EQ(p.top.get("to"), "<alice@example.com>");
  EXPECT_EQ(p.top.get("subject"), "Undelivered Mail Returned to Sender");
  EXPECT_EQ(p.top.get("date"), "Fri, 04 Dec 2026 17:20:17 +0000 (UTC)");
  EXPECT_EQ(p.top.get("message-id"), "<" + std::string(dsn_id) + "@relay.example.net>");
  EXPECT_EQ(p.top.get("auto-submitted"), "auto-replied");
  EXPECT_EQ(p.top.get("mime-version"), "1.0");
  EXPECT_TRUE(starts_with(p.top.get("content-type"), "multipart/report; report-type=delivery-status;"));
  EXPECT_EQ(p.boundary, d.boundary);
  for (auto name : {"from", "to", "subject", "date", "message-id", "content-type"})
    EXPECT_EQ(p.top.count(name), 1u) << name;

  ASSERT_TRUE(p.closed);
  ASSERT_EQ(p.parts.size(), 3u);
  EXPECT_EQ(p.parts[0].h.get("content-type"), "text/plain; charset=us-ascii");
  EXPECT_EQ(p.parts[1].h.get("content-type"), "message/delivery-status");
  EXPECT_EQ(p.parts[2].h.get("content-type"), "message/rfc822");

  const std::string& text = p.parts[0].body;
  EXPECT_NE(text.find("This is the mail system at host relay.example.net."), std::string::npos);
  EXPECT_NE(text.find("I'm sorry to have to inform you that your message could not"), std::string::npos);
  EXPECT_NE(text.find("<u@example.org>: host mx.example.org[192.0.2.1] said: 550 5.1.1"), std::string::npos)
      << text;
  EXPECT_NE(text.find("<v@example.org>: delivery time expired"), std::string::npos);
  for (auto& l : split_lines(text)) EXPECT_LE(l.size(), 78u) << l;

  auto g = dsn_groups(p.parts[1].body);
  ASSERT_EQ(g.size(), 3u) << p.parts[1].body;
  EXPECT_EQ(g[0].get("reporting-mta"), "dns; relay.example.net");
  EXPECT_EQ(g[0].get("x-tern-queue-id"), "0123456789AB00001");
  EXPECT_EQ(g[0].get("arrival-date"), "Fri, 04 Dec 2026 14:20:17 +0000 (UTC)");
  EXPECT_EQ(g[0].count("original-envelope-id"), 0u) << "no ENVID given";
  EXPECT_EQ(g[1].get("final-recipient"), "rfc822; u@example.org");
  EXPECT_EQ(g[1].count("original-recipient"), 0u) << "no ORCPT given";
  EXPECT_EQ(g[1].get("action"), "failed");
  EXPECT_EQ(g[1].get("status"), "5.1.1");
  EXPECT_EQ(g[1].get("remote-mta"), "dns; mx.example.org");
  EXPECT_EQ(g[1].get("diagnostic-code"),
            "smtp; 550 5.1.1 <u@example.org>: user unknown (in reply to RCPT TO command)");
  EXPECT_EQ(g[1].get("last-attempt-date"), "Fri, 04 Dec 2026 17:20:17 +0000 (UTC)");
  EXPECT_EQ(g[1].count("will-retry-until"), 0u);
  EXPECT_EQ(g[2].get("final-recipient"), "rfc822; v@example.org");
  EXPECT_EQ(g[2].get("status"), "5.4.7");
  EXPECT_EQ(g[2].count("remote-mta"), 0u);
  EXPECT_EQ(g[2].get("diagnostic-code"), "X-Tern; delivery time expired");

  EXPECT_EQ(p.parts[2].body, k_content) << "the whole original comes back unchanged";
}

TEST(Dsn, NullSenderNeverGetsAnyDsn) {
  std::vector<dsn_rcpt> rs;
  for (uint8_t notify : {0, 1, 2, 4, 8, 2 | 4 | 8}) {
    for (auto o : {rcpt_outcome::failed, rcpt_outcome::deferred, rcpt_outcome::delivered, rcpt_outcome::relayed}) {
      auto r = failed_rcpt();
      r.notify = notify;
      r.outcome = o;
      rs.push_back(r);
    }
  }
  EXPECT_TRUE(plan_dsns("", rs, true).empty());
  EXPECT_FALSE(plan_dsns("a@example.com", rs, true).empty()) << "the same recipients with a sender do";
  auto m = make_msg(k_content, "");
  uint32_t which[] = {0};
  for (auto k : {dsn_kind::failure, dsn_kind::delay, dsn_kind::success}) {
    dsn_message d;
    EXPECT_FALSE(build_dsn(opts(), m, rs, which, req(k), d));
    EXPECT_TRUE(d.content.empty());
  }
}

TEST(Dsn, NotifyMatrix) {
  using spool::notify_delay;
  using spool::notify_failure;
  using spool::notify_never;
  using spool::notify_success;
  struct row {
    uint8_t notify;
    bool failure, delay, success;
  } rows[] = {
      {notify_never, false, false, false},
      {notify_success, false, false, true},
      {notify_failure | notify_delay, true, true, false},
      {0, true, true, false},  // no NOTIFY: failure and delay (when warnings are on), not success
      {notify_failure, true, false, false},
      {notify_delay, false, true, false},
  };
  for (auto& w : rows) {
    EXPECT_EQ(dsn_wanted(dsn_kind::failure, w.notify), w.failure) << int(w.notify);
    EXPECT_EQ(dsn_wanted(dsn_kind::delay, w.notify), w.delay) << int(w.notify);
    EXPECT_EQ(dsn_wanted(dsn_kind::success, w.notify), w.success) << int(w.notify);
    // Through the planner: one recipient of each outcome, all with these flags.
    std::vector<dsn_rcpt> rs(5, failed_rcpt());
    rs[0].outcome = rcpt_outcome::failed;
    rs[1].outcome = rcpt_outcome::deferred;
    rs[2].outcome = rcpt_outcome::delivered;
    rs[3].outcome = rcpt_outcome::relayed;
    rs[4].outcome = rcpt_outcome::relayed_dsn;
    for (auto& r : rs) r.notify = w.notify;
    auto p = plan_dsns("a@example.com", rs, true);
    EXPECT_EQ(p.failure, w.failure ? std::vector<uint32_t>{0} : std::vector<uint32_t>{}) << int(w.notify);
    EXPECT_EQ(p.delay, w.delay ? std::vector<uint32_t>{1} : std::vector<uint32_t>{}) << int(w.notify);
    EXPECT_EQ(p.success, (w.success ? std::vector<uint32_t>{2, 3} : std::vector<uint32_t>{}))
        << "relayed to a DSN-capable hop (index 4) never gets a success DSN from us";
    auto q = plan_dsns("a@example.com", rs, false);
    EXPECT_TRUE(q.delay.empty()) << "no delay DSN before the schedule says it is due";
  }
}

TEST(Dsn, OneDsnPerKindListsEveryRecipientThatWantsIt) {
  std::vector<dsn_rcpt> rs(6, failed_rcpt());
  rs[0].notify = 0;
  rs[1].notify = spool::notify_never;
  rs[2].notify = spool::notify_failure;
  rs[3].outcome = rcpt_outcome::deferred;
  rs[4].outcome = rcpt_outcome::deferred;
  rs[4].notify = spool::notify_failure;
  rs[5].outcome = rcpt_outcome::delivered;
  rs[5].notify = spool::notify_success | spool::notify_failure;
  auto p = plan_dsns("a@example.com", rs, true);
  EXPECT_EQ(p.failure, (std::vector<uint32_t>{0, 2}));
  EXPECT_EQ(p.delay, (std::vector<uint32_t>{3}));
  EXPECT_EQ(p.success, (std::vector<uint32_t>{5}));

  auto m = make_msg(k_content);
  dsn_message d;
  ASSERT_TRUE(build_dsn(opts(), m, rs, p.failure, req(dsn_kind::failure), d));
  auto parsed = parse_dsn(d.content);
  ASSERT_EQ(parsed.parts.size(), 3u);
  EXPECT_EQ(dsn_groups(parsed.parts[1].body).size(), 3u) << "per-message block and two recipients";

  uint32_t bad[] = {6};
  EXPECT_FALSE(build_dsn(opts(), m, rs, bad, req(dsn_kind::failure), d)) << "index out of range";
  EXPECT_FALSE(build_dsn(opts(), m, rs, {}, req(dsn_kind::failure), d)) << "nobody to report";
}

TEST(Dsn, ReturnedContentFollowsRetAndTheSizeBound) {
  std::string big = k_headers + "\r\n" + std::string(200, 'x') + "\r\n";
  for (int i = 0; i < 400; ++i) big += "a body line that makes the message larger than the bound\r\n";
  ASSERT_GT(big.size(), 20000u);
  dsn_options o = opts();
  o.return_size_limit = 10000;
  struct c {
    spool::dsn_ret ret;
    bool large;
    bool headers_only;
  } cases[] = {
      {spool::dsn_ret::full, false, false}, {spool::dsn_ret::full, true, false},
      {spool::dsn_ret::hdrs, false, true},  {spool::dsn_ret::hdrs, true, true},
      {spool::dsn_ret::none, false, false}, {spool::dsn_ret::none, true, true},
  };
  for (auto& k : cases) {
    auto m = make_msg(k.large ? big : k_content);
    m.ret = k.ret;
    auto d = build_one(m, {failed_rcpt()}, dsn_kind::failure, o);
    expect_lines_ok(d.content);
    EXPECT_EQ(d.headers_only, k.headers_only);
    auto p = parse_dsn(d.content);
    ASSERT_EQ(p.parts.size(), 3u);
    std::string what = "ret=" + std::to_string(int(k.ret)) + (k.large ? " large" : " small");
    if (k.headers_only) {
      EXPECT_EQ(p.parts[2].h.get("content-type"), "text/rfc822-headers") << what;
      EXPECT_EQ(p.parts[2].body, k_headers) << what;
      EXPECT_EQ(p.parts[2].h.get("content-description"), "Undelivered Message Headers");
    } else {
      EXPECT_EQ(p.parts[2].h.get("content-type"), "message/rfc822") << what;
      EXPECT_EQ(p.parts[2].body, k.large ? big : k_content) << what;
    }
    bool said = p.parts[0].body.find("larger than 10000 bytes") != std::string::npos;
    EXPECT_EQ(said, k.ret == spool::dsn_ret::none && k.large) << what << ": only a cut for size is explained";
  }
  // The default bound is postfix's 50000.
  EXPECT_EQ(dsn_options{}.return_size_limit, 50000u);
  std::string huge = k_headers + "\r\n" + std::string(60000, 'y') + "\r\n";
  auto d = build_one(make_msg(huge), {failed_rcpt()}, dsn_kind::failure);
  EXPECT_TRUE(d.headers_only);
  EXPECT_NE(d.content.find("larger than 50000 bytes"), std::string::npos);
}

TEST(Dsn, DelayDsnCarriesRetryTimeAndHeadersOnly) {
  auto m = make_msg(k_content);
  m.ret = spool::dsn_ret::full;
  auto r = failed_rcpt();
  r.outcome = rcpt_outcome::deferred;
  r.status = "4.4.1";
  r.diagnostic = "connect to mx.example.org[192.0.2.1]:25: Connection refused";
  r.remote_reply = false;
  auto d = build_one(m, {r}, dsn_kind::delay);
  expect_lines_ok(d.content);
  auto p = parse_dsn(d.content);
  EXPECT_EQ(p.top.get("subject"), "Delayed Mail (still being retried)");
  ASSERT_EQ(p.parts.size(), 3u);
  EXPECT_NE(p.parts[0].body.find("THIS IS A WARNING ONLY"), std::string::npos);
  EXPECT_NE(p.parts[0].body.find("could not be delivered for 3 hour(s)"), std::string::npos) << p.parts[0].body;
  auto g = dsn_groups(p.parts[1].body);
  ASSERT_EQ(g.size(), 2u);
  EXPECT_EQ(g[1].get("action"), "delayed");
  EXPECT_EQ(g[1].get("status"), "4.4.1");
  EXPECT_EQ(g[1].get("will-retry-until"), "Wed, 09 Dec 2026 14:20:17 +0000 (UTC)");
  EXPECT_EQ(g[1].get("diagnostic-code"), "X-Tern; connect to mx.example.org[192.0.2.1]:25: Connection refused");
  EXPECT_EQ(p.parts[2].h.get("content-type"), "text/rfc822-headers");
  EXPECT_EQ(p.parts[2].body, k_headers);
}

TEST(Dsn, SuccessDsnSaysDeliveredOrRelayed) {
  auto m = make_msg(k_content);
  auto a = failed_rcpt("a@example.org");
  a.outcome = rcpt_outcome::delivered;
  a.status = "2.0.0";
  a.diagnostic = "250 2.0.0 Ok: queued as 4F3";
  auto b = failed_rcpt("b@example.org");
  b.outcome = rcpt_outcome::relayed;
  b.status = "bogus";  // malformed: replaced by the kind's default
  b.diagnostic = "250 ok";
  auto d = build_one(m, {a, b}, dsn_kind::success);
  auto p = parse_dsn(d.content);
  EXPECT_EQ(p.top.get("subject"), "Successful Mail Delivery Report");
  ASSERT_EQ(p.parts.size(), 3u);
  auto g = dsn_groups(p.parts[1].body);
  ASSERT_EQ(g.size(), 3u);
  EXPECT_EQ(g[1].get("action"), "delivered");
  EXPECT_EQ(g[2].get("action"), "relayed");
  EXPECT_EQ(g[2].get("status"), "2.0.0");
  EXPECT_NE(p.parts[0].body.find("<a@example.org>: delivered via mx.example.org[192.0.2.1]: 250 2.0.0"),
            std::string::npos);
  EXPECT_EQ(p.parts[2].h.get("content-type"), "text/rfc822-headers");
}

TEST(Dsn, EnvidAndOrcptAreCarried) {
  auto m = make_msg(k_content);
  m.envid = "QQ314159+2B1";
  auto r = failed_rcpt();
  r.orcpt = "rfc822;U+2Bx+40Example.ORG";
  auto r2 = failed_rcpt("w@example.org");
  r2.orcpt = "utf-8;w@example.org";
  auto d = build_one(m, {r, r2}, dsn_kind::failure);
  auto p = parse_dsn(d.content);
  ASSERT_EQ(p.parts.size(), 3u);
  auto g = dsn_groups(p.parts[1].body);
  ASSERT_EQ(g.size(), 3u);
  EXPECT_EQ(g[0].get("original-envelope-id"), "QQ314159+2B1");
  EXPECT_EQ(g[1].get("original-recipient"), "rfc822; U+2Bx+40Example.ORG") << "type and xtext as given";
  EXPECT_EQ(g[2].get("original-recipient"), "utf-8; w@example.org");
}

// A remote server's reply (or a client's ENVID, ORCPT, address) with CR LF and a boundary
// must not start a header line or a MIME part.
TEST(Dsn, UntrustedTextCannotInjectHeadersOrParts) {
  auto m = make_msg(k_content);
  m.envid = "E\r\nBcc: victim@example.net";
  auto r = failed_rcpt();
  std::string evil = "550 no\r\n\r\n--" + std::string("=_tern_") + std::string(dsn_id) +
                     "\r\nContent-Type: text/html\r\n\r\n<b>x</b>\r\n.\r\n";
  r.diagnostic = evil;
  r.remote_host = "mx.example\r\nX-Evil: 1";
  r.orcpt = "rfc822;a\rContent-Type: text/html";
  r.addr = "u@example.org\nContent-Type: text/html";
  auto d = build_one(m, {r}, dsn_kind::failure);
  expect_lines_ok(d.content);
  for (auto& l : split_lines(d.content)) {
    EXPECT_FALSE(starts_with(l, "Content-Type: text/html")) << l;
    EXPECT_FALSE(starts_with(l, "Bcc:")) << l;
    EXPECT_FALSE(starts_with(l, "X-Evil")) << l;
    if (starts_with(l, "--")) {
      EXPECT_TRUE(l == "--" + d.boundary || l == "--" + d.boundary + "--") << l;
    }
  }
  auto p = parse_dsn(d.content);
  ASSERT_EQ(p.parts.size(), 3u);
  ASSERT_TRUE(p.closed);
  EXPECT_NE(d.boundary, "=_tern_" + std::string(dsn_id)) << "the diagnostic held the first candidate";
  auto g = dsn_groups(p.parts[1].body);
  ASSERT_EQ(g.size(), 2u);
  EXPECT_EQ(g[0].get("original-envelope-id"), "E??Bcc: victim@example.net");
  std::string dc = g[1].get("diagnostic-code");
  EXPECT_TRUE(starts_with(dc, "smtp; 550 no\?\?\?\?--=_tern_")) << dc;
  EXPECT_EQ(dc.find('\r'), std::string::npos);
  EXPECT_EQ(g[1].get("remote-mta"), "dns; mx.example??X-Evil:?1");
  EXPECT_EQ(g[1].get("final-recipient"), "rfc822; u@example.org?Content-Type: text/html");
  for (auto& gr : g)
    EXPECT_EQ(gr.count("content-type"), 0u) << "no field injected into the report";
  EXPECT_EQ(p.parts[0].h.list.size(), 2u) << "the text part has only its own two fields";
}

TEST(Dsn, LinesStayWithin998WithHugeDiagnosticAndHeaderLines) {
  std::string long_hdr_spaces = "X-Long: ";
  while (long_hdr_spaces.size() < 2000) long_hdr_spaces += "word ";
  long_hdr_spaces.pop_back();  // no trailing space
  std::string long_hdr_solid = "X-Solid: " + std::string(2000, 'h');
  std::string content = long_hdr_spaces + "\r\n" + long_hdr_solid + "\r\n" + k_headers + "\r\n" +
                        std::string(3000, 'b') + "\r\nend\r\n";
  auto m = make_msg(content);
  m.ret = spool::dsn_ret::full;
  auto r1 = failed_rcpt();
  std::string diag_words;
  while (diag_words.size() < 5000) diag_words += "550 blah ";
  r1.diagnostic = diag_words;
  auto r2 = failed_rcpt("v@example.org");
  std::string solid_diag(5000, 'Z');
  r2.diagnostic = solid_diag;
  auto d = build_one(m, {r1, r2}, dsn_kind::failure);
  expect_lines_ok(d.content);
  auto p = parse_dsn(d.content);
  ASSERT_EQ(p.parts.size(), 3u);
  for (auto& l : split_lines(p.parts[0].body)) EXPECT_LE(l.size(), 78u) << "text part: " << l;
  auto g = dsn_groups(p.parts[1].body);
  ASSERT_EQ(g.size(), 3u);
  EXPECT_LE(g[1].get("diagnostic-code").size(), 6u + 900u) << "cut to the bound";
  EXPECT_EQ(g[2].get("diagnostic-code"), "smtp; " + std::string(900, 'Z'));

  // The returned headers, unfolded, are the original ones: folding at a space loses nothing.
  fields back;
  size_t b = parse_fields(p.parts[2].body, back);
  EXPECT_EQ("X-Long: " + back.get("x-long"), long_hdr_spaces);
  std::string solid = back.get("x-solid");
  solid.erase(std::remove(solid.begin(), solid.end(), '\t'), solid.end());
  EXPECT_EQ(solid, std::string(2000, 'h')) << "cut and continued after a TAB";
  std::string body = p.parts[2].body.substr(b);
  body.erase(std::remove(body.begin(), body.end(), '\r'), body.end());
  body.erase(std::remove(body.begin(), body.end(), '\n'), body.end());
  EXPECT_EQ(body, std::string(3000, 'b') + "end") << "a long body line is split, not shortened";
}

TEST(Dsn, BoundaryIsNotInTheReturnedContent) {
  std::string first = "=_tern_" + std::string(dsn_id);
  std::string content = k_headers + "\r\n--" + first + "\r\nContent-Type: text/html\r\n\r\nx\r\n--" + first +
                        "--\r\n" + first + "\r\n";
  auto d = build_one(make_msg(content), {failed_rcpt()}, dsn_kind::failure);
  EXPECT_EQ(content.find(d.boundary), std::string::npos);
  EXPECT_EQ(d.boundary.size() <= 70, true) << "RFC 2046 boundary length";
  auto p = parse_dsn(d.content);
  ASSERT_EQ(p.parts.size(), 3u);
  EXPECT_EQ(p.parts[2].body, content);
  // Without the would-be boundary in the content, the first candidate is used.
  auto plain = build_one(make_msg(k_content), {failed_rcpt()}, dsn_kind::failure);
  EXPECT_EQ(plain.boundary, first);
}

TEST(Dsn, Smtputf8UsesGlobalTypes) {
  std::string content = k_headers + "X-Name: J\xC3\xBCrgen\r\n\r\nHall\xC3\xB6\r\n";
  auto m = make_msg(content, "j\xC3\xBCrgen@example.com");
  m.smtputf8 = true;
  m.body = spool::body_type::eight_bit_mime;
  auto r = failed_rcpt("\xE7\x94\xA8\xE6\x88\xB7@example.org");
  r.diagnostic = "550 5.1.1 unknown \xE7\x94\xA8\xE6\x88\xB7 \xFF bad byte";
  auto d = build_one(m, {r}, dsn_kind::failure);
  expect_lines_ok(d.content);
  EXPECT_TRUE(d.smtputf8);
  EXPECT_TRUE(d.eight_bit);
  EXPECT_EQ(d.recipient, "j\xC3\xBCrgen@example.com");
  auto p = parse_dsn(d.content);
  EXPECT_TRUE(starts_with(p.top.get("content-type"), "multipart/report; report-type=global-delivery-status;"));
  EXPECT_EQ(p.top.get("to"), "<j\xC3\xBCrgen@example.com>");
  ASSERT_EQ(p.parts.size(), 3u);
  EXPECT_EQ(p.parts[0].h.get("content-type"), "text/plain; charset=utf-8");
  EXPECT_EQ(p.parts[1].h.get("content-type"), "message/global-delivery-status");
  EXPECT_EQ(p.parts[2].h.get("content-type"), "message/global");
  EXPECT_EQ(p.parts[2].body, content);
  auto g = dsn_groups(p.parts[1].body);
  ASSERT_EQ(g.size(), 2u);
  EXPECT_EQ(g[1].get("final-recipient"), "utf-8; \xE7\x94\xA8\xE6\x88\xB7@example.org");
  EXPECT_EQ(g[1].get("diagnostic-code"), "smtp; 550 5.1.1 unknown \xE7\x94\xA8\xE6\x88\xB7 ? bad byte")
      << "valid UTF-8 kept, an invalid byte replaced";

  // Headers-only variant is message/global-headers.
  m.ret = spool::dsn_ret::hdrs;
  auto h = build_one(m, {r}, dsn_kind::failure);
  auto ph = parse_dsn(h.content);
  ASSERT_EQ(ph.parts.size(), 3u);
  EXPECT_EQ(ph.parts[2].h.get("content-type"), "message/global-headers");
}

TEST(Dsn, NonAsciiAddressWithoutSmtputf8IsXtextEncoded) {
  auto m = make_msg(k_content);  // not SMTPUTF8 (the SMTP server refuses this; be safe anyway)
  auto r = failed_rcpt("\xC3\xBC+x@example.org");
  auto d = build_one(m, {r}, dsn_kind::failure);
  EXPECT_FALSE(d.smtputf8);
  EXPECT_FALSE(d.eight_bit);
  auto p = parse_dsn(d.content);
  ASSERT_EQ(p.parts.size(), 3u);
  EXPECT_EQ(p.parts[1].h.get("content-type"), "message/delivery-status");
  auto g = dsn_groups(p.parts[1].body);
  ASSERT_EQ(g.size(), 2u);
  EXPECT_EQ(g[1].get("final-recipient"), "utf-8; \\x{FC}\\x{2B}x@example.org");
}

TEST(Dsn, EightBitContentSetsTheFlag) {
  std::string content = k_headers + "\r\ncaf\xC3\xA9 \xE9\r\n";
  auto m = make_msg(content);
  m.body = spool::body_type::eight_bit_mime;
  auto d = build_one(m, {failed_rcpt()}, dsn_kind::failure);
  EXPECT_TRUE(d.eight_bit);
  EXPECT_FALSE(d.smtputf8) << "8-bit body without SMTPUTF8: 8BITMIME only";
  auto p = parse_dsn(d.content);
  EXPECT_EQ(p.top.get("content-transfer-encoding"), "8bit");
  ASSERT_EQ(p.parts.size(), 3u);
  EXPECT_EQ(p.parts[2].h.get("content-transfer-encoding"), "8bit");
  EXPECT_EQ(p.parts[2].body, content);
  EXPECT_EQ(p.parts[0].h.get("content-type"), "text/plain; charset=us-ascii");

  // The same message returned headers only has no 8-bit byte left.
  m.ret = spool::dsn_ret::hdrs;
  auto h = build_one(m, {failed_rcpt()}, dsn_kind::failure);
  EXPECT_FALSE(h.eight_bit);
  EXPECT_EQ(h.content.find("Content-Transfer-Encoding"), std::string::npos);
}

TEST(Dsn, BareLineEndsInTheOriginalBecomeCrlf) {
  std::string content = "Subject: a\nFrom: b@example.com\r\n\nline1\rline2\n";
  auto d = build_one(make_msg(content), {failed_rcpt()}, dsn_kind::failure);
  expect_lines_ok(d.content);
  auto p = parse_dsn(d.content);
  ASSERT_EQ(p.parts.size(), 3u);
  EXPECT_EQ(p.parts[2].body, "Subject: a\r\nFrom: b@example.com\r\n\r\nline1\r\nline2\r\n");
  // Headers only: a bare LF ends the header section as well.
  auto m = make_msg(content);
  m.ret = spool::dsn_ret::hdrs;
  auto h = build_one(m, {failed_rcpt()}, dsn_kind::failure);
  auto ph = parse_dsn(h.content);
  ASSERT_EQ(ph.parts.size(), 3u);
  EXPECT_EQ(ph.parts[2].body, "Subject: a\r\nFrom: b@example.com\r\n");
  // A last line without any ending gets one.
  auto t = build_one(make_msg("Subject: a\r\n\r\nno end"), {failed_rcpt()}, dsn_kind::failure);
  auto pt = parse_dsn(t.content);
  ASSERT_EQ(pt.parts.size(), 3u);
  EXPECT_EQ(pt.parts[2].body, "Subject: a\r\n\r\nno end\r\n");
}

TEST(Dsn, BinaryMimeIsReturnedAsHeadersOnly) {
  auto m = make_msg(k_content);
  m.ret = spool::dsn_ret::full;
  m.body = spool::body_type::binary_mime;
  auto d = build_one(m, {failed_rcpt()}, dsn_kind::failure);
  EXPECT_TRUE(d.headers_only);
}

TEST(Dsn, SanitizeField) {
  EXPECT_EQ(sanitize_field("a\r\nb\tc\x7f", 100, false), "a??b?c?");
  EXPECT_EQ(sanitize_field("\xC3\xBC", 100, false), "??");
  EXPECT_EQ(sanitize_field("\xC3\xBC", 100, true), "\xC3\xBC");
  EXPECT_EQ(sanitize_field("\xC0\xAF", 100, true), "??") << "overlong";
  EXPECT_EQ(sanitize_field("\xED\xA0\x80", 100, true), "???") << "surrogate";
  EXPECT_EQ(sanitize_field("ab\xE7\x94\xA8", 4, true), "ab") << "a cut never splits a sequence";
  EXPECT_EQ(sanitize_field(std::string(5000, 'x'), 900, false).size(), 900u);
}

// A real MIME parser (Python's email package) agrees with the structure.
TEST(Dsn, PythonEmailParserAgrees) {
  if (system("python3 -c 'import email' >/dev/null 2>&1") != 0) GTEST_SKIP() << "python3 not available";
  auto m = make_msg(k_content);
  m.envid = "ENV1";
  auto r = failed_rcpt();
  std::string evil = "550 x\r\n\r\n--=_tern_" + std::string(dsn_id) + "\r\nContent-Type: text/html\r\n\r\n<b>";
  r.diagnostic = evil;
  auto r2 = failed_rcpt("v@example.org");
  auto d = build_one(m, {r, r2}, dsn_kind::failure);
  char path[] = "/tmp/tern_dsn_XXXXXX";
  int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(write(fd, d.content.data(), d.content.size()), static_cast<ssize_t>(d.content.size()));
  close(fd);
  std::string script =
      "import email,sys\n"
      "from email import policy\n"
      "m=email.message_from_binary_file(open(sys.argv[1],'rb'),policy=policy.default)\n"
      "print(m.get_content_type(), m.get_param('report-type'))\n"
      "ps=m.get_payload()\n"
      "print(len(ps), *[p.get_content_type() for p in ps])\n"
      "st=ps[1].get_payload()\n"
      "print(len(st), st[0]['Reporting-MTA'], *[b['Action'] for b in st[1:]])\n"
      "print(ps[2].get_payload()[0]['Subject'])\n"
      "print(len(m.defects)+sum(len(p.defects) for p in m.walk()))\n";
  std::string py_path = std::string(path) + ".py";
  std::ofstream(py_path) << script;
  std::string cmd = "python3 " + py_path + " " + path;
  FILE* f = popen(cmd.c_str(), "r");
  ASSERT_NE(f, nullptr);
  std::string out;
  char buf[512];
  while (size_t n = fread(buf, 1, sizeof buf, f)) out.append(buf, n);
  int rc = pclose(f);
  unlink(path);
  unlink(py_path.c_str());
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(out,
            "multipart/report delivery-status\n"
            "3 text/plain message/delivery-status message/rfc822\n"
            "3 dns; relay.example.net failed failed\n"
            "hello\n"
            "0\n");
}

// Found by dsn_fuzz: a sender holding the would-be boundary put it into To:; harmless for
// MIME (headers of the enclosing entity), but the boundary now avoids every untrusted text.
TEST(Dsn, BoundaryAvoidsTheSenderToo) {
  std::string sender = "--=_tern_" + std::string(dsn_id) + "@example.com";
  auto d = build_one(make_msg(k_content, sender), {failed_rcpt()}, dsn_kind::failure);
  EXPECT_NE(d.boundary, "=_tern_" + std::string(dsn_id));
  EXPECT_EQ(sender.find(d.boundary), std::string::npos);
}

// Found by dsn_fuzz: eight_bit was set from the raw sender although a non-SMTPUTF8 DSN
// writes its 8-bit bytes as '?'; the flag must say what the DSN holds.
TEST(Dsn, EightBitFlagDescribesTheDsnNotTheInput) {
  auto d = build_one(make_msg(k_content, "j\xC3\xBCrgen@example.com"), {failed_rcpt()}, dsn_kind::failure);
  EXPECT_FALSE(d.eight_bit);
  EXPECT_FALSE(d.smtputf8);
  for (unsigned char ch : d.content) ASSERT_LT(ch, 0x80);
  EXPECT_EQ(d.recipient, "j\xC3\xBCrgen@example.com") << "the envelope keeps the address as it is";
}
