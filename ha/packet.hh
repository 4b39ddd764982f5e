#pragma once
// VRRPv3 advertisement codec (RFC 5798 section 5, as updated by RFC 9568) and the receive-side
// filter (RFC 5798 section 7.1), as pure functions over byte spans. No I/O happens here: the
// backend (raw socket or DPDK) hands us the VRRP payload plus the few IP header fields we need.
//
// Trusts: nothing in the packet. Every field is bounds-checked and decoded big-endian
// explicitly; no packed struct is cast over the buffer. The count field is capped by
// max_advert_addresses before any address is read.
// Does not trust: the IP layer either; the caller passes the TTL/hop limit it saw and this
// module refuses anything but 255 (an advert that crossed a router is forged or misrouted).
// Does not do: IP header parsing, authentication (VRRPv3 has none), socket work.

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace tern::ha {

// IPv4 and IPv6 share one address type so that IPv6 (unsolicited neighbour advertisements,
// ff02::12) can be added without changing the state machine's interface.
enum class ip_family : uint8_t { ipv4 = 4, ipv6 = 6 };

struct ip_address {
    ip_family family = ip_family::ipv4;
    // IPv4 uses bytes_[0..3] and keeps the rest zero, so comparisons stay byte-wise.
    std::array<uint8_t, 16> bytes{};

    static ip_address v4(uint8_t a, uint8_t b, uint8_t c, uint8_t d);
    static ip_address v6(const std::array<uint8_t, 16>& b);
    size_t size() const { return family == ip_family::ipv4 ? 4 : 16; }
    friend bool operator==(const ip_address&, const ip_address&) = default;
};

// Ordering used by RFC 5798 6.4.3: the primary address compared as an unsigned big-endian
// number. Returns <0, 0, >0. Addresses of different families compare by family first.
int compare(const ip_address& a, const ip_address& b);

// VRRP protocol constants (RFC 5798 5.1, 5.2).
inline constexpr uint8_t vrrp_protocol = 112;      // IP protocol number
inline constexpr uint8_t vrrp_version = 3;
inline constexpr uint8_t vrrp_type_advertisement = 1;
inline constexpr uint8_t vrrp_required_ttl = 255;
inline constexpr size_t vrrp_header_size = 8;
inline constexpr uint16_t max_advert_interval_cs = 0x0fff;  // 12-bit field, 40.95 s
inline ip_address vrrp_multicast_v4() { return ip_address::v4(224, 0, 0, 18); }
ip_address vrrp_multicast_v6();  // ff02::12

// Limit: addresses carried in one advert. The wire allows 255; keepalived puts at most 20 in
// an advert, and 20 bounds the work an attacker can make us do per packet. Default 20.
inline constexpr size_t max_advert_addresses = 20;

struct advert {
    uint8_t vrid = 0;
    uint8_t priority = 0;
    uint16_t max_advert_interval_cs = 0;  // centiseconds, 12 bits on the wire
    ip_family family = ip_family::ipv4;
    uint8_t count = 0;
    std::array<ip_address, max_advert_addresses> addresses{};
};

// Bytes an advert occupies on the wire (VRRP header plus addresses, no IP header).
size_t encoded_size(const advert& a);

// Writes the advert into out, with the checksum computed over the pseudo-header made of src,
// dst (224.0.0.18 or a unicast peer), protocol 112 and the VRRP length. Returns the bytes
// written, or 0 when out is too small, count exceeds max_advert_addresses, the interval does
// not fit 12 bits, or an address's family differs from a.family.
size_t encode(const advert& a, const ip_address& src, const ip_address& dst,
              std::span<uint8_t> out);

// Every way a received advert is refused; accept means it may reach the state machine.
enum class drop_reason : uint8_t {
    accept = 0,
    short_packet,        // fewer bytes than the header, or than count addresses need
    bad_version,         // version nibble is not 3
    bad_type,            // type nibble is not 1 (ADVERTISEMENT)
    bad_length,          // bytes beyond the addresses: count and length disagree
    too_many_addresses,  // count above max_advert_addresses
    bad_checksum,
    bad_ttl,             // TTL / hop limit is not 255
    bad_interval,        // max advert interval 0: would make master-down 0
    wrong_vrid,
    address_mismatch,    // address list differs from ours (RFC 5798 7.1, keepalived drops)
    own_packet,          // source is one of our addresses (multicast loopback, reflection)
    count_,              // number of reasons, for per-reason counters
};
std::string_view to_string(drop_reason r);

// Decodes a VRRP payload (starting at the version nibble). src/dst are the IP header's
// addresses, needed for the checksum. Returns accept and fills out, or the first failure.
drop_reason decode(std::span<const uint8_t> payload, ip_family family, const ip_address& src,
                   const ip_address& dst, advert& out);

// What the receive filter needs to know about us.
struct local_view {
    uint8_t vrid = 0;
    std::span<const ip_address> own_addresses;      // our interface addresses
    std::span<const ip_address> virtual_addresses;  // configured VIPs for this VRID
};

// RFC 5798 7.1 receive checks in RFC order: TTL, then decode (version, type, length,
// checksum), then our own packet, VRID and address list. On accept, out holds the advert.
drop_reason filter(uint8_t ttl, const ip_address& src, const ip_address& dst,
                   std::span<const uint8_t> payload, const local_view& us, advert& out);

// RFC 1071 Internet checksum over the pseudo-header and the message; exposed for tests.
uint16_t vrrp_checksum(const ip_address& src, const ip_address& dst,
                       std::span<const uint8_t> message);

}  // namespace tern::ha
