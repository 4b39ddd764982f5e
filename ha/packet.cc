#include "ha/packet.hh"

namespace tern::ha {

ip_address ip_address::v4(uint8_t a, uint8_t b, uint8_t c, uint8_t d) {
    ip_address r;
    r.family = ip_family::ipv4;
    r.bytes[0] = a;
    r.bytes[1] = b;
    r.bytes[2] = c;
    r.bytes[3] = d;
    return r;
}

ip_address ip_address::v6(const std::array<uint8_t, 16>& b) {
    ip_address r;
    r.family = ip_family::ipv6;
    r.bytes = b;
    return r;
}

ip_address vrrp_multicast_v6() {
    std::array<uint8_t, 16> b{};
    b[0] = 0xff;
    b[1] = 0x02;
    b[15] = 0x12;
    return ip_address::v6(b);
}

int compare(const ip_address& a, const ip_address& b) {
    if (a.family != b.family) return a.family < b.family ? -1 : 1;
    for (size_t i = 0; i < a.size(); ++i) {
        if (a.bytes[i] != b.bytes[i]) return a.bytes[i] < b.bytes[i] ? -1 : 1;
    }
    return 0;
}

namespace {

// One's complement sum in 32 bits, folded at the end (RFC 1071). Odd trailing byte is padded
// with zero on the right, as the RFC requires.
uint32_t sum_bytes(uint32_t sum, std::span<const uint8_t> b) {
    size_t i = 0;
    for (; i + 1 < b.size(); i += 2) sum += (uint32_t(b[i]) << 8) | b[i + 1];
    if (i < b.size()) sum += uint32_t(b[i]) << 8;
    return sum;
}

uint16_t fold(uint32_t sum) {
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return uint16_t(~sum & 0xffff);
}

void put16(uint8_t* p, uint16_t v) {
    p[0] = uint8_t(v >> 8);
    p[1] = uint8_t(v);
}

uint16_t get16(const uint8_t* p) { return uint16_t((uint16_t(p[0]) << 8) | p[1]); }

size_t addr_size(ip_family f) { return f == ip_family::ipv4 ? 4 : 16; }

}  // namespace

uint16_t vrrp_checksum(const ip_address& src, const ip_address& dst,
                       std::span<const uint8_t> message) {
    uint32_t sum = 0;
    sum = sum_bytes(sum, std::span<const uint8_t>(src.bytes.data(), src.size()));
    sum = sum_bytes(sum, std::span<const uint8_t>(dst.bytes.data(), dst.size()));
    if (src.family == ip_family::ipv4) {
        // IPv4 pseudo-header: src, dst, zero, protocol, 16-bit length (RFC 5798 5.2.8).
        sum += vrrp_protocol;
        sum += uint32_t(message.size());
    } else {
        // IPv6 pseudo-header (RFC 8200 8.1): 32-bit length, 3 zero bytes, next header.
        uint32_t len = uint32_t(message.size());
        sum += len >> 16;
        sum += len & 0xffff;
        sum += vrrp_protocol;
    }
    // The message is summed as it is; the caller zeroes the checksum field when encoding,
    // and a correct received message sums to 0 including its checksum.
    sum = sum_bytes(sum, message);
    return fold(sum);
}

size_t encoded_size(const advert& a) {
    return vrrp_header_size + size_t(a.count) * addr_size(a.family);
}

size_t encode(const advert& a, const ip_address& src, const ip_address& dst,
              std::span<uint8_t> out) {
    if (a.count > max_advert_addresses) return 0;
    if (a.max_advert_interval_cs > max_advert_interval_cs) return 0;
    if (src.family != a.family || dst.family != a.family) return 0;
    for (size_t i = 0; i < a.count; ++i) {
        if (a.addresses[i].family != a.family) return 0;
    }
    size_t n = encoded_size(a);
    if (out.size() < n) return 0;
    uint8_t* p = out.data();
    p[0] = uint8_t((vrrp_version << 4) | vrrp_type_advertisement);
    p[1] = a.vrid;
    p[2] = a.priority;
    p[3] = a.count;
    put16(p + 4, a.max_advert_interval_cs & 0x0fff);  // top 4 bits reserved, sent as zero
    put16(p + 6, 0);
    size_t as = addr_size(a.family);
    for (size_t i = 0; i < a.count; ++i) {
        for (size_t j = 0; j < as; ++j) p[vrrp_header_size + i * as + j] = a.addresses[i].bytes[j];
    }
    put16(p + 6, vrrp_checksum(src, dst, std::span<const uint8_t>(p, n)));
    return n;
}

drop_reason decode(std::span<const uint8_t> payload, ip_family family, const ip_address& src,
                   const ip_address& dst, advert& out) {
    if (payload.size() < vrrp_header_size) return drop_reason::short_packet;
    const uint8_t* p = payload.data();
    if ((p[0] >> 4) != vrrp_version) return drop_reason::bad_version;
    if ((p[0] & 0x0f) != vrrp_type_advertisement) return drop_reason::bad_type;
    uint8_t count = p[3];
    if (count > max_advert_addresses) return drop_reason::too_many_addresses;
    size_t as = addr_size(family);
    size_t need = vrrp_header_size + size_t(count) * as;
    if (payload.size() < need) return drop_reason::short_packet;
    if (payload.size() > need) return drop_reason::bad_length;
    if (vrrp_checksum(src, dst, payload.first(need)) != 0) return drop_reason::bad_checksum;
    advert a;
    a.vrid = p[1];
    a.priority = p[2];
    a.count = count;
    a.family = family;
    // Reserved bits are ignored on receipt (RFC 5798 5.2.5).
    a.max_advert_interval_cs = get16(p + 4) & 0x0fff;
    for (size_t i = 0; i < count; ++i) {
        a.addresses[i].family = family;
        for (size_t j = 0; j < as; ++j) a.addresses[i].bytes[j] = p[vrrp_header_size + i * as + j];
    }
    out = a;
    return drop_reason::accept;
}

namespace {

bool contains(std::span<const ip_address> set, const ip_address& x) {
    for (const auto& a : set) {
        if (a == x) return true;
    }
    return false;
}

}  // namespace

drop_reason filter(uint8_t ttl, const ip_address& src, const ip_address& dst,
                   std::span<const uint8_t> payload, const local_view& us, advert& out) {
    if (ttl != vrrp_required_ttl) return drop_reason::bad_ttl;
    advert a;
    drop_reason r = decode(payload, src.family, src, dst, a);
    if (r != drop_reason::accept) return r;
    if (contains(us.own_addresses, src)) return drop_reason::own_packet;
    if (a.vrid != us.vrid) return drop_reason::wrong_vrid;
    if (a.max_advert_interval_cs == 0) return drop_reason::bad_interval;
    // Same set, order-insensitive: keepalived and tern may list the VIPs in different orders.
    // The sets are at most max_advert_addresses long, so the quadratic check is bounded.
    if (a.count != us.virtual_addresses.size()) return drop_reason::address_mismatch;
    for (size_t i = 0; i < a.count; ++i) {
        if (!contains(us.virtual_addresses, a.addresses[i])) return drop_reason::address_mismatch;
    }
    out = a;
    return drop_reason::accept;
}

std::string_view to_string(drop_reason r) {
    switch (r) {
    case drop_reason::accept: return "accept";
    case drop_reason::short_packet: return "short packet";
    case drop_reason::bad_version: return "bad version";
    case drop_reason::bad_type: return "bad type";
    case drop_reason::bad_length: return "count and length disagree";
    case drop_reason::too_many_addresses: return "too many addresses";
    case drop_reason::bad_checksum: return "bad checksum";
    case drop_reason::bad_ttl: return "TTL not 255";
    case drop_reason::bad_interval: return "zero advert interval";
    case drop_reason::wrong_vrid: return "wrong VRID";
    case drop_reason::address_mismatch: return "address list mismatch";
    case drop_reason::own_packet: return "own packet";
    case drop_reason::count_: break;
    }
    return "unknown";
}

}  // namespace tern::ha
