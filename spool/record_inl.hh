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

}  // namespace tern::spool
