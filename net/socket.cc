#include "net/socket.hh"

#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace tern::net {

int open_listener(const address& a, int backlog, std::string& err, bool freebind) {
  int fd = ::socket(a.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    err = "socket: " + std::string(strerror(errno));
    return -1;
  }
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // inherited by accepted sockets
  if (a.family() == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
  if (freebind && setsockopt(fd, a.family() == AF_INET6 ? IPPROTO_IPV6 : IPPROTO_IP,
                             a.family() == AF_INET6 ? IPV6_FREEBIND : IP_FREEBIND, &one, sizeof one) != 0) {
    err = "setsockopt IP_FREEBIND " + a.to_string() + ": " + strerror(errno);
    ::close(fd);
    return -1;
  }
  if (::bind(fd, reinterpret_cast<const sockaddr*>(&a.ss), a.len) != 0) {
    err = "bind " + a.to_string() + ": " + strerror(errno);
    ::close(fd);
    return -1;
  }
  if (::listen(fd, backlog) != 0) {
    err = "listen " + a.to_string() + ": " + strerror(errno);
    ::close(fd);
    return -1;
  }
  return fd;
}

address local_address(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return {};
  return address::from_sockaddr(reinterpret_cast<sockaddr*>(&ss), len);
}

}  // namespace tern::net
