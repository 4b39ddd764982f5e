#pragma once
// Explicit little/big-endian encoding helpers. Parsers never cast packed structs over
// untrusted buffers (style.md); they read fields through these after a bounds check.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace tern {

inline uint16_t load_be16(const unsigned char* p) noexcept {
  return static_cast<uint16_t>((p[0] << 8) | p[1]);
}
inline uint32_t load_le32(const unsigned char* p) noexcept {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}
inline uint64_t load_le64(const unsigned char* p) noexcept {
  return uint64_t(load_le32(p)) | uint64_t(load_le32(p + 4)) << 32;
}
inline uint16_t load_le16(const unsigned char* p) noexcept {
  return static_cast<uint16_t>(p[0] | (p[1] << 8));
}
inline void store_le32(char* p, uint32_t v) noexcept {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<char>(v >> (8 * i));
}

inline void put_u8(std::string& s, uint8_t v) { s.push_back(static_cast<char>(v)); }
inline void put_u16(std::string& s, uint16_t v) {
  char b[2] = {static_cast<char>(v), static_cast<char>(v >> 8)};
  s.append(b, 2);
}
inline void put_u32(std::string& s, uint32_t v) {
  char b[4];
  store_le32(b, v);
  s.append(b, 4);
}
inline void put_u64(std::string& s, uint64_t v) {
  put_u32(s, static_cast<uint32_t>(v));
  put_u32(s, static_cast<uint32_t>(v >> 32));
}

// Bounded reader over a byte span: every get checks the remaining length first and
// sets a sticky failure flag instead of reading past the end.
class byte_reader {
 public:
  byte_reader(const unsigned char* p, size_t n) noexcept : p_(p), n_(n) {}
  bool ok() const noexcept { return ok_; }
  size_t remaining() const noexcept { return n_ - off_; }
  uint8_t u8() noexcept { return need(1) ? p_[off_++] : 0; }
  uint16_t u16() noexcept {
    if (!need(2)) return 0;
    auto v = load_le16(p_ + off_);
    off_ += 2;
    return v;
  }
  uint32_t u32() noexcept {
    if (!need(4)) return 0;
    auto v = load_le32(p_ + off_);
    off_ += 4;
    return v;
  }
  uint64_t u64() noexcept {
    if (!need(8)) return 0;
    auto v = load_le64(p_ + off_);
    off_ += 8;
    return v;
  }
  std::string_view bytes(size_t n) noexcept {
    if (!need(n)) return {};
    std::string_view v(reinterpret_cast<const char*>(p_ + off_), n);
    off_ += n;
    return v;
  }
  std::string_view str8() noexcept { return bytes(u8()); }
  std::string_view str16() noexcept { return bytes(u16()); }

 private:
  bool need(size_t n) noexcept {
    if (!ok_ || n_ - off_ < n) {
      ok_ = false;
      return false;
    }
    return true;
  }
  const unsigned char* p_;
  size_t n_;
  size_t off_ = 0;
  bool ok_ = true;
};

// Length of the well-formed UTF-8 sequence at p (n > 0 bytes available), 0 when it is not
// one (RFC 3629: overlong forms, surrogates, above U+10FFFF, truncated). ASCII is 1. The
// code point goes to *cp_out when given.
inline size_t utf8_seq(const unsigned char* p, size_t n, uint32_t* cp_out = nullptr) noexcept {
  unsigned c = p[0];
  if (c < 0x80) {
    if (cp_out) *cp_out = c;
    return 1;
  }
  size_t len;
  uint32_t cp;
  if (c >= 0xC2 && c <= 0xDF) {
    len = 2;
    cp = c & 0x1F;
  } else if (c >= 0xE0 && c <= 0xEF) {
    len = 3;
    cp = c & 0x0F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4;
    cp = c & 0x07;
  } else {
    return 0;  // a continuation byte, a C0/C1 overlong lead, or a lead above U+10FFFF
  }
  if (n < len) return 0;
  for (size_t i = 1; i < len; ++i) {
    if ((p[i] & 0xC0) != 0x80) return 0;
    cp = cp << 6 | (p[i] & 0x3F);
  }
  if (len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) return 0;
  if (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) return 0;
  if (cp_out) *cp_out = cp;
  return len;
}

}  // namespace tern
