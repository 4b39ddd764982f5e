#include "src/core/log.hh"

#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstring>

namespace tern::log {
namespace {
std::atomic<int> min_level{static_cast<int>(level::info)};
thread_local bool buffered = false;
thread_local std::string buf;
const int pid = getpid();

void write_all(const char* p, size_t n) noexcept {
  while (n > 0) {
    ssize_t w = ::write(2, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return;
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}
}  // namespace

void set_level(level l) noexcept { min_level.store(static_cast<int>(l)); }
bool enabled(level l) noexcept { return static_cast<int>(l) >= min_level.load(std::memory_order_relaxed); }
void buffer_this_thread(bool on) noexcept {
  buffered = on;
  if (!on) flush();
}

void flush() noexcept {
  if (!buf.empty()) {
    write_all(buf.data(), buf.size());
    buf.clear();
  }
}

namespace detail {
std::string& begin_line(level l) noexcept {
  struct timeval tv;
  gettimeofday(&tv, nullptr);
  struct tm tm;
  gmtime_r(&tv.tv_sec, &tm);
  static const char* names[] = {"debug: ", "", "warning: ", "error: "};
  char head[96];
  size_t h = strftime(head, sizeof head, "%Y-%m-%dT%H:%M:%S", &tm);
  h += static_cast<size_t>(snprintf(head + h, sizeof head - h, ".%03dZ ternd[%d]: %s",
                                    static_cast<int>(tv.tv_usec / 1000), pid, names[static_cast<int>(l)]));
  try {
    buf.append(head, h);
  } catch (...) {
  }
  return buf;
}

void end_line() noexcept {
  try {
    buf.push_back('\n');
  } catch (...) {
  }
  if (!buffered || buf.size() > 64 * 1024) flush();
}
}  // namespace detail

void write_line(level l, std::string_view line) noexcept {
  std::string& b = detail::begin_line(l);
  try {
    b.append(line);
  } catch (...) {
  }
  detail::end_line();
}

std::string sanitize(std::string_view s, size_t max) {
  std::string out;
  size_t n = s.size() < max ? s.size() : max;
  out.reserve(n + 3);
  for (size_t i = 0; i < n; ++i) {
    auto c = static_cast<unsigned char>(s[i]);
    out.push_back(c >= 0x20 && c < 0x7F ? static_cast<char>(c) : '?');
  }
  if (s.size() > max) out.append("...");
  return out;
}

}  // namespace tern::log
