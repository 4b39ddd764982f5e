// libFuzzer: the spool reader on arbitrary segment bytes: never reads out of bounds,
// never loops, and every record it accepts decodes or is rejected cleanly.
#include <cassert>
#include <cstdint>

#include "spool/record.hh"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const unsigned char> d(data, size);
  size_t off = 0;
  for (;;) {
    tern::spool::record_view rv;
    auto s = tern::spool::read_record(d, off, rv);
    if (s != tern::spool::read_status::ok) break;
    assert(rv.size >= tern::spool::record_header_size && off + rv.size <= size);
    tern::spool::message_view m;
    if (rv.type == tern::spool::record_type::message && tern::spool::decode_message(rv.payload, m))
      tern::spool::for_each_rcpt(m, [](const tern::spool::rcpt_view&) {});
    std::string_view id;
    tern::spool::decode_done(rv.payload, id);
    tern::spool::segment_view sv;
    tern::spool::decode_segment_header(rv.payload, sv);
    off += rv.size;
  }
  return 0;
}
