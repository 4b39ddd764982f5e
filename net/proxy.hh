#pragma once
// PROXY protocol v1 and v2 receiver (haproxy doc/proxy-protocol.txt).
//
// A pure function over the bytes received so far: it answers need_more, done (with the
// number of bytes the header used) or error. It never reads past the span, never trusts a
// length it has not bounded, and decodes big-endian fields explicitly.
//
// Trust: the caller decides whether a header is expected at all (per listener, from
// configuration, never auto-detected) and whether the peer may send one (trusted_proxies).
// This parser only decides whether the bytes are a well-formed header.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "net/address.hh"

namespace tern::net {

struct proxy_header {
  uint8_t version = 0;  // 1 or 2
  // True for v2 LOCAL, v2 UNSPEC/UNIX families and v1 UNKNOWN: the connection's own
  // endpoints are used, the header only says "this is the proxy talking" (health checks).
  bool local = false;
  address src, dst;
  // v2 TLVs we keep (bounded copies); the rest are validated for bounds and skipped.
  std::string authority;  // PP2_TYPE_AUTHORITY (SNI), at most 255 bytes
  std::string unique_id;  // PP2_TYPE_UNIQUE_ID, at most 128 bytes
  bool crc_verified = false;
  bool ssl = false;
  uint16_t tlv_count = 0;
};

enum class proxy_status : uint8_t { need_more, done, error };

struct proxy_result {
  proxy_status status = proxy_status::need_more;
  size_t consumed = 0;          // header length when done
  const char* error = nullptr;  // static text when error
};

inline constexpr size_t proxy_v1_max = 107;      // spec: worst case v1 line incl. CRLF
inline constexpr size_t proxy_v2_default_max = 4096;

// Parse a PROXY header at the start of `in`. `v2_max` caps the whole v2 header (16 + len).
proxy_result parse_proxy(std::span<const unsigned char> in, proxy_header& out,
                         size_t v2_max = proxy_v2_default_max) noexcept;

// Encoders, for tern-load, tests and (later) the outbound PROXY header.
std::string encode_proxy_v1(const address& src, const address& dst);
std::string encode_proxy_v2(const address& src, const address& dst, bool local = false,
                            bool with_crc = false);

}  // namespace tern::net
