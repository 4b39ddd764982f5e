#include "ha/kernel_io.hh"

#include <arpa/inet.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>

namespace tern::ha {
namespace {

constexpr size_t ipv4_header_size = 20;
constexpr size_t arp_packet_size = 28;  // Ethernet/IPv4 ARP, RFC 826
// IP precedence 6 (network control, DSCP CS6): what routers use for their own protocols
// and what switches queue ahead of bulk traffic, so an advert is not lost behind mail.
constexpr uint8_t vrrp_tos = 0xc0;

uint16_t get16(const uint8_t* p) { return uint16_t(p[0] << 8 | p[1]); }
void put16(uint8_t* p, uint16_t v) {
    p[0] = uint8_t(v >> 8);
    p[1] = uint8_t(v);
}

// RFC 1071 checksum of an IPv4 header (its checksum field zero while summing).
uint16_t header_checksum(std::span<const uint8_t> h) {
    uint32_t sum = 0;
    for (size_t i = 0; i + 1 < h.size(); i += 2) sum += get16(&h[i]);
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return uint16_t(~sum);
}

std::string fail(const std::string& what, const std::string& ifname, int e) {
    return what + " on " + ifname + ": " + std::strerror(e);
}

}  // namespace

std::optional<rx_packet> parse_vrrp_ipv4(std::span<const uint8_t> p) {
    if (p.size() < ipv4_header_size) return std::nullopt;
    if ((p[0] >> 4) != 4) return std::nullopt;
    size_t ihl = size_t(p[0] & 0x0f) * 4;
    if (ihl < ipv4_header_size || ihl > p.size()) return std::nullopt;
    size_t total = get16(&p[2]);
    if (total < ihl || total > p.size()) return std::nullopt;
    // MF set or a non-zero offset: a fragment. The kernel reassembles before raw delivery,
    // so this is a frame we should never see; VRRP adverts are never fragmented.
    if ((get16(&p[6]) & 0x3fff) != 0) return std::nullopt;
    if (p[9] != vrrp_protocol) return std::nullopt;
    rx_packet r;
    r.ttl = p[8];
    r.src = ip_address::v4(p[12], p[13], p[14], p[15]);
    r.dst = ip_address::v4(p[16], p[17], p[18], p[19]);
    r.payload = p.subspan(ihl, total - ihl);
    return r;
}

kernel_io::kernel_io(const kernel_io_config& c) : config_(c) {}

kernel_io::~kernel_io() {
    for (int fd : {raw_fd_, arp_fd_, wake_fd_}) {
        if (fd >= 0) ::close(fd);
    }
}

std::unique_ptr<kernel_io> kernel_io::open(const kernel_io_config& c, std::string& err) {
    std::unique_ptr<kernel_io> io(new kernel_io(c));
    const std::string& ifn = c.ifname;
    if (ifn.empty() || ifn.size() >= IFNAMSIZ || c.ifindex <= 0 || c.garp_ifindex <= 0) {
        err = "kernel_io: interface '" + ifn + "' needs a name shorter than " +
              std::to_string(IFNAMSIZ) + " and valid ifindexes";
        return nullptr;
    }

    io->raw_fd_ = ::socket(AF_INET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, vrrp_protocol);
    if (io->raw_fd_ < 0) {
        err = fail("opening a raw socket for IP protocol 112 (needs CAP_NET_RAW)", ifn, errno);
        return nullptr;
    }
    int fd = io->raw_fd_;
    int one = 1, zero = 0;
    if (::setsockopt(fd, IPPROTO_IP, IP_HDRINCL, &one, sizeof one) < 0) {
        err = fail("setting IP_HDRINCL", ifn, errno);
        return nullptr;
    }
    // Adverts are link-local: hear and send them on this interface only.
    if (::setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, ifn.c_str(), socklen_t(ifn.size())) < 0) {
        err = fail("binding the VRRP socket (SO_BINDTODEVICE)", ifn, errno);
        return nullptr;
    }
    ip_mreqn mreq{};
    mreq.imr_multiaddr.s_addr = htonl(0xe0000012);  // 224.0.0.18
    mreq.imr_ifindex = c.ifindex;
    if (!c.unicast && ::setsockopt(fd, IPPROTO_IP, IP_ADD_MEMBERSHIP, &mreq, sizeof mreq) < 0) {
        err = fail("joining 224.0.0.18", ifn, errno);
        return nullptr;
    }
    ip_mreqn mif{};
    mif.imr_ifindex = c.ifindex;
    if (::setsockopt(fd, IPPROTO_IP, IP_MULTICAST_IF, &mif, sizeof mif) < 0) {
        err = fail("setting IP_MULTICAST_IF", ifn, errno);
        return nullptr;
    }
    // Our own adverts must not come back to us (ha::filter would drop them as own_packet,
    // but they would still cost a wakeup per advert).
    if (::setsockopt(fd, IPPROTO_IP, IP_MULTICAST_LOOP, &zero, sizeof zero) < 0) {
        err = fail("clearing IP_MULTICAST_LOOP", ifn, errno);
        return nullptr;
    }
    // Only groups this socket joined: another process's raw-112 membership elsewhere must
    // not leak its adverts to us, and in unicast mode we hear no multicast at all.
    if (::setsockopt(fd, IPPROTO_IP, IP_MULTICAST_ALL, &zero, sizeof zero) < 0) {
        err = fail("clearing IP_MULTICAST_ALL", ifn, errno);
        return nullptr;
    }
    int rcvbuf = kernel_io_rcvbuf;
    if (::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf) < 0) {
        err = fail("setting SO_RCVBUF", ifn, errno);
        return nullptr;
    }

    // Protocol 0: a send-only packet socket, the kernel hands it no received frames.
    io->arp_fd_ = ::socket(AF_PACKET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (io->arp_fd_ < 0) {
        err = fail("opening a packet socket for gratuitous ARP", ifn, errno);
        return nullptr;
    }
    sockaddr_ll ll{};
    ll.sll_family = AF_PACKET;
    ll.sll_protocol = 0;
    ll.sll_ifindex = c.garp_ifindex;
    if (::bind(io->arp_fd_, reinterpret_cast<sockaddr*>(&ll), sizeof ll) < 0) {
        err = fail("binding the ARP socket to ifindex " + std::to_string(c.garp_ifindex), ifn,
                   errno);
        return nullptr;
    }

    io->wake_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (io->wake_fd_ < 0) {
        err = fail("creating the wake eventfd", ifn, errno);
        return nullptr;
    }
    return io;
}

bool kernel_io::send_advert(std::span<const uint8_t> vrrp, const ip_address& src,
                            const ip_address& dst) {
    std::array<uint8_t, ipv4_header_size + kernel_io_rx_packet_max> pkt{};
    if (src.family != ip_family::ipv4 || dst.family != ip_family::ipv4 ||
        vrrp.size() > kernel_io_rx_packet_max) {
        ++stats_.tx_errors;
        return false;
    }
    size_t total = ipv4_header_size + vrrp.size();
    uint8_t* h = pkt.data();
    h[0] = 0x45;  // version 4, IHL 5: no options
    h[1] = vrrp_tos;
    put16(h + 2, uint16_t(total));
    put16(h + 4, ++ip_id_);
    put16(h + 6, 0x4000);  // DF, offset 0
    h[8] = vrrp_required_ttl;
    h[9] = vrrp_protocol;
    std::memcpy(h + 12, src.bytes.data(), 4);
    std::memcpy(h + 16, dst.bytes.data(), 4);
    // The kernel recomputes it under IP_HDRINCL; filled in so the header is right as built.
    put16(h + 10, header_checksum({h, ipv4_header_size}));
    std::memcpy(h + ipv4_header_size, vrrp.data(), vrrp.size());

    sockaddr_in to{};
    to.sin_family = AF_INET;
    std::memcpy(&to.sin_addr, dst.bytes.data(), 4);
    ssize_t n = ::sendto(raw_fd_, pkt.data(), total, 0, reinterpret_cast<sockaddr*>(&to),
                         sizeof to);
    if (n != ssize_t(total)) {
        ++stats_.tx_errors;
        return false;
    }
    ++stats_.tx_adverts;
    return true;
}

bool kernel_io::send_garp(std::span<const ip_address> addresses) {
    sockaddr_ll to{};
    to.sll_family = AF_PACKET;
    to.sll_protocol = htons(ETH_P_ARP);
    to.sll_ifindex = config_.garp_ifindex;
    to.sll_halen = 6;
    std::memset(to.sll_addr, 0xff, 6);  // Ethernet broadcast

    bool ok = true;
    for (const auto& a : addresses) {
        if (a.family != ip_family::ipv4) {  // IPv6 takes unsolicited NAs, not done yet
            ++stats_.tx_errors;
            ok = false;
            continue;
        }
        // An ARP request with sender IP = target IP = the address (RFC 5227 "ARP
        // announcement", what keepalived sends): every host that has the address cached
        // updates it to our MAC, and a request is heeded by hosts that ignore unsolicited
        // replies.
        std::array<uint8_t, arp_packet_size> arp{};
        put16(&arp[0], 1);       // htype Ethernet
        put16(&arp[2], 0x0800);  // ptype IPv4
        arp[4] = 6;              // hlen
        arp[5] = 4;              // plen
        put16(&arp[6], 1);       // oper request
        std::memcpy(&arp[8], config_.garp_mac.data(), 6);
        std::memcpy(&arp[14], a.bytes.data(), 4);
        // target MAC 00:00:00:00:00:00 (arp[18..23] stay zero)
        std::memcpy(&arp[24], a.bytes.data(), 4);
        ssize_t n = ::sendto(arp_fd_, arp.data(), arp.size(), 0,
                             reinterpret_cast<sockaddr*>(&to), sizeof to);
        if (n != ssize_t(arp.size())) {
            ++stats_.tx_errors;
            ok = false;
            continue;
        }
        ++stats_.tx_garps;
    }
    return ok;
}

int kernel_io::drain(rx_sink& sink) {
    int got = 0;
    while (got < kernel_io_rx_batch) {
        ssize_t n = ::recv(raw_fd_, rx_buf_.data(), rx_buf_.size(), MSG_DONTWAIT | MSG_TRUNC);
        if (n < 0) {
            if (errno == EINTR) continue;
            break;  // EAGAIN: drained; anything else: try again next poll
        }
        ++got;
        if (size_t(n) > rx_buf_.size()) {  // MSG_TRUNC reports the real length
            ++stats_.rx_ignored;
            continue;
        }
        auto p = parse_vrrp_ipv4({rx_buf_.data(), size_t(n)});
        if (!p) {
            ++stats_.rx_ignored;
            continue;
        }
        ++stats_.rx_packets;
        sink.on_packet(*p);
    }
    return got;
}

void kernel_io::poll(int64_t timeout_ms, rx_sink& sink) {
    if (timeout_ms < 0) timeout_ms = 0;
    if (timeout_ms > INT_MAX) timeout_ms = INT_MAX;
    pollfd fds[2] = {{raw_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    int r = ::poll(fds, 2, int(timeout_ms));
    if (r <= 0) return;  // timeout, or EINTR: the runner loops and recomputes its deadline
    if (fds[1].revents & POLLIN) {
        uint64_t v;
        (void)!::read(wake_fd_, &v, sizeof v);
    }
    if (fds[0].revents & (POLLIN | POLLERR)) drain(sink);
}

void kernel_io::wake() {
    uint64_t one = 1;
    // EAGAIN only when the counter is about to overflow, i.e. a wake is already pending.
    (void)!::write(wake_fd_, &one, sizeof one);
}

}  // namespace tern::ha
