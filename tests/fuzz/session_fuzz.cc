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
  pol.relay_networks.push_back(*tern::net::cidr::parse("127.0.0.0/8"));
  host h;
  tern::smtp::session s;
  tern::smtp::conn_info ci;
  ci.client = ci.peer = *tern::net::address::from_ip("127.0.0.1", 1);
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
