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

}  // namespace tern
