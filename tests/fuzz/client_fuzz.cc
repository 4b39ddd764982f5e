// libFuzzer: arbitrary server bytes through the SMTP/LMTP delivery client, which a fake host
// drives as the shard would (TLS results, body pulled in small pieces, up to two messages,
// then QUIT). Invariants: no crash; every byte the client sends is in CRLF lines with no
// bare CR or LF (commands and body alike); with tls encrypt/verify nothing but EHLO/LHLO,
// STARTTLS and QUIT goes out before TLS is up; AUTH never goes out in clear; results are
// final when the client says so.
//
// Input: byte 0 picks the configuration (policy, LMTP, TLS engine, credentials, handshake
// result, body budget), byte 1 the size of the pieces the server bytes arrive in, the rest
// is what the server says.
#include <cassert>
#include <cstdint>
#include <string>
#include <string_view>

#include "src/smtp/client.hh"

namespace {

using namespace tern;
using namespace tern::smtp;

bool clean_lines(std::string_view s) {
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\r' && (i + 1 == s.size() || s[i + 1] != '\n')) return false;
    if (s[i] == '\n' && (i == 0 || s[i - 1] != '\r')) return false;
  }
  return s.empty() || s.ends_with("\r\n");
}

// Every line of `s` starts with one of the commands allowed in clear under `p`.
bool clear_text_allowed(std::string_view s, tls_policy p) {
  bool required = p == tls_policy::encrypt || p == tls_policy::verify;
  while (!s.empty()) {
    auto eol = s.find("\r\n");
    std::string_view line = s.substr(0, eol);
    s.remove_prefix(eol == s.npos ? s.size() : eol + 2);
    if (line.starts_with("AUTH")) return false;
    if (!required) continue;
    if (!(line.starts_with("EHLO ") || line.starts_with("LHLO ") || line == "STARTTLS" || line == "QUIT"))
      return false;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const uint8_t mode = data[0];
  const size_t piece = data[1] % 64 + 1;
  data += 2;
  size -= 2;

  client_config cfg;
  cfg.helo_name = "fuzz.test";
  cfg.tls = static_cast<tls_policy>(mode & 3);
  cfg.protocol = mode & 4 ? client_protocol::lmtp : client_protocol::smtp;
  cfg.tls_available = mode & 8;
  if (mode & 16) {
    cfg.auth_user = "user";
    cfg.auth_password = "pass";
  }
  const bool handshake_ok = !(mode & 32);
  const size_t budget = (mode >> 6) == 0 ? 1 : (mode >> 6) == 1 ? 3 : (mode >> 6) == 2 ? 16 : 4096;
  cfg.limits.reply_line_length = 128;
  cfg.limits.reply_lines = 16;
  cfg.limits.reply_text_length = 64;

  static const spool::rcpt_view rcpts[] = {
      {"a@x.test", spool::notify_success | spool::notify_failure, "rfc822;a+40x.test"},
      {"b@x.test", spool::notify_never, {}},
      {"c@x.test", 0, {}},
  };
  client_message msg;
  msg.sender = "s@y.test";
  msg.body = spool::body_type::eight_bit_mime;
  msg.ret = spool::dsn_ret::hdrs;
  msg.envid = "id+2B1";
  msg.rcpts = rcpts;
  msg.content = ".lead\r\nbare\rcr\nlf\r\n.\r\n..\n\r.end";

  static client c;  // reused across runs, as a shard reuses a slot
  c.reset(cfg);
  c.connected();
  bool secure = false, tls_started = false;
  int sent = 0;
  std::string out, all;

  auto host_step = [&] {
    for (int guard = 0; guard < 100000; ++guard) {
      c.take_output(out);
      assert(secure || clear_text_allowed(out, cfg.tls));
      all += out;
      out.clear();
      if (c.has_results()) {
        for (auto& r : c.results()) assert(r.status != rcpt_status::pending && r.status != rcpt_status::accepted);
      }
      switch (c.stage()) {
        case client_stage::tls_handshake:
          assert(!tls_started);  // asked once per connection
          tls_started = true;
          c.tls_done(handshake_ok);
          secure = handshake_ok;
          continue;
        case client_stage::body: {
          size_t n = c.produce(budget);
          assert(n <= budget && c.output_size() == n);
          continue;
        }
        case client_stage::idle:
          if (sent < 2) {
            ++sent;
            bool ok = c.send(msg);
            assert(ok);
            if (c.stage() == client_stage::idle) continue;  // finished at once
          } else {
            c.quit();
          }
          continue;
        default:
          return;
      }
    }
  };

  host_step();
  const char* p = reinterpret_cast<const char*>(data);
  for (size_t off = 0; off < size; off += piece) {
    c.feed(p + off, std::min(piece, size - off));
    host_step();
  }
  if (mode & 1) c.timeout();
  else c.lost();
  host_step();
  assert(c.stage() == client_stage::done);
  assert(clean_lines(all));
  return 0;
}
