// Ethernet framing for the DPDK path: byte-exact frames built by hand from RFC 791 / RFC 826
// and keepalived's GARP, round trips through ha::encode / ha::filter, one test per malformed
// case, and random input that must never make parse_frame read outside the frame (ASan).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "ha/frames.hh"
#include "ha/packet.hh"

namespace tern::ha {
namespace {

using bytes = std::vector<uint8_t>;

const mac_address our_mac = {0x02, 0x00, 0x00, 0x00, 0x00, 0x01};
const ip_address src = ip_address::v4(192, 168, 1, 1);
const ip_address group = vrrp_multicast_v4();
const ip_address vip = ip_address::v4(192, 168, 1, 100);

// The VRRP message of packet_test.cc's known_good: VRID 51, priority 100, 1 s, 192.168.1.100,
// checksum 0x0622 for 192.168.1.1 -> 224.0.0.18.
const bytes vrrp_msg = {0x31, 51, 100, 1, 0x00, 0x64, 0x06, 0x22, 192, 168, 1, 100};

// Written out by hand: Ethernet to 01:00:5e:00:00:12, IPv4 45 c0, total length 32, ID 0, DF,
// TTL 255, protocol 112; the header checksum 0xd8f1 was computed independently (Python,
// RFC 1071 over the 20 header bytes with a zero checksum field).
const bytes known_advert_frame = {
    0x01, 0x00, 0x5e, 0x00, 0x00, 0x12,  0x02, 0x00, 0x00, 0x00, 0x00, 0x01,  0x08, 0x00,
    0x45, 0xc0, 0x00, 0x20, 0x00, 0x00, 0x40, 0x00, 0xff, 0x70, 0xd8, 0xf1,
    192, 168, 1, 1,  224, 0, 0, 18,
    0x31, 51, 100, 1, 0x00, 0x64, 0x06, 0x22, 192, 168, 1, 100};

// keepalived's gratuitous ARP (vrrp_arp.c): broadcast, ARP request, sender = target IP,
// target MAC ff:ff:ff:ff:ff:ff.
const bytes known_garp_frame = {
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff,  0x02, 0x00, 0x00, 0x00, 0x00, 0x01,  0x08, 0x06,
    0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01,
    0x02, 0x00, 0x00, 0x00, 0x00, 0x01,  192, 168, 1, 100,
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff,  192, 168, 1, 100};

bytes build_advert(const bytes& vrrp = vrrp_msg) {
    bytes out(1600);
    size_t n = build_vrrp_frame(out, our_mac, src, group, vrrp);
    out.resize(n);
    return out;
}

// Recomputes the IPv4 header checksum of a frame without a VLAN tag after a test edits it.
void fix_ip_checksum(bytes& f, size_t ihl = ipv4_header_size) {
    f[ethernet_header_size + 10] = 0;
    f[ethernet_header_size + 11] = 0;
    uint16_t c =
        ipv4_header_checksum(std::span<const uint8_t>(f).subspan(ethernet_header_size, ihl));
    f[ethernet_header_size + 10] = uint8_t(c >> 8);
    f[ethernet_header_size + 11] = uint8_t(c);
}

TEST(ha_frames, advert_frame_is_byte_exact) {
    EXPECT_EQ(build_advert(), known_advert_frame);
}

TEST(ha_frames, garp_frame_is_byte_exact) {
    bytes out(64, 0xee);
    size_t n = build_garp_frame(out, our_mac, vip);
    ASSERT_EQ(n, garp_frame_size);
    out.resize(n);
    EXPECT_EQ(out, known_garp_frame);
}

TEST(ha_frames, multicast_mac_mapping) {
    EXPECT_EQ(multicast_mac_v4(group), (mac_address{0x01, 0x00, 0x5e, 0x00, 0x00, 0x12}));
    // The high bit of the second octet is dropped (only 23 bits map).
    EXPECT_EQ(multicast_mac_v4(ip_address::v4(239, 129, 2, 3)),
              (mac_address{0x01, 0x00, 0x5e, 0x01, 0x02, 0x03}));
    EXPECT_TRUE(is_multicast_v4(group));
    EXPECT_FALSE(is_multicast_v4(src));
}

TEST(ha_frames, unicast_advert_needs_an_explicit_mac) {
    const ip_address peer = ip_address::v4(198, 18, 0, 2);
    const mac_address peer_mac = {0x02, 0, 0, 0, 0, 0x02};
    bytes out(128);
    EXPECT_EQ(build_vrrp_frame(out, our_mac, src, peer, vrrp_msg), 0u);
    size_t n = build_vrrp_frame(out, our_mac, peer_mac, ip_address::v4(198, 18, 0, 1), peer,
                                vrrp_msg);
    ASSERT_EQ(n, ethernet_header_size + ipv4_header_size + vrrp_msg.size());
    EXPECT_EQ(bytes(out.begin(), out.begin() + 6), bytes(peer_mac.begin(), peer_mac.end()));
    // Header checksum for 198.18.0.1 -> 198.18.0.2, computed independently: 0xee85.
    EXPECT_EQ(out[24], 0xee);
    EXPECT_EQ(out[25], 0x85);
}

TEST(ha_frames, builders_refuse_short_buffers_and_ipv6) {
    bytes out(known_advert_frame.size() - 1);
    EXPECT_EQ(build_vrrp_frame(out, our_mac, src, group, vrrp_msg), 0u);
    bytes garp(garp_frame_size - 1);
    EXPECT_EQ(build_garp_frame(garp, our_mac, vip), 0u);
    bytes big(256);
    EXPECT_EQ(build_garp_frame(big, our_mac, vrrp_multicast_v6()), 0u);
    EXPECT_EQ(build_vrrp_frame(big, our_mac, our_mac, vrrp_multicast_v6(), vrrp_multicast_v6(),
                               vrrp_msg),
              0u);
    bytes huge_payload(70000);
    bytes huge_out(70100);
    EXPECT_EQ(build_vrrp_frame(huge_out, our_mac, src, group, huge_payload), 0u);
}

TEST(ha_frames, round_trip_through_encode_parse_and_filter) {
    advert a;
    a.vrid = 7;
    a.priority = 150;
    a.max_advert_interval_cs = 1;
    a.count = 3;
    a.addresses[0] = ip_address::v4(198, 18, 0, 10);
    a.addresses[1] = ip_address::v4(198, 18, 0, 11);
    a.addresses[2] = ip_address::v4(198, 18, 0, 12);
    std::array<uint8_t, 128> msg{};
    size_t m = encode(a, src, group, msg);
    ASSERT_GT(m, 0u);

    bytes frame(256);
    size_t n = build_vrrp_frame(frame, our_mac, src, group, std::span(msg.data(), m));
    ASSERT_GT(n, 0u);
    frame.resize(n);

    rx_packet p;
    ASSERT_EQ(parse_frame(frame, p), frame_kind::vrrp);
    EXPECT_EQ(p.src, src);
    EXPECT_EQ(p.dst, group);
    EXPECT_EQ(p.ttl, 255);
    ASSERT_EQ(p.payload.size(), m);
    EXPECT_EQ(p.payload.data(), frame.data() + ethernet_header_size + ipv4_header_size);

    const std::array<ip_address, 1> own = {ip_address::v4(198, 18, 0, 99)};
    const std::array<ip_address, 3> vips = {a.addresses[2], a.addresses[0], a.addresses[1]};
    local_view us{.vrid = 7, .own_addresses = own, .virtual_addresses = vips};
    advert got;
    ASSERT_EQ(filter(p.ttl, p.src, p.dst, p.payload, us, got), drop_reason::accept);
    EXPECT_EQ(got.priority, 150);
    EXPECT_EQ(got.count, 3);
}

TEST(ha_frames, vlan_tagged_advert_is_parsed) {
    bytes f = known_advert_frame;
    // Insert 81 00 <TCI 0x0064> after the MACs.
    f.insert(f.begin() + 12, {0x81, 0x00, 0x00, 0x64});
    rx_packet p;
    ASSERT_EQ(parse_frame(f, p), frame_kind::vrrp);
    EXPECT_EQ(bytes(p.payload.begin(), p.payload.end()), vrrp_msg);
    EXPECT_EQ(p.src, src);
}

TEST(ha_frames, ethernet_padding_after_the_ip_packet_is_ignored) {
    bytes f = known_advert_frame;
    f.resize(60, 0);  // padded to Ethernet's minimum frame
    rx_packet p;
    ASSERT_EQ(parse_frame(f, p), frame_kind::vrrp);
    EXPECT_EQ(bytes(p.payload.begin(), p.payload.end()), vrrp_msg);
}

TEST(ha_frames, ip_options_are_skipped) {
    bytes f = known_advert_frame;
    // IHL 6: one 4-byte option (NOP NOP NOP EOL), total length + 4.
    f.insert(f.begin() + ethernet_header_size + ipv4_header_size, {0x01, 0x01, 0x01, 0x00});
    f[ethernet_header_size] = 0x46;
    f[ethernet_header_size + 3] = 0x24;
    fix_ip_checksum(f, 24);
    rx_packet p;
    ASSERT_EQ(parse_frame(f, p), frame_kind::vrrp);
    EXPECT_EQ(bytes(p.payload.begin(), p.payload.end()), vrrp_msg);
}

TEST(ha_frames, ttl_is_reported_as_received) {
    bytes f = known_advert_frame;
    f[ethernet_header_size + 8] = 254;
    fix_ip_checksum(f);
    rx_packet p;
    ASSERT_EQ(parse_frame(f, p), frame_kind::vrrp);
    EXPECT_EQ(p.ttl, 254);  // ha::filter, not the parser, refuses it
}

TEST(ha_frames, garp_and_other_protocols_are_other) {
    rx_packet p;
    EXPECT_EQ(parse_frame(known_garp_frame, p), frame_kind::other);
    bytes udp = known_advert_frame;
    udp[ethernet_header_size + 9] = 17;
    fix_ip_checksum(udp);
    EXPECT_EQ(parse_frame(udp, p), frame_kind::other);
    bytes v6 = known_advert_frame;
    v6[12] = 0x86;
    v6[13] = 0xdd;
    EXPECT_EQ(parse_frame(v6, p), frame_kind::other);
    bytes qinq = known_advert_frame;
    qinq.insert(qinq.begin() + 12, {0x81, 0x00, 0x00, 0x01, 0x81, 0x00, 0x00, 0x02});
    EXPECT_EQ(parse_frame(qinq, p), frame_kind::other);
}

TEST(ha_frames, every_truncation_is_malformed) {
    rx_packet p;
    // Shorter than Ethernet, a cut VLAN tag, a cut IPv4 header, a cut payload: all refused.
    for (size_t n = 0; n < known_advert_frame.size(); ++n) {
        std::span<const uint8_t> cut(known_advert_frame.data(), n);
        EXPECT_EQ(parse_frame(cut, p), frame_kind::malformed) << "length " << n;
    }
    bytes tagged = known_advert_frame;
    tagged.insert(tagged.begin() + 12, {0x81, 0x00, 0x00, 0x64});
    for (size_t n = 0; n < tagged.size(); ++n) {
        std::span<const uint8_t> cut(tagged.data(), n);
        EXPECT_EQ(parse_frame(cut, p), frame_kind::malformed) << "tagged length " << n;
    }
}

TEST(ha_frames, bad_version_is_malformed) {
    bytes f = known_advert_frame;
    f[ethernet_header_size] = 0x65;
    fix_ip_checksum(f);
    rx_packet p;
    EXPECT_EQ(parse_frame(f, p), frame_kind::malformed);
}

TEST(ha_frames, ihl_below_five_is_malformed) {
    for (uint8_t ihl = 0; ihl < 5; ++ihl) {
        bytes f = known_advert_frame;
        f[ethernet_header_size] = uint8_t(0x40 | ihl);
        rx_packet p;
        EXPECT_EQ(parse_frame(f, p), frame_kind::malformed) << int(ihl);
    }
}

TEST(ha_frames, ihl_beyond_the_frame_is_malformed) {
    bytes f(known_advert_frame.begin(), known_advert_frame.begin() + ethernet_header_size + 24);
    f[ethernet_header_size] = 0x4f;  // claims 60 header bytes, 24 present
    rx_packet p;
    EXPECT_EQ(parse_frame(f, p), frame_kind::malformed);
}

TEST(ha_frames, total_length_beyond_the_frame_is_malformed) {
    bytes f = known_advert_frame;
    f[ethernet_header_size + 3] = 0x21;  // one byte more than present
    fix_ip_checksum(f);
    rx_packet p;
    EXPECT_EQ(parse_frame(f, p), frame_kind::malformed);
}

TEST(ha_frames, total_length_below_the_header_is_malformed) {
    bytes f = known_advert_frame;
    f[ethernet_header_size + 2] = 0;
    f[ethernet_header_size + 3] = 19;
    fix_ip_checksum(f);
    rx_packet p;
    EXPECT_EQ(parse_frame(f, p), frame_kind::malformed);
}

TEST(ha_frames, bad_header_checksum_is_malformed) {
    bytes f = known_advert_frame;
    f[ethernet_header_size + 11] ^= 0x01;
    rx_packet p;
    EXPECT_EQ(parse_frame(f, p), frame_kind::malformed);
    // Any single-bit flip in the header is caught, whichever field it lands in (version
    // and IHL flips may be caught earlier; either way the frame is refused).
    for (size_t bit = 0; bit < ipv4_header_size * 8; ++bit) {
        bytes g = known_advert_frame;
        g[ethernet_header_size + bit / 8] ^= uint8_t(1u << (bit % 8));
        EXPECT_NE(parse_frame(g, p), frame_kind::vrrp) << "bit " << bit;
    }
}

TEST(ha_frames, fragments_are_malformed) {
    rx_packet p;
    bytes mf = known_advert_frame;
    mf[ethernet_header_size + 6] = 0x20;  // MF, offset 0
    fix_ip_checksum(mf);
    EXPECT_EQ(parse_frame(mf, p), frame_kind::malformed);
    bytes off = known_advert_frame;
    off[ethernet_header_size + 6] = 0x00;
    off[ethernet_header_size + 7] = 0x03;  // offset 24 bytes
    fix_ip_checksum(off);
    EXPECT_EQ(parse_frame(off, p), frame_kind::malformed);
    // DF alone is fine, and so is no flag at all.
    bytes nodf = known_advert_frame;
    nodf[ethernet_header_size + 6] = 0x00;
    fix_ip_checksum(nodf);
    EXPECT_EQ(parse_frame(nodf, p), frame_kind::vrrp);
}

TEST(ha_frames, source_mac) {
    mac_address m{};
    EXPECT_TRUE(frame_source_mac(known_garp_frame, m));
    EXPECT_EQ(m, our_mac);
    EXPECT_FALSE(frame_source_mac(std::span<const uint8_t>(known_garp_frame.data(), 13), m));
}

// Random frames, each in its own exactly-sized heap buffer so that ASan catches any read past
// the end. Half start from a valid advert with random damage so that the deep paths run; a
// frame parsed as VRRP must have a payload inside the buffer.
TEST(ha_frames, random_input_never_reads_out_of_bounds) {
    std::mt19937 rng(20261204);
    std::uniform_int_distribution<int> byte(0, 255);
    size_t parsed = 0;
    for (int i = 0; i < 200000; ++i) {
        bytes f;
        if (i % 2 == 0) {
            f.resize(size_t(rng() % 80));
            for (auto& b : f) b = uint8_t(byte(rng));
            if (f.size() >= 14 && rng() % 2) {
                f[12] = 0x08;
                f[13] = 0x00;
            }
        } else {
            f = known_advert_frame;
            if (rng() % 3 == 0) f.insert(f.begin() + 12, {0x81, 0x00, 0x00, 0x01});
            int flips = 1 + int(rng() % 4);
            for (int k = 0; k < flips; ++k) f[rng() % f.size()] = uint8_t(byte(rng));
            f.resize(size_t(rng() % (f.size() + 1)));
            if (f.size() >= ethernet_header_size + ipv4_header_size && rng() % 2 &&
                f[12] == 0x08) {
                // Keep the checksum right half the time so the length checks are reached.
                size_t ihl = size_t(f[ethernet_header_size] & 0x0f) * 4;
                if (ihl >= ipv4_header_size && ethernet_header_size + ihl <= f.size())
                    fix_ip_checksum(f, ihl);
            }
        }
        std::unique_ptr<uint8_t[]> exact(new uint8_t[f.size() ? f.size() : 1]);
        std::copy(f.begin(), f.end(), exact.get());
        std::span<const uint8_t> in(exact.get(), f.size());
        rx_packet p;
        if (parse_frame(in, p) == frame_kind::vrrp) {
            ++parsed;
            ASSERT_GE(p.payload.data(), in.data());
            ASSERT_LE(p.payload.data() + p.payload.size(), in.data() + in.size());
        }
    }
    EXPECT_GT(parsed, 0u);  // the generator does reach the accepting path
}

}  // namespace
}  // namespace tern::ha
