// libFuzzer: the PROXY parser never reads out of bounds, and "done" always consumes a
// prefix of what it was given, the same whether the bytes came at once or split.
#include <cassert>
#include <cstdint>
#include <cstring>

#include "net/proxy.hh"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tern::net::proxy_header h;
  auto r = tern::net::parse_proxy({data, size}, h, 1024);
  if (r.status == tern::net::proxy_status::done) {
    assert(r.consumed > 0 && r.consumed <= size);
    // Every strict prefix of a complete header is "need more" (no early decisions).
    tern::net::proxy_header h2;
    auto p = tern::net::parse_proxy({data, r.consumed - 1}, h2, 1024);
    assert(p.status == tern::net::proxy_status::need_more);
  }
  return 0;
}
