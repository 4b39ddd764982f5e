#include "src/smtp/data.hh"

namespace tern::smtp {

void dot_decoder::emit(std::string& out, const char* p, size_t n) {
  if (size_ + n <= max_) {
    out.append(p, n);
  } else if (size_ < max_) {
    out.append(p, static_cast<size_t>(max_ - size_));
  }
  size_ += n;
}

size_t dot_decoder::feed(const char* p, size_t n, std::string& out) {
  size_t i = 0;
  while (i < n && st_ != st::done) {
    char c = p[i];
    switch (st_) {
      case st::line_start:
        if (c == '.') {
          st_ = st::dot;
          ++i;
          continue;
        }
        st_ = st::mid;
        continue;  // reprocess as mid
      case st::mid: {
        // Fast path: a run of ordinary bytes.
        size_t j = i;
        while (j < n && p[j] != '\r' && p[j] != '\n' && p[j] != '\0') ++j;
        if (j > i) {
          emit(out, p + i, j - i);
          i = j;
          continue;
        }
        if (c == '\r') {
          st_ = st::cr;
        } else if (c == '\n') {
          bare_lf_ = true;  // not a line end: "\n." cannot end the message
          emit(out, "\n", 1);
        } else {
          nul_ = true;
          emit(out, "\0", 1);
        }
        ++i;
        continue;
      }
      case st::cr:
        if (c == '\n') {
          emit(out, "\r\n", 2);
          st_ = st::line_start;
          ++i;
          continue;
        }
        bare_cr_ = true;
        emit(out, "\r", 1);
        st_ = st::mid;
        continue;  // reprocess c
      case st::dot:
        if (c == '\r') {
          st_ = st::dot_cr;
          ++i;
          continue;
        }
        // Dot-unstuffing: the leading dot goes, the rest of the line stays.
        st_ = st::mid;
        if (c == '.') {
          emit(out, ".", 1);
          ++i;
        }
        continue;
      case st::dot_cr:
        if (c == '\n') {
          st_ = st::done;
          ++i;
          continue;
        }
        bare_cr_ = true;  // ".\r" followed by something else
        emit(out, "\r", 1);
        st_ = st::mid;
        continue;
      case st::done:
        break;
    }
  }
  return i;
}

void eol_checker::feed(const char* p, size_t n) noexcept {
  for (size_t i = 0; i < n; ++i) {
    char c = p[i];
    if (prev_cr_ && c != '\n') bare_cr_ = true;
    if (c == '\n' && !prev_cr_) bare_lf_ = true;
    if (c == '\0') nul_ = true;
    prev_cr_ = c == '\r';
  }
}

}  // namespace tern::smtp
