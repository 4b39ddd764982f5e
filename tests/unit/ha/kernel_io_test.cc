// The kernel VRRP backend: the IPv4 header check as a pure function, then adverts and
// gratuitous ARPs between two network namespaces joined by a veth pair (see netns.hh).
// Waits for packets are bounded loops of poll(); nothing asserts on elapsed time except the
// wake test, which only checks that a 60 s poll did not run its course.
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "ha/kernel_io.hh"
#include "ha/netlink.hh"
#include "tests/unit/ha/netns.hh"

namespace tern::ha {
namespace {

using testing::run_in_netns;
using testing::sh;
using testing::sh_out;
using testing::two_hosts;

const ip_address addr_a = ip_address::v4(198, 18, 0, 1);
const ip_address addr_b = ip_address::v4(198, 18, 0, 2);
const ip_address vip = ip_address::v4(198, 18, 0, 100);
const mac_address mac_a = {0x02, 0x00, 0x00, 0x00, 0x00, 0x0a};
const mac_address mac_b = {0x02, 0x00, 0x00, 0x00, 0x00, 0x0b};
constexpr uint8_t vrid = 7;

std::vector<uint8_t> make_advert(const ip_address& src, const ip_address& dst) {
    advert a;
    a.vrid = vrid;
    a.priority = 100;
    a.max_advert_interval_cs = 100;
    a.count = 1;
    a.addresses[0] = vip;
    std::array<uint8_t, 64> buf{};
    size_t n = encode(a, src, dst, buf);
    return {buf.begin(), buf.begin() + long(n)};
}

struct captured {
    ip_address src, dst;
    uint8_t ttl = 0;
    std::vector<uint8_t> payload;
};

class recorder : public rx_sink {
public:
    void on_packet(const rx_packet& p) override {
        got.push_back({p.src, p.dst, p.ttl, {p.payload.begin(), p.payload.end()}});
    }
    std::vector<captured> got;
};

// Polls until n packets have arrived, at most ~5 s: a bound for a broken build, not a timing
// assertion (a veth delivers in microseconds).
bool poll_for(kernel_io& io, recorder& r, size_t n) {
    for (int i = 0; i < 50 && r.got.size() < n; ++i) io.poll(100, r);
    return r.got.size() >= n;
}

std::unique_ptr<kernel_io> open_on(const std::string& ifname, const mac_address& mac,
                                   bool unicast) {
    kernel_io_config c;
    c.ifname = ifname;
    c.ifindex = int(if_nametoindex(ifname.c_str()));
    c.vrid = vrid;
    c.unicast = unicast;
    c.garp_ifindex = c.ifindex;
    c.garp_mac = mac;
    std::string err;
    auto io = kernel_io::open(c, err);
    EXPECT_TRUE(io) << err;
    return io;
}

drop_reason check(const captured& c, const ip_address& own) {
    advert out;
    local_view us;
    us.vrid = vrid;
    us.own_addresses = {&own, 1};
    us.virtual_addresses = {&vip, 1};
    return filter(c.ttl, c.src, c.dst, c.payload, us, out);
}

// ---- the IPv4 header check, no kernel involved ----

std::vector<uint8_t> ip_packet(uint8_t proto, std::span<const uint8_t> payload,
                               size_t option_bytes = 0) {
    size_t ihl = 20 + option_bytes;
    std::vector<uint8_t> p(ihl + payload.size(), 0);
    p[0] = uint8_t(0x40 | (ihl / 4));
    p[2] = uint8_t(p.size() >> 8);
    p[3] = uint8_t(p.size());
    p[6] = 0x40;  // DF
    p[8] = 255;
    p[9] = proto;
    std::memcpy(&p[12], addr_a.bytes.data(), 4);
    std::memcpy(&p[16], vrrp_multicast_v4().bytes.data(), 4);
    for (size_t i = 20; i < ihl; ++i) p[i] = 1;  // NOP options
    std::memcpy(&p[ihl], payload.data(), payload.size());
    // RFC 1071 header checksum, so the same bytes can be injected on a real link.
    uint32_t sum = 0;
    for (size_t i = 0; i < ihl; i += 2) sum += uint32_t(p[i] << 8 | p[i + 1]);
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    p[10] = uint8_t(~sum >> 8);
    p[11] = uint8_t(~sum);
    return p;
}

TEST(ha_kernel_io, parse_accepts_vrrp_and_returns_header_fields) {
    auto adv = make_advert(addr_a, vrrp_multicast_v4());
    auto p = ip_packet(vrrp_protocol, adv);
    auto r = parse_vrrp_ipv4(p);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->src, addr_a);
    EXPECT_EQ(r->dst, vrrp_multicast_v4());
    EXPECT_EQ(r->ttl, 255);
    EXPECT_EQ(std::vector<uint8_t>(r->payload.begin(), r->payload.end()), adv);
}

TEST(ha_kernel_io, parse_skips_ip_options_and_trailing_padding) {
    auto adv = make_advert(addr_a, vrrp_multicast_v4());
    auto p = ip_packet(vrrp_protocol, adv, 8);
    p.push_back(0);  // bytes after the total length (Ethernet padding) are not payload
    p.push_back(0);
    auto r = parse_vrrp_ipv4(p);
    ASSERT_TRUE(r);
    EXPECT_EQ(std::vector<uint8_t>(r->payload.begin(), r->payload.end()), adv);
}

TEST(ha_kernel_io, parse_refuses_every_malformed_header) {
    auto adv = make_advert(addr_a, vrrp_multicast_v4());
    const auto good = ip_packet(vrrp_protocol, adv);
    ASSERT_TRUE(parse_vrrp_ipv4(good));

    EXPECT_FALSE(parse_vrrp_ipv4(std::span(good).first(19))) << "shorter than a header";
    EXPECT_FALSE(parse_vrrp_ipv4(ip_packet(6, adv))) << "TCP";
    EXPECT_FALSE(parse_vrrp_ipv4(ip_packet(17, adv))) << "UDP";
    auto p = good;
    p[0] = 0x65;
    EXPECT_FALSE(parse_vrrp_ipv4(p)) << "version 6";
    p = good;
    p[0] = 0x44;
    EXPECT_FALSE(parse_vrrp_ipv4(p)) << "IHL 4";
    p = good;
    p[0] = 0x4f;
    EXPECT_FALSE(parse_vrrp_ipv4(std::span(p).first(40))) << "IHL beyond the bytes read";
    p = good;
    p[2] = 0;
    p[3] = uint8_t(p.size() + 1);
    EXPECT_FALSE(parse_vrrp_ipv4(p)) << "total length above the bytes read";
    p = good;
    p[2] = 0;
    p[3] = 16;
    EXPECT_FALSE(parse_vrrp_ipv4(p)) << "total length below the header";
    p = good;
    p[6] = 0x20;  // MF
    EXPECT_FALSE(parse_vrrp_ipv4(p)) << "first fragment";
    p = good;
    p[6] = 0x00;
    p[7] = 0x08;  // offset 64
    EXPECT_FALSE(parse_vrrp_ipv4(p)) << "later fragment";
}

// ---- over a veth pair between two namespaces ----

TEST(ha_kernel_io, multicast_advert_arrives_with_ttl_255_and_passes_filter) {
    run_in_netns([] {
        two_hosts net;
        ASSERT_TRUE(net.build());
        net.enter_b();
        auto b = open_on("vb", mac_b, false);
        net.enter_a();
        auto a = open_on("va", mac_a, false);
        ASSERT_TRUE(a && b);

        auto adv = make_advert(addr_a, vrrp_multicast_v4());
        ASSERT_TRUE(a->send_advert(adv, addr_a, vrrp_multicast_v4()));
        EXPECT_EQ(a->stats().tx_adverts, 1u);

        recorder rb;
        ASSERT_TRUE(poll_for(*b, rb, 1));
        ASSERT_EQ(rb.got.size(), 1u);
        EXPECT_EQ(rb.got[0].src, addr_a);
        EXPECT_EQ(rb.got[0].dst, vrrp_multicast_v4());
        EXPECT_EQ(rb.got[0].ttl, 255);
        EXPECT_EQ(rb.got[0].payload, adv);
        EXPECT_EQ(check(rb.got[0], addr_b), drop_reason::accept);
        EXPECT_EQ(b->stats().rx_packets, 1u);
        EXPECT_EQ(b->stats().rx_ignored, 0u);

        // B answers; A hears B's advert and not its own (multicast loop is off: had it looped,
        // A's own advert would have been queued on A's socket before B's).
        auto adv_b = make_advert(addr_b, vrrp_multicast_v4());
        ASSERT_TRUE(b->send_advert(adv_b, addr_b, vrrp_multicast_v4()));
        recorder ra;
        ASSERT_TRUE(poll_for(*a, ra, 1));
        ASSERT_EQ(ra.got.size(), 1u);
        EXPECT_EQ(ra.got[0].src, addr_b);
        EXPECT_EQ(ra.got[0].payload, adv_b);
        EXPECT_EQ(check(ra.got[0], addr_a), drop_reason::accept);
    });
}

TEST(ha_kernel_io, unicast_mode_hears_unicast_and_no_multicast) {
    run_in_netns([] {
        two_hosts net;
        ASSERT_TRUE(net.build());
        net.enter_b();
        auto b = open_on("vb", mac_b, true);
        net.enter_a();
        auto a = open_on("va", mac_a, true);
        ASSERT_TRUE(a && b);

        // First a multicast advert, which B (no group joined) must not get, then a unicast
        // one. The unicast one needs ARP first, so it arrives after the multicast would have.
        auto mc = make_advert(addr_a, vrrp_multicast_v4());
        ASSERT_TRUE(a->send_advert(mc, addr_a, vrrp_multicast_v4()));
        auto uc = make_advert(addr_a, addr_b);
        ASSERT_TRUE(a->send_advert(uc, addr_a, addr_b));

        recorder rb;
        ASSERT_TRUE(poll_for(*b, rb, 1));
        b->poll(0, rb);
        ASSERT_EQ(rb.got.size(), 1u);
        EXPECT_EQ(rb.got[0].src, addr_a);
        EXPECT_EQ(rb.got[0].dst, addr_b);
        EXPECT_EQ(rb.got[0].ttl, 255);
        EXPECT_EQ(rb.got[0].payload, uc);
        EXPECT_EQ(check(rb.got[0], addr_b), drop_reason::accept);
    });
}

// Sends raw IPv4 packets on ifname to the VRRP group's MAC, bypassing the IP stack, as a
// misbehaving or hostile neighbour would.
void inject(const std::string& ifname, const std::vector<std::vector<uint8_t>>& packets) {
    int fd = ::socket(AF_PACKET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    ASSERT_GE(fd, 0);
    sockaddr_ll to{};
    to.sll_family = AF_PACKET;
    to.sll_protocol = htons(ETH_P_IP);
    to.sll_ifindex = int(if_nametoindex(ifname.c_str()));
    to.sll_halen = 6;
    const uint8_t group_mac[6] = {0x01, 0x00, 0x5e, 0x00, 0x00, 0x12};
    std::memcpy(to.sll_addr, group_mac, 6);
    for (const auto& p : packets) {
        EXPECT_EQ(::sendto(fd, p.data(), p.size(), 0, reinterpret_cast<sockaddr*>(&to), sizeof to),
                  ssize_t(p.size()));
    }
    ::close(fd);
}

TEST(ha_kernel_io, malformed_and_foreign_packets_never_reach_the_sink) {
    run_in_netns([] {
        two_hosts net;
        ASSERT_TRUE(net.build());
        net.enter_b();
        auto b = open_on("vb", mac_b, false);
        net.enter_a();
        ASSERT_TRUE(b);

        auto adv = make_advert(addr_a, vrrp_multicast_v4());
        auto bad_checksum = ip_packet(vrrp_protocol, adv);
        bad_checksum[10] ^= 0xff;
        auto bad_ihl = ip_packet(vrrp_protocol, adv);
        bad_ihl[0] = 0x44;
        auto bad_version = ip_packet(vrrp_protocol, adv);
        bad_version[0] = 0x55;
        auto udp = ip_packet(17, adv);
        auto ttl_one = ip_packet(vrrp_protocol, adv);
        ttl_one[8] = 1;
        ttl_one[10] = ttl_one[11] = 0;
        {  // recompute the checksum after the TTL change
            uint32_t sum = 0;
            for (size_t i = 0; i < 20; i += 2) sum += uint32_t(ttl_one[i] << 8 | ttl_one[i + 1]);
            while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
            ttl_one[10] = uint8_t(~sum >> 8);
            ttl_one[11] = uint8_t(~sum);
        }
        auto with_options = ip_packet(vrrp_protocol, adv, 4);
        inject("va", {bad_checksum, bad_ihl, bad_version, udp, ttl_one, with_options});

        recorder rb;
        ASSERT_TRUE(poll_for(*b, rb, 2));
        b->poll(0, rb);
        // Only the two well-formed VRRP packets arrive, in order. The TTL-1 one is handed up
        // with the TTL it had, so that ha::filter refuses it; the one with IP options has its
        // payload found after them.
        ASSERT_EQ(rb.got.size(), 2u);
        EXPECT_EQ(rb.got[0].ttl, 1);
        EXPECT_EQ(check(rb.got[0], addr_b), drop_reason::bad_ttl);
        EXPECT_EQ(rb.got[1].ttl, 255);
        EXPECT_EQ(rb.got[1].payload, adv);
        EXPECT_EQ(check(rb.got[1], addr_b), drop_reason::accept);
    });
}

// Captures ARP frames on ifname (opened in the current namespace).
class arp_capture {
public:
    explicit arp_capture(const std::string& ifname) {
        fd_ = ::socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_ARP));
        EXPECT_GE(fd_, 0);
        sockaddr_ll ll{};
        ll.sll_family = AF_PACKET;
        ll.sll_protocol = htons(ETH_P_ARP);
        ll.sll_ifindex = int(if_nametoindex(ifname.c_str()));
        EXPECT_EQ(::bind(fd_, reinterpret_cast<sockaddr*>(&ll), sizeof ll), 0);
    }
    ~arp_capture() { ::close(fd_); }
    // The next frame whose ARP sender IP is one of ours, within ~5 s; empty if none.
    std::vector<uint8_t> next(std::span<const ip_address> senders) {
        for (int i = 0; i < 50; ++i) {
            pollfd p{fd_, POLLIN, 0};
            if (::poll(&p, 1, 100) <= 0) continue;
            std::vector<uint8_t> f(256);
            ssize_t n = ::recv(fd_, f.data(), f.size(), 0);
            if (n < 42) continue;
            f.resize(size_t(n));
            for (const auto& s : senders)
                if (std::memcmp(&f[14 + 14], s.bytes.data(), 4) == 0) return f;
        }
        return {};
    }

private:
    int fd_ = -1;
};

// Checks one captured gratuitous ARP: Ethernet broadcast from mac, an ARP request with
// sender = target = address and a zero target MAC.
void expect_garp(const std::vector<uint8_t>& f, const mac_address& mac, const ip_address& a) {
    ASSERT_GE(f.size(), 42u);
    const std::vector<uint8_t> bcast(6, 0xff);
    EXPECT_EQ(std::vector<uint8_t>(f.begin(), f.begin() + 6), bcast) << "Ethernet destination";
    EXPECT_EQ(std::vector<uint8_t>(f.begin() + 6, f.begin() + 12),
              std::vector<uint8_t>(mac.begin(), mac.end()))
        << "Ethernet source";
    EXPECT_EQ(f[12], 0x08);
    EXPECT_EQ(f[13], 0x06);
    const uint8_t* arp = &f[14];
    const uint8_t fixed[8] = {0, 1, 0x08, 0x00, 6, 4, 0, 1};  // Ethernet, IPv4, 6, 4, request
    EXPECT_EQ(std::memcmp(arp, fixed, 8), 0);
    EXPECT_EQ(std::memcmp(arp + 8, mac.data(), 6), 0) << "sender MAC";
    EXPECT_EQ(std::memcmp(arp + 14, a.bytes.data(), 4), 0) << "sender IP";
    const uint8_t zero[6] = {};
    EXPECT_EQ(std::memcmp(arp + 18, zero, 6), 0) << "target MAC";
    EXPECT_EQ(std::memcmp(arp + 24, a.bytes.data(), 4), 0) << "target IP";
}

TEST(ha_kernel_io, garp_leaves_from_the_interface_mac_as_arp_request) {
    run_in_netns([] {
        two_hosts net;
        ASSERT_TRUE(net.build());
        net.enter_b();
        arp_capture cap("vb");
        net.enter_a();
        auto a = open_on("va", mac_a, false);
        ASSERT_TRUE(a);

        const std::array<ip_address, 2> vips = {vip, ip_address::v4(198, 18, 0, 101)};
        ASSERT_TRUE(a->send_garp(vips));
        EXPECT_EQ(a->stats().tx_garps, 2u);
        for (const auto& v : vips) {
            auto f = cap.next({&v, 1});
            ASSERT_FALSE(f.empty()) << "no gratuitous ARP captured";
            expect_garp(f, mac_a, v);
        }
    });
}

TEST(ha_kernel_io, vmac_garp_adverts_and_arp_replies_carry_the_virtual_mac) {
    run_in_netns([] {
        two_hosts net;
        ASSERT_TRUE(net.build());
        std::string err;
        auto parent = query_link("va", err);
        ASSERT_TRUE(parent) << err;
        std::string vmac;
        int vmac_index = 0;
        ASSERT_TRUE(create_vmac(*parent, 9, vmac, vmac_index, err)) << err;
        const mac_address vm = virtual_mac_v4(9);

        net.enter_b();
        arp_capture cap("vb");
        auto b = open_on("vb", mac_b, false);
        net.enter_a();
        ASSERT_TRUE(b);

        // use_vmac: VRRP runs on the vmac (adverts leave with the virtual MAC, RFC 5798 7.3)
        // and GARPs carry the virtual MAC.
        kernel_io_config c;
        c.ifname = vmac;
        c.ifindex = vmac_index;
        c.vrid = 9;
        c.garp_ifindex = vmac_index;
        c.garp_mac = vm;
        auto a = kernel_io::open(c, err);
        ASSERT_TRUE(a) << err;

        ASSERT_TRUE(a->send_garp({&vip, 1}));
        auto f = cap.next({&vip, 1});
        ASSERT_FALSE(f.empty()) << "no gratuitous ARP captured";
        expect_garp(f, vm, vip);

        // Adverts both ways over the vmac.
        auto adv = make_advert(addr_a, vrrp_multicast_v4());
        ASSERT_TRUE(a->send_advert(adv, addr_a, vrrp_multicast_v4()));
        recorder rb;
        ASSERT_TRUE(poll_for(*b, rb, 1));
        EXPECT_EQ(rb.got[0].payload, adv);
        auto adv_b = make_advert(addr_b, vrrp_multicast_v4());
        ASSERT_TRUE(b->send_advert(adv_b, addr_b, vrrp_multicast_v4()));
        recorder ra;
        ASSERT_TRUE(poll_for(*a, ra, 1));
        EXPECT_EQ(ra.got[0].src, addr_b);

        // With the VIP on the vmac, the kernel answers B's ARP for it with the virtual MAC,
        // and the parent (arp_ignore=1) does not answer with its own.
        netlink_addresses ctl(vmac_index, vmac);
        const std::vector<virtual_address> vips = {{vip, 32}};
        ASSERT_TRUE(ctl.add(vips)) << ctl.error();
        net.enter_b();
        sh("ping -c 1 -W 2 198.18.0.100 > /dev/null");
        std::string neigh = sh_out("ip neigh show 198.18.0.100 dev vb");
        EXPECT_NE(neigh.find("lladdr 00:00:5e:00:01:09"), std::string::npos) << neigh;
        net.enter_a();
    });
}

TEST(ha_kernel_io, wake_interrupts_a_long_poll) {
    run_in_netns([] {
        two_hosts net;
        ASSERT_TRUE(net.build());
        auto a = open_on("va", mac_a, false);
        ASSERT_TRUE(a);
        recorder r;

        // A wake before the poll is not lost: the poll returns at once.
        a->wake();
        auto t0 = std::chrono::steady_clock::now();
        a->poll(60'000, r);
        // And a wake from another thread ends a poll in progress.
        std::thread t([&] {
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
            a->wake();
        });
        a->poll(60'000, r);
        t.join();
        // A generous bound that only a broken wake (a full 60 s poll) can exceed.
        EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(30));
        EXPECT_TRUE(r.got.empty());
    });
}

TEST(ha_kernel_io, ipv6_and_oversized_sends_are_refused_and_counted) {
    run_in_netns([] {
        two_hosts net;
        ASSERT_TRUE(net.build());
        auto a = open_on("va", mac_a, false);
        ASSERT_TRUE(a);
        auto adv = make_advert(addr_a, vrrp_multicast_v4());
        EXPECT_FALSE(a->send_advert(adv, addr_a, vrrp_multicast_v6()));
        std::vector<uint8_t> huge(kernel_io_rx_packet_max + 1, 0);
        EXPECT_FALSE(a->send_advert(huge, addr_a, vrrp_multicast_v4()));
        const ip_address v6 = vrrp_multicast_v6();
        EXPECT_FALSE(a->send_garp({&v6, 1}));
        EXPECT_EQ(a->stats().tx_errors, 3u);
        EXPECT_EQ(a->stats().tx_adverts, 0u);
        EXPECT_EQ(a->stats().tx_garps, 0u);
    });
}

TEST(ha_kernel_io, open_reports_a_missing_interface) {
    run_in_netns([] {
        kernel_io_config c;
        c.ifname = "nosuch0";
        c.ifindex = 4242;
        c.garp_ifindex = 4242;
        std::string err;
        EXPECT_FALSE(kernel_io::open(c, err));
        EXPECT_NE(err.find("nosuch0"), std::string::npos) << err;
        EXPECT_NE(err.find("No such device"), std::string::npos) << err;
    });
}

}  // namespace
}  // namespace tern::ha
