#pragma once
#include "src/core/bytes.hh"

namespace tern::spool {

template <typename F>
bool for_each_rcpt(const message_view& m, F&& f) {
  byte_reader r(reinterpret_cast<const unsigned char*>(m.rcpt_block.data()), m.rcpt_block.size());
  for (uint32_t i = 0; i < m.nrcpt; ++i) {
    rcpt_view rv;
    rv.addr = r.str16();
    rv.notify = r.u8();
    rv.orcpt = r.str16();
    if (!r.ok()) return false;
    f(rv);
  }
  return r.remaining() == 0;
}

template <typename F>
bool for_each_status(const status_view& s, F&& f) {
  byte_reader r(reinterpret_cast<const unsigned char*>(s.entries.data()), s.entries.size());
  for (uint32_t i = 0; i < s.count; ++i) {
    rcpt_status e;
    e.index = r.u32();
    uint8_t st = r.u8();
    e.dsn = r.str16();
    e.text = r.str16();
    if (!r.ok() || st > 3) return false;
    e.state = static_cast<rcpt_state>(st);
    f(e);
  }
  return r.remaining() == 0;
}

}  // namespace tern::spool
