#pragma once
// Streaming DATA decoder (RFC 5321 4.5.2 dot-stuffing) with the SMTP smuggling defence.
//
// The end of data is recognised ONLY as <CR><LF>.<CR><LF> where both CRLFs are real: a
// bare LF or bare CR never starts a line, so "\n.\n", "\r\n.\n", "\n.\r\n", "\r.\r" and a
// NUL next to the dot cannot end a message or start a second transaction. Bare CR, bare LF
// and NUL are remembered and the message is rejected after its end (policy: reject).
// Content is appended unstuffed to the caller's buffer, up to max_size; beyond that the
// decoder only counts, so an oversized message is still read to its end and rejected.
#include <cstddef>
#include <cstdint>
#include <string>

namespace tern::smtp {

class dot_decoder {
 public:
  void reset(uint64_t max_size) noexcept {
    *this = dot_decoder{};
    max_ = max_size;
  }
  // Consume up to n bytes; returns how many were used (stops right after the final
  // ".\r\n", so pipelined commands after the end stay with the caller).
  size_t feed(const char* p, size_t n, std::string& out);

  bool done() const noexcept { return st_ == st::done; }
  bool bare_cr() const noexcept { return bare_cr_; }
  bool bare_lf() const noexcept { return bare_lf_; }
  bool nul() const noexcept { return nul_; }
  bool too_big() const noexcept { return size_ > max_; }
  uint64_t size() const noexcept { return size_; }

 private:
  enum class st : uint8_t { line_start, mid, cr, dot, dot_cr, done };
  void emit(std::string& out, const char* p, size_t n);
  st st_ = st::line_start;
  bool bare_cr_ = false, bare_lf_ = false, nul_ = false;
  uint64_t size_ = 0, max_ = 0;
};

// Bare CR / bare LF / NUL checker for BDAT chunks (no dot-stuffing; length-delimited).
class eol_checker {
 public:
  void reset() noexcept { *this = eol_checker{}; }
  void feed(const char* p, size_t n) noexcept;
  // Call at the end of the message: a trailing CR is a bare CR.
  void finish() noexcept {
    if (prev_cr_) bare_cr_ = true;
    prev_cr_ = false;
  }
  bool bad() const noexcept { return bare_cr_ || bare_lf_; }
  bool nul() const noexcept { return nul_; }

 private:
  bool prev_cr_ = false, bare_cr_ = false, bare_lf_ = false, nul_ = false;
};

}  // namespace tern::smtp
