#pragma once
// Ethernet framing for the VRRP backends that see whole frames (DPDK; a test's raw packet
// socket): builds the two frames VRRP sends (an advert in IPv4, a gratuitous ARP) and parses
// a received frame down to the VRRP payload. Pure functions over byte spans, no I/O, no DPDK.
//
// Trusts: nothing in a received frame. Every read is bounds-checked against the span; fields
// are decoded big-endian byte by byte; no struct is cast over the buffer. The IPv4 header is
// validated (version, IHL, total length within the frame, header checksum) before anything
// in it is used, and fragments are refused: a VRRP advert is far smaller than any MTU.
// Does not trust: the VRRP payload either. parse_frame hands it up untouched and ha::filter
// checks it (TTL, checksum, VRID, addresses).
// Does not do: IPv6 (adverts to ff02::12, neighbour advertisements), more than one VLAN tag,
// neighbour resolution (a unicast advert needs its next hop's MAC from the caller).

#include <cstddef>
#include <cstdint>
#include <span>

#include "ha/io.hh"
#include "ha/packet.hh"

namespace tern::ha {

inline constexpr size_t ethernet_header_size = 14;
inline constexpr size_t vlan_tag_size = 4;
inline constexpr size_t ipv4_header_size = 20;   // without options; we send none
inline constexpr size_t arp_ipv4_size = 28;      // Ethernet/IPv4 ARP body
inline constexpr size_t garp_frame_size = ethernet_header_size + arp_ipv4_size;  // 42
inline constexpr uint16_t ethertype_ipv4 = 0x0800;
inline constexpr uint16_t ethertype_arp = 0x0806;
inline constexpr uint16_t ethertype_vlan = 0x8100;
// IPv4 TOS of our adverts: DSCP CS6 (network control), as keepalived sends them.
inline constexpr uint8_t vrrp_ipv4_tos = 0xc0;

inline constexpr mac_address broadcast_mac = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
// Target hardware address of our gratuitous ARPs. keepalived (vrrp_arp.c,
// send_gratuitous_arp_immediate) fills it with ff:ff:ff:ff:ff:ff; RFC 5227's announcement
// and the Linux kernel use zeros. Receivers ignore it in a request whose sender and target
// IP are equal; we match keepalived so that captures compare with the daemon we replace.
inline constexpr mac_address garp_target_mac = broadcast_mac;

// The Ethernet group for an IPv4 multicast address (RFC 1112 6.4: 01:00:5e + low 23 bits);
// 224.0.0.18 maps to 01:00:5e:00:00:12. Meaningless for a non-multicast address.
mac_address multicast_mac_v4(const ip_address& group);
bool is_multicast_v4(const ip_address& a);

// Writes Ethernet + IPv4 (no options, TOS CS6, ID 0, DF, TTL 255, protocol 112, header
// checksum) + the VRRP message into out and returns the frame's length, or 0 when out is
// too small, src or dst is not IPv4, or the packet would exceed 65535 bytes. The frame is
// not padded to Ethernet's 60-byte minimum: NICs pad short frames themselves, and
// keepalived's adverts leave the kernel the same way. The VRRP checksum is the caller's
// (ha::encode computes it for src -> dst).
size_t build_vrrp_frame(std::span<uint8_t> out, const mac_address& src_mac,
                        const mac_address& dst_mac, const ip_address& src,
                        const ip_address& dst, std::span<const uint8_t> vrrp);

// The same to a multicast group (224.0.0.18), the destination MAC derived from dst.
// Returns 0 for a unicast dst: its MAC must come from the caller (overload above), since
// nothing on this path resolves neighbours.
size_t build_vrrp_frame(std::span<uint8_t> out, const mac_address& src_mac,
                        const ip_address& src, const ip_address& dst,
                        std::span<const uint8_t> vrrp);

// Writes a gratuitous ARP for addr (keepalived's format): to ff:ff:ff:ff:ff:ff from src_mac,
// an ARP request (Ethernet, IPv4, opcode 1) with sender MAC src_mac, sender IP = target IP
// = addr, target MAC garp_target_mac. Returns garp_frame_size, or 0 when out is too small
// or addr is not IPv4.
size_t build_garp_frame(std::span<uint8_t> out, const mac_address& src_mac,
                        const ip_address& addr);

enum class frame_kind : uint8_t {
    vrrp,       // IPv4 protocol 112 with a valid header: out is filled
    other,      // well-formed but not ours: ARP, IPv6, another IP protocol, two VLAN tags
    malformed,  // truncated, bad IPv4 version/IHL/length/checksum, or a VRRP fragment
};

// Parses one received frame: Ethernet with at most one 802.1Q tag, then IPv4. On vrrp, out
// holds the header's src, dst and TTL and a payload span into frame (from the first byte
// after the IPv4 header and options to the IPv4 total length; Ethernet padding after it
// is ignored). out is left unspecified otherwise.
frame_kind parse_frame(std::span<const uint8_t> frame, rx_packet& out);

// The frame's source MAC, or false when it is shorter than an Ethernet header.
bool frame_source_mac(std::span<const uint8_t> frame, mac_address& out);

// RFC 1071 checksum of an IPv4 header (with its checksum field as it is): 0 when the stored
// checksum is right. Exposed for tests and for the raw-socket side of the test lab.
uint16_t ipv4_header_checksum(std::span<const uint8_t> header);

}  // namespace tern::ha
