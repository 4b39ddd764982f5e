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

template <typename... Args>
void info(fmt::format_string<Args...> f, Args&&... args) {
  if (enabled(level::info)) write_line(level::info, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void warn(fmt::format_string<Args...> f, Args&&... args) {
  if (enabled(level::warning))
    write_line(level::warning, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void error(fmt::format_string<Args...> f, Args&&... args) {
  write_line(level::error, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void debug(fmt::format_string<Args...> f, Args&&... args) {
  if (enabled(level::debug)) write_line(level::debug, fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace tern::log
