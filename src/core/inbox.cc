#include "src/core/inbox.hh"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <system_error>

namespace tern::core::detail {

int make_eventfd() {
  int fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0) throw std::system_error(errno, std::generic_category(), "inbox: eventfd");
  return fd;
}

void signal_eventfd(int fd) noexcept {
  uint64_t one = 1;
  // EAGAIN: the counter is at its maximum, so the fd is readable already. Nothing else
  // can fail on a valid eventfd with an 8-byte buffer.
  while (::write(fd, &one, sizeof one) < 0 && errno == EINTR) {
  }
}

uint64_t read_eventfd(int fd) noexcept {
  uint64_t v = 0;
  ssize_t r;
  while ((r = ::read(fd, &v, sizeof v)) < 0 && errno == EINTR) {
  }
  return r == sizeof v ? v : 0;
}

void close_fd(int fd) noexcept {
  if (fd >= 0) ::close(fd);
}

}  // namespace tern::core::detail
