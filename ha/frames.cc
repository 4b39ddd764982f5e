#include "ha/frames.hh"

#include <cstring>

namespace tern::ha {

namespace {

void put16(uint8_t* p, uint16_t v) {
    p[0] = uint8_t(v >> 8);
    p[1] = uint8_t(v);
}

uint16_t get16(const uint8_t* p) { return uint16_t((uint16_t(p[0]) << 8) | p[1]); }

// Ethernet header; returns the bytes written (always ethernet_header_size).
size_t put_ethernet(uint8_t* p, const mac_address& dst, const mac_address& src,
                    uint16_t ethertype) {
    std::memcpy(p, dst.data(), 6);
    std::memcpy(p + 6, src.data(), 6);
    put16(p + 12, ethertype);
    return ethernet_header_size;
}

constexpr uint16_t ipv4_flag_df = 0x4000;
constexpr uint16_t ipv4_flag_mf = 0x2000;
constexpr uint16_t ipv4_offset_mask = 0x1fff;

}  // namespace

uint16_t ipv4_header_checksum(std::span<const uint8_t> header) {
    uint32_t sum = 0;
    size_t i = 0;
    for (; i + 1 < header.size(); i += 2) sum += (uint32_t(header[i]) << 8) | header[i + 1];
    if (i < header.size()) sum += uint32_t(header[i]) << 8;
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return uint16_t(~sum & 0xffff);
}

bool is_multicast_v4(const ip_address& a) {
    return a.family == ip_family::ipv4 && (a.bytes[0] & 0xf0) == 0xe0;
}

mac_address multicast_mac_v4(const ip_address& group) {
    return {0x01, 0x00, 0x5e, uint8_t(group.bytes[1] & 0x7f), group.bytes[2], group.bytes[3]};
}

size_t build_vrrp_frame(std::span<uint8_t> out, const mac_address& src_mac,
                        const mac_address& dst_mac, const ip_address& src,
                        const ip_address& dst, std::span<const uint8_t> vrrp) {
    if (src.family != ip_family::ipv4 || dst.family != ip_family::ipv4) return 0;
    size_t ip_len = ipv4_header_size + vrrp.size();
    if (ip_len > 0xffff) return 0;
    size_t frame_len = ethernet_header_size + ip_len;
    if (out.size() < frame_len) return 0;

    uint8_t* p = out.data();
    p += put_ethernet(p, dst_mac, src_mac, ethertype_ipv4);
    uint8_t* ip = p;
    ip[0] = 0x45;  // version 4, IHL 5
    ip[1] = vrrp_ipv4_tos;
    put16(ip + 2, uint16_t(ip_len));
    // ID 0 with DF: an atomic datagram may carry any ID (RFC 6864 4.1).
    put16(ip + 4, 0);
    put16(ip + 6, ipv4_flag_df);
    ip[8] = vrrp_required_ttl;
    ip[9] = vrrp_protocol;
    put16(ip + 10, 0);
    std::memcpy(ip + 12, src.bytes.data(), 4);
    std::memcpy(ip + 16, dst.bytes.data(), 4);
    put16(ip + 10, ipv4_header_checksum(std::span<const uint8_t>(ip, ipv4_header_size)));
    if (!vrrp.empty()) std::memcpy(ip + ipv4_header_size, vrrp.data(), vrrp.size());
    return frame_len;
}

size_t build_vrrp_frame(std::span<uint8_t> out, const mac_address& src_mac,
                        const ip_address& src, const ip_address& dst,
                        std::span<const uint8_t> vrrp) {
    if (!is_multicast_v4(dst)) return 0;
    return build_vrrp_frame(out, src_mac, multicast_mac_v4(dst), src, dst, vrrp);
}

size_t build_garp_frame(std::span<uint8_t> out, const mac_address& src_mac,
                        const ip_address& addr) {
    if (addr.family != ip_family::ipv4 || out.size() < garp_frame_size) return 0;
    uint8_t* p = out.data();
    p += put_ethernet(p, broadcast_mac, src_mac, ethertype_arp);
    put16(p, 1);               // hardware type: Ethernet
    put16(p + 2, ethertype_ipv4);
    p[4] = 6;                  // hardware address length
    p[5] = 4;                  // protocol address length
    put16(p + 6, 1);           // opcode: request
    std::memcpy(p + 8, src_mac.data(), 6);
    std::memcpy(p + 14, addr.bytes.data(), 4);
    std::memcpy(p + 18, garp_target_mac.data(), 6);
    std::memcpy(p + 24, addr.bytes.data(), 4);
    return garp_frame_size;
}

bool frame_source_mac(std::span<const uint8_t> frame, mac_address& out) {
    if (frame.size() < ethernet_header_size) return false;
    std::memcpy(out.data(), frame.data() + 6, 6);
    return true;
}

frame_kind parse_frame(std::span<const uint8_t> frame, rx_packet& out) {
    if (frame.size() < ethernet_header_size) return frame_kind::malformed;
    size_t off = 12;
    uint16_t ethertype = get16(frame.data() + off);
    off += 2;
    if (ethertype == ethertype_vlan) {
        if (frame.size() < off + vlan_tag_size) return frame_kind::malformed;
        ethertype = get16(frame.data() + off + 2);  // after the 2-byte TCI
        off += vlan_tag_size;
        // A second tag (QinQ) is not something a VRRP segment of ours carries.
        if (ethertype == ethertype_vlan) return frame_kind::other;
    }
    if (ethertype != ethertype_ipv4) return frame_kind::other;

    std::span<const uint8_t> ip = frame.subspan(off);
    if (ip.size() < ipv4_header_size) return frame_kind::malformed;
    if ((ip[0] >> 4) != 4) return frame_kind::malformed;
    size_t ihl = size_t(ip[0] & 0x0f) * 4;
    if (ihl < ipv4_header_size || ihl > ip.size()) return frame_kind::malformed;
    size_t total = get16(ip.data() + 2);
    if (total < ihl || total > ip.size()) return frame_kind::malformed;
    if (ipv4_header_checksum(ip.first(ihl)) != 0) return frame_kind::malformed;
    if (ip[9] != vrrp_protocol) return frame_kind::other;
    uint16_t frag = get16(ip.data() + 6);
    // More-fragments or a non-zero offset: a piece of a packet no VRRP speaker sends.
    if ((frag & ipv4_flag_mf) != 0 || (frag & ipv4_offset_mask) != 0)
        return frame_kind::malformed;

    out.ttl = ip[8];
    out.src = ip_address::v4(ip[12], ip[13], ip[14], ip[15]);
    out.dst = ip_address::v4(ip[16], ip[17], ip[18], ip[19]);
    out.payload = ip.subspan(ihl, total - ihl);
    return frame_kind::vrrp;
}

}  // namespace tern::ha
