#pragma once
// Socket addresses and CIDR networks. Pure functions; no name resolution (no DNS).
#include <netinet/in.h>
#include <sys/socket.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace tern::net {

// A socket address, IPv4 or IPv6. IPv4-mapped IPv6 addresses are normalised to IPv4.
struct address {
  sockaddr_storage ss{};
  socklen_t len = 0;

  int family() const noexcept { return ss.ss_family; }
  uint16_t port() const noexcept;
  bool empty() const noexcept { return len == 0; }
  std::string ip() const;         // "192.0.2.1" or "2001:db8::1"
  std::string to_string() const;  // "192.0.2.1:25" or "[2001:db8::1]:25"

  static address from_sockaddr(const sockaddr* sa, socklen_t len) noexcept;
  // Parse "ip:port", "[ipv6]:port". No names.
  static std::optional<address> parse(std::string_view host_port);
  // Parse a bare IP and a port.
  static std::optional<address> from_ip(std::string_view ip, uint16_t port);
};

// A network in CIDR notation: "10.0.0.0/8", "2001:db8::/32", or a bare address (/32, /128).
struct cidr {
  int family = 0;
  std::array<uint8_t, 16> bytes{};
  uint8_t prefix = 0;

  static std::optional<cidr> parse(std::string_view s);
  bool contains(const address& a) const noexcept;
  std::string to_string() const;
};

bool any_contains(const auto& nets, const address& a) noexcept {
  for (const auto& n : nets)
    if (n.contains(a)) return true;
  return false;
}

}  // namespace tern::net
