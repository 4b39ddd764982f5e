#pragma once
// Logging: one line per event to stderr, postfix-style ("ternd[pid]: <id>: client=...").
// Shard threads buffer their lines and flush once per loop iteration (one write(2) for
// many lines); other threads write through at once. Untrusted text goes through
// sanitize() before it reaches a log line.
#include <fmt/format.h>

#include <string>
#include <string_view>

namespace tern::log {

enum class level : uint8_t { debug = 0, info = 1, warning = 2, error = 3 };

void set_level(level l) noexcept;
bool enabled(level l) noexcept;
// Start buffering this thread's lines (shard threads); flush() writes them out.
void buffer_this_thread(bool on) noexcept;
void flush() noexcept;
void write_line(level l, std::string_view line) noexcept;

// Replace control characters and non-ASCII with '?', cap the length.
std::string sanitize(std::string_view s, size_t max = 256);

// The same as a format argument, without a temporary string: fmt::format("{}", safe(x)).
struct safe {
  std::string_view s;
  size_t max = 256;
};

namespace detail {
// Lines are formatted straight into the thread's buffer (no temporary string), so a
// steady-state log line does not allocate once the buffer has grown.
std::string& begin_line(level l) noexcept;
void end_line() noexcept;

template <typename... Args>
void emit(level l, fmt::format_string<Args...> f, Args&&... args) {
  std::string& b = begin_line(l);
  try {
    fmt::format_to(std::back_inserter(b), f, std::forward<Args>(args)...);
  } catch (...) {
  }
  end_line();
}
}  // namespace detail

template <typename... Args>
void info(fmt::format_string<Args...> f, Args&&... args) {
  if (enabled(level::info)) detail::emit(level::info, f, std::forward<Args>(args)...);
}
template <typename... Args>
void warn(fmt::format_string<Args...> f, Args&&... args) {
  if (enabled(level::warning)) detail::emit(level::warning, f, std::forward<Args>(args)...);
}
template <typename... Args>
void error(fmt::format_string<Args...> f, Args&&... args) {
  detail::emit(level::error, f, std::forward<Args>(args)...);
}
template <typename... Args>
void debug(fmt::format_string<Args...> f, Args&&... args) {
  if (enabled(level::debug)) detail::emit(level::debug, f, std::forward<Args>(args)...);
}

}  // namespace tern::log

template <>
struct fmt::formatter<tern::log::safe> : fmt::formatter<std::string_view> {
  template <typename Ctx>
  auto format(const tern::log::safe& v, Ctx& ctx) const {
    auto out = ctx.out();
    size_t n = v.s.size() < v.max ? v.s.size() : v.max;
    for (size_t i = 0; i < n; ++i) {
      auto c = static_cast<unsigned char>(v.s[i]);
      *out++ = c >= 0x20 && c < 0x7F ? static_cast<char>(c) : '?';
    }
    if (v.s.size() > v.max) out = fmt::format_to(out, "...");
    return out;
  }
};
