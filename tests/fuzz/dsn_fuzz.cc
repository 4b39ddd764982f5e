// libFuzzer: the DSN builder on arbitrary sender, recipient, ORCPT, ENVID, remote host,
// diagnostic, status and content. Whatever the bytes: no DSN for a null sender; otherwise
// every line ends in CRLF and is at most 998 bytes, the boundary occurs only where the
// builder put it (its parameter, three part delimiters, the closing one), the top-level and
// part header sections hold only the builder's own fields, a non-SMTPUTF8 DSN has no 8-bit
// byte in its headers or report, and eight_bit says whether any 8-bit byte is present.
//
// Input: byte 0 = flags (kind, RET, SMTPUTF8, BODY, remote_reply), byte 1 = NOTIFY, then
// NUL-separated fields: sender, address, orcpt, envid, remote host, diagnostic, status,
// content (the rest).
#include <cassert>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "src/queue/dsn.hh"

using namespace tern;

namespace {

size_t count(std::string_view s, std::string_view what) {
  size_t n = 0;
  for (size_t p = s.find(what); p != s.npos; p = s.find(what, p + 1)) ++n;
  return n;
}

bool ascii(std::string_view s) {
  for (unsigned char c : s)
    if (c >= 0x80) return false;
  return true;
}

// The header section at s (up to the empty line): each line is a continuation or starts
// with one of the allowed names. Returns the offset after the empty line.
size_t check_fields(std::string_view s, std::initializer_list<std::string_view> allowed) {
  size_t pos = 0;
  for (;;) {
    size_t e = s.find("\r\n", pos);
    assert(e != s.npos);
    std::string_view line = s.substr(pos, e - pos);
    pos = e + 2;
    if (line.empty()) return pos;
    if (line[0] == ' ' || line[0] == '\t') continue;
    bool ok = false;
    for (auto a : allowed) ok = ok || line.substr(0, a.size()) == a;
    assert(ok);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  std::string_view in(reinterpret_cast<const char*>(data), size);
  uint8_t flags = data[0];
  uint8_t notify = data[1];
  std::vector<std::string_view> f;
  size_t pos = 2;
  while (f.size() < 7) {
    size_t e = in.find('\0', pos);
    if (e == in.npos) e = in.size();
    f.push_back(in.substr(std::min(pos, in.size()), e - std::min(pos, in.size())));
    pos = e + 1;
  }
  std::string_view content = pos < in.size() ? in.substr(pos) : std::string_view{};

  spool::message_view m;
  m.id = "0123456789AB00001";
  m.arrival_us = 1796394017000000ull;
  m.mail_from = f[0];
  m.envid = f[3];
  m.ret = static_cast<spool::dsn_ret>((flags >> 2) % 3);
  m.smtputf8 = flags & 0x10;
  m.body = static_cast<spool::body_type>((flags >> 5) % 3);
  m.content = content;
  queue::dsn_rcpt r;
  r.addr = f[1];
  r.notify = notify;
  r.orcpt = f[2];
  r.remote_host = f[4];
  r.remote_ip = "192.0.2.1";
  r.diagnostic = f[5];
  r.status = f[6];
  r.remote_reply = flags & 0x80;
  auto kind = static_cast<queue::dsn_kind>((flags & 3) % 3);
  r.outcome = kind == queue::dsn_kind::failure  ? queue::rcpt_outcome::failed
              : kind == queue::dsn_kind::delay ? queue::rcpt_outcome::deferred
                                               : queue::rcpt_outcome::relayed;
  r.last_attempt_us = m.arrival_us + 1;
  queue::dsn_rcpt rs[] = {r, r};
  rs[1].addr = "second@example.org";

  auto plan = queue::plan_dsns(m.mail_from, rs, true);
  if (m.mail_from.empty()) assert(plan.empty());

  queue::dsn_options o;
  o.hostname = "relay.example.net";
  o.return_size_limit = 512;
  queue::dsn_request q;
  q.kind = kind;
  q.queue_id = "1A2B3C4D5E601000A1";
  q.now_us = m.arrival_us + 7200000000ull;
  q.retry_until_us = m.arrival_us + 432000000000ull;
  uint32_t which[] = {0, 1};
  queue::dsn_message d;
  bool ok = queue::build_dsn(o, m, rs, which, q, d);
  if (m.mail_from.empty()) {
    assert(!ok);
    return 0;
  }
  assert(ok);
  const std::string& c = d.content;

  // Lines: CRLF only, at most 998 bytes.
  size_t start = 0;
  bool eight = false;
  for (size_t i = 0; i < c.size(); ++i) {
    unsigned char ch = static_cast<unsigned char>(c[i]);
    eight = eight || ch >= 0x80;
    if (ch == '\r') assert(i + 1 < c.size() && c[i + 1] == '\n');
    if (ch == '\n') {
      assert(i > 0 && c[i - 1] == '\r');
      assert(i - 1 - start <= 998);
      start = i + 1;
    }
  }
  assert(start == c.size());
  assert(d.eight_bit == eight);
  assert(d.sender.empty() && d.recipient == m.mail_from);

  // The boundary: the parameter, three delimiters and the closing one, nothing else.
  assert(!d.boundary.empty() && d.boundary.size() <= 70);
  assert(count(c, d.boundary) == 5);
  std::string delim = "\r\n--" + d.boundary + "\r\n";
  assert(count(c, delim) == 3);
  assert(count(c, "\r\n--" + d.boundary + "--\r\n") == 1);

  // Header sections hold only our fields.
  size_t body = check_fields(c, {"From: ", "To: ", "Subject: ", "Date: ", "Message-ID: ", "Auto-Submitted: ",
                                 "MIME-Version: ", "Content-Type: ", "Content-Transfer-Encoding: "});
  if (!m.smtputf8) assert(ascii(std::string_view(c).substr(0, body)));
  size_t p1 = c.find(delim) + delim.size();
  check_fields(std::string_view(c).substr(p1), {"Content-Description: ", "Content-Type: ",
                                                "Content-Transfer-Encoding: "});
  size_t p2 = c.find(delim, p1) + delim.size();
  size_t report = p2 + check_fields(std::string_view(c).substr(p2), {"Content-Description: ", "Content-Type: ",
                                                                     "Content-Transfer-Encoding: "});
  size_t p3 = c.find(delim, p2);
  if (!m.smtputf8) assert(ascii(std::string_view(c).substr(report, p3 - report)));
  // Every report line is a DSN field of ours, a continuation or a group separator.
  std::string_view rep = std::string_view(c).substr(report, p3 + 2 - report);
  size_t rp = 0;
  while (rp < rep.size()) {
    size_t e = rep.find("\r\n", rp);
    std::string_view line = rep.substr(rp, e - rp);
    rp = e + 2;
    if (line.empty() || line[0] == ' ') continue;
    bool known = false;
    for (std::string_view n : {"Reporting-MTA: ", "X-Tern-Queue-ID: ", "X-Tern-Sender: ", "Original-Envelope-Id: ",
                               "Arrival-Date: ", "Original-Recipient: ", "Final-Recipient: ", "Action: ",
                               "Status: ", "Remote-MTA: ", "Diagnostic-Code: ", "Last-Attempt-Date: ",
                               "Will-Retry-Until: "})
      known = known || line.substr(0, n.size()) == n;
    assert(known);
  }
  size_t p4 = p3 + delim.size();
  size_t ret_body = p4 + check_fields(std::string_view(c).substr(p4), {"Content-Description: ", "Content-Type: ",
                                                                       "Content-Transfer-Encoding: "});
  // Content whose lines are already right comes back byte for byte when returned in full.
  bool clean = content.size() >= 2 && content.substr(content.size() - 2) == "\r\n";
  for (size_t i = 0, ls = 0; clean && i < content.size(); ++i) {
    if (content[i] == '\r') clean = i + 1 < content.size() && content[i + 1] == '\n';
    if (content[i] == '\n') {
      clean = i > 0 && content[i - 1] == '\r' && i - 1 - ls <= 998;
      ls = i + 1;
    }
  }
  if (clean && !d.headers_only) {
    std::string close = "\r\n--" + d.boundary + "--\r\n";
    assert(c.size() >= ret_body + close.size());
    assert(std::string_view(c).substr(ret_body, c.size() - close.size() - ret_body) == content);
  }
  return 0;
}
