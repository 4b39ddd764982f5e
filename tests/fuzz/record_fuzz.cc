// libFuzzer: the segment walker on arbitrary bytes: never reads out of bounds, never loops,
// does CRC work linear in the input, reports damage regions that tile the input after the
// last good record, and every record it accepts carries the segment's nonce and decodes or
// is rejected cleanly.
#include <cassert>
#include <cstdint>

#include "spool/record.hh"
#include "spool/scan.hh"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const unsigned char> d(data, size);
  tern::spool::segment_scan sc;
  uint64_t last_end = 0;
  bool ok = tern::spool::scan_bytes(d, sc, [&](const tern::spool::record_view& rv, uint64_t off) {
    assert(rv.size >= tern::spool::record_header_size && off + rv.size <= size);
    assert(off >= last_end);
    assert(tern::spool::record_nonce(data + off) == sc.nonce);
    last_end = off + rv.size;
    tern::spool::message_view m;
    if (rv.type == tern::spool::record_type::message && tern::spool::decode_message(rv.payload, m))
      tern::spool::for_each_rcpt(m, [](const tern::spool::rcpt_view&) {});
    std::string_view id;
    tern::spool::decode_done(rv.payload, id);
    tern::spool::segment_view sv;
    tern::spool::decode_segment_header(rv.payload, sv);
  });
  if (ok) {
    // Resync work is bounded (4 x size + 64 KiB, checked before each candidate's CRC);
    // the plain walk adds at most the file once more.
    assert(sc.crc_bytes <= 5 * uint64_t(size) + (64u << 10));
    for (auto& g : sc.damaged) assert(g.begin < g.end && g.end <= size);
  }
  // A single record without the nonce check (how a session's record is validated).
  tern::spool::record_view rv;
  if (tern::spool::read_record(d, 0, rv) == tern::spool::read_status::ok) assert(rv.size <= size);
  return 0;
}
