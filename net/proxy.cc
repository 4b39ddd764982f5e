#include "net/proxy.hh"

#include <arpa/inet.h>

#include <cstring>
#include <string_view>

#include "src/core/bytes.hh"
#include "src/core/crc32c.hh"

namespace tern::net {
namespace {

constexpr unsigned char v2_sig[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                      0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};
constexpr std::string_view v1_sig = "PROXY ";

proxy_result fail(const char* why) noexcept { return {proxy_status::error, 0, why}; }

// Split off the next space-terminated token of a v1 line.
bool next_token(std::string_view& rest, std::string_view& tok) noexcept {
  auto sp = rest.find(' ');
  if (sp == 0) return false;  // empty field (double space)
  tok = rest.substr(0, sp);
  rest = sp == rest.npos ? std::string_view{} : rest.substr(sp + 1);
  return !tok.empty();
}

bool parse_port(std::string_view s, uint16_t& port) noexcept {
  if (s.empty() || s.size() > 5) return false;
  if (s.size() > 1 && s[0] == '0') return false;  // no leading zeros
  unsigned v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<unsigned>(c - '0');
  }
  if (v > 65535) return false;
  port = static_cast<uint16_t>(v);
  return true;
}

proxy_result parse_v1(std::span<const unsigned char> in, proxy_header& out) noexcept {
  std::string_view s(reinterpret_cast<const char*>(in.data()), in.size());
  // The whole line, CRLF included, is at most proxy_v1_max bytes: the CR must sit at an
  // index no greater than proxy_v1_max - 2. Once that many bytes came without one, the
  // line is too long whatever follows (a 108-byte line used to pass: the scan allowed
  // the CR at index 106).
  constexpr size_t cr_max = proxy_v1_max - 2;
  size_t lim = s.size() < cr_max + 1 ? s.size() : cr_max + 1;
  size_t cr = s.npos;
  for (size_t i = 0; i < lim; ++i) {
    if (s[i] == '\n') return fail("PROXY v1: bare LF");
    if (s[i] == '\r') {
      cr = i;
      break;
    }
    if (s[i] == 0) return fail("PROXY v1: NUL byte");
  }
  if (cr == s.npos) {
    if (s.size() > cr_max) return fail("PROXY v1: header longer than 107 bytes");
    return {};
  }
  if (cr + 1 >= s.size()) return {};  // need the LF
  if (s[cr + 1] != '\n') return fail("PROXY v1: CR not followed by LF");
  // The spec's format never puts a space before the CRLF (fields are separated by exactly
  // one space, UNKNOWN lines included); a trailing space is a malformed or forged line.
  if (s[cr - 1] == ' ') return fail("PROXY v1: space before CRLF");
  std::string_view line = s.substr(v1_sig.size(), cr - v1_sig.size());
  size_t consumed = cr + 2;

  std::string_view proto;
  if (!next_token(line, proto)) return fail("PROXY v1: missing protocol");
  out = proxy_header{};
  out.version = 1;
  if (proto == "UNKNOWN") {
    out.local = true;  // the rest of the line is ignored (spec 2.1)
    return {proxy_status::done, consumed, nullptr};
  }
  int fam;
  if (proto == "TCP4")
    fam = AF_INET;
  else if (proto == "TCP6")
    fam = AF_INET6;
  else
    return fail("PROXY v1: unknown protocol");
  std::string_view sip, dip, sport, dport;
  if (!next_token(line, sip) || !next_token(line, dip) || !next_token(line, sport) ||
      !next_token(line, dport) || !line.empty())
    return fail("PROXY v1: malformed address fields");
  uint16_t sp, dp;
  if (!parse_port(sport, sp) || !parse_port(dport, dp)) return fail("PROXY v1: bad port");
  // inet_pton is strict about the family: "TCP4 ::1 ..." fails here.
  auto src = address::from_ip(sip, sp);
  auto dst = address::from_ip(dip, dp);
  if (!src || !dst) return fail("PROXY v1: bad address");
  bool mapped = false;  // from_ip normalises v4-mapped v6 to v4; keep TCP6 honest
  if (fam == AF_INET6 && (sip.find(':') == sip.npos || dip.find(':') == dip.npos)) mapped = true;
  if ((fam == AF_INET && (src->family() != AF_INET || dst->family() != AF_INET ||
                          sip.find(':') != sip.npos || dip.find(':') != dip.npos)) ||
      mapped)
    return fail("PROXY v1: address does not match protocol");
  out.src = *src;
  out.dst = *dst;
  return {proxy_status::done, consumed, nullptr};
}

proxy_result parse_tlvs(const unsigned char* p, size_t n, const unsigned char* hdr,
                        size_t hdr_len, proxy_header& out) noexcept {
  size_t off = 0;
  while (off < n) {
    if (n - off < 3) return fail("PROXY v2: truncated TLV");
    uint8_t type = p[off];
    uint16_t len = load_be16(p + off + 1);
    if (n - off - 3 < len) return fail("PROXY v2: TLV overruns header");
    const unsigned char* v = p + off + 3;
    ++out.tlv_count;
    switch (type) {
      case 0x02:  // AUTHORITY
        if (len > 255) return fail("PROXY v2: AUTHORITY TLV too long");
        out.authority.assign(reinterpret_cast<const char*>(v), len);
        break;
      case 0x03: {  // CRC32C over the whole header with the checksum field zeroed
        if (len != 4) return fail("PROXY v2: CRC32C TLV length is not 4");
        uint32_t want = uint32_t(v[0]) << 24 | uint32_t(v[1]) << 16 | uint32_t(v[2]) << 8 | v[3];
        size_t at = static_cast<size_t>(v - hdr);
        static const unsigned char zero[4] = {0, 0, 0, 0};
        uint32_t c = crc32c(0, hdr, at);
        c = crc32c(c, zero, 4);
        c = crc32c(c, hdr + at + 4, hdr_len - at - 4);
        if (c != want) return fail("PROXY v2: CRC32C mismatch");
        out.crc_verified = true;
        break;
      }
      case 0x05:  // UNIQUE_ID
        if (len > 128) return fail("PROXY v2: UNIQUE_ID TLV too long");
        out.unique_id.assign(reinterpret_cast<const char*>(v), len);
        break;
      case 0x20:  // SSL: client(1) verify(4) sub-TLVs; bounded above, flag only
        if (len < 5) return fail("PROXY v2: SSL TLV too short");
        out.ssl = (v[0] & 0x01) != 0;
        break;
      default:  // ALPN, NOOP, NETNS, custom: bounded and skipped
        break;
    }
    off += 3 + len;
  }
  return {proxy_status::done, 0, nullptr};
}

proxy_result parse_v2(std::span<const unsigned char> in, proxy_header& out,
                      size_t v2_max) noexcept {
  if (in.size() < 16) return {};
  const unsigned char* h = in.data();
  uint8_t ver_cmd = h[12], fam = h[13];
  uint16_t len = load_be16(h + 14);
  if ((ver_cmd >> 4) != 2) return fail("PROXY v2: bad version");
  uint8_t cmd = ver_cmd & 0x0F;
  if (cmd > 1) return fail("PROXY v2: bad command");
  size_t total = 16 + size_t(len);
  if (total > v2_max) return fail("PROXY v2: header longer than the configured maximum");
  if (in.size() < total) return {};
  out = proxy_header{};
  out.version = 2;
  proxy_result done{proxy_status::done, total, nullptr};
  if (cmd == 0) {  // LOCAL: use the real endpoints, discard the block (spec 2.2)
    out.local = true;
    return done;
  }
  uint8_t af = fam >> 4, proto = fam & 0x0F;
  size_t alen;
  switch (af) {
    case 0x0:  // UNSPEC
      out.local = true;
      return done;
    case 0x1: alen = 12; break;
    case 0x2: alen = 36; break;
    case 0x3: alen = 216; break;
    default: return fail("PROXY v2: bad address family");
  }
  if (proto != 0x1) return fail("PROXY v2: only STREAM transport is accepted");
  if (len < alen) return fail("PROXY v2: address block shorter than its family needs");
  const unsigned char* a = h + 16;
  if (af == 0x1) {
    sockaddr_in s{}, d{};
    s.sin_family = d.sin_family = AF_INET;
    std::memcpy(&s.sin_addr, a, 4);
    std::memcpy(&d.sin_addr, a + 4, 4);
    s.sin_port = htons(load_be16(a + 8));
    d.sin_port = htons(load_be16(a + 10));
    out.src = address::from_sockaddr(reinterpret_cast<sockaddr*>(&s), sizeof s);
    out.dst = address::from_sockaddr(reinterpret_cast<sockaddr*>(&d), sizeof d);
  } else if (af == 0x2) {
    sockaddr_in6 s{}, d{};
    s.sin6_family = d.sin6_family = AF_INET6;
    std::memcpy(&s.sin6_addr, a, 16);
    std::memcpy(&d.sin6_addr, a + 16, 16);
    s.sin6_port = htons(load_be16(a + 32));
    d.sin6_port = htons(load_be16(a + 34));
    out.src = address::from_sockaddr(reinterpret_cast<sockaddr*>(&s), sizeof s);
    out.dst = address::from_sockaddr(reinterpret_cast<sockaddr*>(&d), sizeof d);
  } else {
    out.local = true;  // AF_UNIX: no IP to use; treat like LOCAL
  }
  auto r = parse_tlvs(a + alen, len - alen, h, total, out);
  if (r.status == proxy_status::error) return r;
  return done;
}

}  // namespace

proxy_result parse_proxy(std::span<const unsigned char> in, proxy_header& out,
                         size_t v2_max) noexcept {
  if (in.empty()) return {};
  if (in[0] == v2_sig[0]) {
    size_t n = in.size() < sizeof v2_sig ? in.size() : sizeof v2_sig;
    if (std::memcmp(in.data(), v2_sig, n) != 0) return fail("PROXY: bad v2 signature");
    if (n < sizeof v2_sig) return {};
    return parse_v2(in, out, v2_max);
  }
  size_t n = in.size() < v1_sig.size() ? in.size() : v1_sig.size();
  if (std::memcmp(in.data(), v1_sig.data(), n) != 0) return fail("PROXY: no PROXY header");
  if (n < v1_sig.size()) return {};
  return parse_v1(in, out);
}

std::string encode_proxy_v1(const address& src, const address& dst) {
  const char* proto = src.family() == AF_INET6 ? "TCP6" : "TCP4";
  return std::string("PROXY ") + proto + " " + src.ip() + " " + dst.ip() + " " +
         std::to_string(src.port()) + " " + std::to_string(dst.port()) + "\r\n";
}

std::string encode_proxy_v2(const address& src, const address& dst, bool local,
                            bool with_crc) {
  std::string h(reinterpret_cast<const char*>(v2_sig), sizeof v2_sig);
  h.push_back(static_cast<char>(local ? 0x20 : 0x21));
  std::string body;
  if (local) {
    h.push_back(0x00);
  } else if (src.family() == AF_INET) {
    h.push_back(0x11);
    auto& s = reinterpret_cast<const sockaddr_in&>(src.ss);
    auto& d = reinterpret_cast<const sockaddr_in&>(dst.ss);
    body.append(reinterpret_cast<const char*>(&s.sin_addr), 4);
    body.append(reinterpret_cast<const char*>(&d.sin_addr), 4);
    body.append(reinterpret_cast<const char*>(&s.sin_port), 2);
    body.append(reinterpret_cast<const char*>(&d.sin_port), 2);
  } else {
    h.push_back(0x21);
    auto& s = reinterpret_cast<const sockaddr_in6&>(src.ss);
    auto& d = reinterpret_cast<const sockaddr_in6&>(dst.ss);
    body.append(reinterpret_cast<const char*>(&s.sin6_addr), 16);
    body.append(reinterpret_cast<const char*>(&d.sin6_addr), 16);
    body.append(reinterpret_cast<const char*>(&s.sin6_port), 2);
    body.append(reinterpret_cast<const char*>(&d.sin6_port), 2);
  }
  size_t crc_at = 0;
  if (with_crc) {
    body.append("\x03\x00\x04", 3);
    crc_at = 16 + body.size();
    body.append(4, '\0');
  }
  h.push_back(static_cast<char>(body.size() >> 8));
  h.push_back(static_cast<char>(body.size() & 0xFF));
  h += body;
  if (with_crc) {
    uint32_t c = crc32c(0, h.data(), h.size());
    for (int i = 0; i < 4; ++i) h[crc_at + i] = static_cast<char>(c >> (24 - 8 * i));
  }
  return h;
}

}  // namespace tern::net
