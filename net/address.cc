#include "net/address.hh"

#include <arpa/inet.h>

#include <charconv>
#include <cstring>

namespace tern::net {

uint16_t address::port() const noexcept {
  if (ss.ss_family == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in&>(ss).sin_port);
  if (ss.ss_family == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6&>(ss).sin6_port);
  return 0;
}

std::string address::ip() const {
  char buf[INET6_ADDRSTRLEN] = "unknown";
  if (ss.ss_family == AF_INET)
    inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in&>(ss).sin_addr, buf, sizeof buf);
  else if (ss.ss_family == AF_INET6)
    inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6&>(ss).sin6_addr, buf, sizeof buf);
  return buf;
}

std::string address::to_string() const {
  if (ss.ss_family == AF_INET6) return "[" + ip() + "]:" + std::to_string(port());
  return ip() + ":" + std::to_string(port());
}

address address::from_sockaddr(const sockaddr* sa, socklen_t len) noexcept {
  address a;
  if (sa->sa_family == AF_INET6 && len >= sizeof(sockaddr_in6)) {
    auto* s6 = reinterpret_cast<const sockaddr_in6*>(sa);
    if (IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr)) {
      sockaddr_in s4{};
      s4.sin_family = AF_INET;
      s4.sin_port = s6->sin6_port;
      std::memcpy(&s4.sin_addr, s6->sin6_addr.s6_addr + 12, 4);
      std::memcpy(&a.ss, &s4, sizeof s4);
      a.len = sizeof s4;
      return a;
    }
    std::memcpy(&a.ss, sa, sizeof(sockaddr_in6));
    a.len = sizeof(sockaddr_in6);
  } else if (sa->sa_family == AF_INET && len >= sizeof(sockaddr_in)) {
    std::memcpy(&a.ss, sa, sizeof(sockaddr_in));
    a.len = sizeof(sockaddr_in);
  }
  return a;
}

std::optional<address> address::from_ip(std::string_view ip, uint16_t port) {
  char buf[INET6_ADDRSTRLEN + 1];
  if (ip.empty() || ip.size() >= sizeof buf) return std::nullopt;
  std::memcpy(buf, ip.data(), ip.size());
  buf[ip.size()] = 0;
  address a;
  sockaddr_in s4{};
  sockaddr_in6 s6{};
  if (inet_pton(AF_INET, buf, &s4.sin_addr) == 1) {
    s4.sin_family = AF_INET;
    s4.sin_port = htons(port);
    std::memcpy(&a.ss, &s4, sizeof s4);
    a.len = sizeof s4;
    return a;
  }
  if (inet_pton(AF_INET6, buf, &s6.sin6_addr) == 1) {
    s6.sin6_family = AF_INET6;
    s6.sin6_port = htons(port);
    return from_sockaddr(reinterpret_cast<sockaddr*>(&s6), sizeof s6);
  }
  return std::nullopt;
}

std::optional<address> address::parse(std::string_view s) {
  std::string_view host, port;
  if (!s.empty() && s.front() == '[') {
    auto close = s.find(']');
    if (close == s.npos || close + 1 >= s.size() || s[close + 1] != ':') return std::nullopt;
    host = s.substr(1, close - 1);
    port = s.substr(close + 2);
  } else {
    auto colon = s.rfind(':');
    if (colon == s.npos || s.find(':') != colon) return std::nullopt;
    host = s.substr(0, colon);
    port = s.substr(colon + 1);
  }
  unsigned p = 0;
  auto [ptr, ec] = std::from_chars(port.data(), port.data() + port.size(), p);
  if (port.empty() || ec != std::errc() || ptr != port.data() + port.size() || p > 65535)
    return std::nullopt;
  return from_ip(host, static_cast<uint16_t>(p));
}

std::optional<cidr> cidr::parse(std::string_view s) {
  auto slash = s.find('/');
  auto ip = s.substr(0, slash);
  auto a = address::from_ip(ip, 0);
  if (!a) return std::nullopt;
  cidr c;
  c.family = a->family();
  unsigned maxp = c.family == AF_INET ? 32 : 128;
  if (c.family == AF_INET)
    std::memcpy(c.bytes.data(), &reinterpret_cast<const sockaddr_in&>(a->ss).sin_addr, 4);
  else
    std::memcpy(c.bytes.data(), &reinterpret_cast<const sockaddr_in6&>(a->ss).sin6_addr, 16);
  unsigned p = maxp;
  if (slash != s.npos) {
    auto ps = s.substr(slash + 1);
    auto [ptr, ec] = std::from_chars(ps.data(), ps.data() + ps.size(), p);
    if (ps.empty() || ec != std::errc() || ptr != ps.data() + ps.size() || p > maxp)
      return std::nullopt;
  }
  c.prefix = static_cast<uint8_t>(p);
  // Host bits must be zero: "10.1.2.3/8" is almost always a typo for something else.
  for (unsigned bit = p; bit < maxp; ++bit)
    if (c.bytes[bit / 8] & (0x80 >> (bit % 8))) return std::nullopt;
  return c;
}

bool cidr::contains(const address& a) const noexcept {
  if (a.family() != family) return false;
  const uint8_t* b = family == AF_INET
                         ? reinterpret_cast<const uint8_t*>(&reinterpret_cast<const sockaddr_in&>(a.ss).sin_addr)
                         : reinterpret_cast<const uint8_t*>(&reinterpret_cast<const sockaddr_in6&>(a.ss).sin6_addr);
  unsigned full = prefix / 8;
  if (std::memcmp(b, bytes.data(), full) != 0) return false;
  unsigned rem = prefix % 8;
  if (rem == 0) return true;
  uint8_t mask = static_cast<uint8_t>(0xFF00 >> rem);
  return (b[full] & mask) == (bytes[full] & mask);
}

std::string cidr::to_string() const {
  char buf[INET6_ADDRSTRLEN];
  inet_ntop(family, bytes.data(), buf, sizeof buf);
  return std::string(buf) + "/" + std::to_string(prefix);
}

}  // namespace tern::net
