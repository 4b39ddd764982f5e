// libFuzzer: arbitrary client bytes through the SMTP session, split at a fuzzer-chosen
// point. The session must never crash, every reply line must be CRLF-terminated, and any
// spool record it produces must read back and decode.
#include <cassert>
#include <cstdint>
#include <cstdio>
#include <string>

#include "spool/record.hh"
#include "src/core/log.hh"
#include "src/smtp/session.hh"

namespace {
struct host : tern::smtp::session_host {
  int n = 0;
  void new_queue_id(char (&out)[tern::smtp::queue_id_len + 1]) override { snprintf(out, sizeof out, "%018d", ++n); }
  bool spool_healthy() const override { return true; }
  uint64_t wall_us() const override { return 0; }
};
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static bool once = (tern::log::set_level(tern::log::level::error), true);
  (void)once;
  tern::smtp::policy pol;
  pol.hostname = "fuzz.test";
  pol.limits.message_size = 4096;
  pol.limits.line_length = 512;
  pol.limits.recipients = 5;
  pol.limits.errors = 20;
  pol.limits.junk_commands = 10;
  pol.limits.recipient_overshoot = 5;
  pol.relay_networks.push_back(*tern::net::cidr::parse("127.0.0.0/8"));
  pol.relay_domains = {"example.com", ".sub.example.org"};
  host h;
  tern::smtp::session s;
  // The second byte picks the listener flavour: bare LF allowed or not, a trusted or an
  // untrusted client, a PROXY health check.
  uint8_t mode = size > 1 ? data[1] : 0;
  tern::config::listener L;
  L.allow_bare_lf = mode & 1;
  auto addr = *tern::net::address::from_ip(mode & 2 ? "198.18.0.1" : "127.0.0.1", 1);
  tern::smtp::conn_info ci = tern::smtp::from_socket(addr, L);
  if (mode & 4) {
    tern::net::proxy_header ph;
    ph.version = 2;
    ph.local = true;
    ci = tern::smtp::from_proxy(ph, addr, L);
  }
  s.reset(&pol, &h, ci);
  s.start();
  size_t split = size ? data[0] % (size + 1) : 0;
  const char* p = reinterpret_cast<const char*>(data);
  std::string out;
  for (auto [a, b] : {std::pair{size_t(0), split}, std::pair{split, size}}) {
    s.feed(p + a, b - a);
    s.process();
    while (s.want_commit()) {
      auto rec = s.record();
      tern::spool::record_view rv;
      auto st = tern::spool::read_record({reinterpret_cast<const unsigned char*>(rec.data()), rec.size()}, 0, rv);
      assert(st == tern::spool::read_status::ok);
      tern::spool::message_view m;
      assert(tern::spool::decode_message(rv.payload, m));
      // Received: is ours: client text never adds structure to it. The first line has
      // exactly one comment, "(helo=TOKEN)", and TOKEN has no space, bracket or ';'.
      std::string_view c = m.content;
      auto eol = c.find("\r\n");
      assert(eol != c.npos);
      std::string_view first = c.substr(0, eol);
      assert(first.rfind("Received: from [", 0) == 0);
      auto open = first.find(" (helo=");
      assert(open != first.npos && first.back() == ')');
      std::string_view token = first.substr(open + 7, first.size() - open - 8);
      assert(token.find_first_of(" ()[];\\\"\t") == token.npos);
      assert(first.find('(') == open + 1 && first.find(')') == first.size() - 1);
      assert(c.find("\r\n\tby fuzz.test (tern) with ") == eol);
      s.commit_done(true);
      s.process();
    }
    std::string chunk;
    s.take_output(chunk);
    out += chunk;
  }
  assert(out.empty() || (out.size() >= 2 && out.compare(out.size() - 2, 2, "\r\n") == 0));
  return 0;
}
