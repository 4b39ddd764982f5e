#pragma once
// The kernel packet backend for VRRP (ha/io.hh packet_io): adverts over a raw IPv4 socket for
// protocol 112, gratuitous ARPs over a packet socket. Used by the HA thread; blocking calls
// are bounded by poll()'s timeout, the sockets themselves are nonblocking.
//
// Why IP_HDRINCL: RFC 5798 5.1.1 wants TTL 255 and the source address to be the interface's
// primary address whatever the routing table would pick; building the IP header ourselves
// (as keepalived does) makes both explicit. The kernel still routes the packet out of the
// bound interface and maps 224.0.0.18 to 01:00:5e:00:00:12.
//
// Why a SOCK_DGRAM packet socket for GARP: the kernel writes the Ethernet header with the
// bound interface's MAC as source, so binding it to the vmac (macvlan) makes the frame leave
// with the virtual MAC, and binding it to the plain interface gives its own MAC.
//
// Trusts: the config (interface names and indexes checked by the caller via query_link).
// Does not trust: received packets. parse_vrrp_ipv4 checks the IPv4 header (version, IHL,
// total length against the bytes read, protocol, no fragments) before handing the payload on;
// the VRRP payload itself is still untrusted and goes through ha::filter.
// Does not do: IPv6 (adverts to ff02::12, unsolicited NAs): send_advert refuses IPv6.

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "ha/io.hh"
#include "ha/packet.hh"

namespace tern::ha {

// Under use_vmac, give the vmac as ifname/ifindex as well as garp_ifindex: adverts then
// leave with the virtual MAC as Ethernet source (RFC 5798 7.3), and the private macvlan
// still hears the group's adverts from other hosts (tested). Without use_vmac all three
// name the configured interface.
struct kernel_io_config {
    std::string ifname;     // the interface VRRP runs on (adverts are sent and heard here)
    int ifindex = 0;
    uint8_t vrid = 0;       // unused by the socket code: VRID filtering is ha::filter's job
    bool unicast = false;   // unicast peers: no multicast group join when true
    int garp_ifindex = 0;   // interface whose MAC the GARP carries: the vmac under use_vmac,
                            // else ifindex
    mac_address garp_mac{}; // that interface's MAC (the ARP sender hardware address)
};

// Limit: received packets handed to the sink per poll() before it returns, so a flood cannot
// keep the HA thread from its timers. Default 64.
inline constexpr int kernel_io_rx_batch = 64;
// Limit: SO_RCVBUF of the raw socket. Adverts are ~40 bytes (~1 KiB of skb each); 256 KiB
// absorbs a burst of a few hundred while the HA thread is busy. Default 256 KiB.
inline constexpr int kernel_io_rcvbuf = 256 * 1024;
// Limit: bytes read per received packet. A VRRPv3 advert with max_advert_addresses IPv4
// addresses is 20 + 8 + 80 bytes; anything longer than this is not ours and is counted as
// ignored (MSG_TRUNC). Default 2048.
inline constexpr size_t kernel_io_rx_packet_max = 2048;

// Checks the IPv4 header at the start of packet (as a raw socket delivers it) and, for a
// well-formed unfragmented protocol-112 packet, returns {src, dst, ttl, payload} with payload
// pointing into packet after the header and options, cut to the header's total length.
// Returns nullopt for anything else: short, not version 4, IHL < 5 or beyond the packet,
// total length below the header or above the bytes read, another protocol, a fragment.
std::optional<rx_packet> parse_vrrp_ipv4(std::span<const uint8_t> packet);

class kernel_io final : public packet_io {
public:
    // Opens and configures the sockets. nullptr and err set (which step, which interface,
    // the errno text) on failure. Needs CAP_NET_RAW.
    static std::unique_ptr<kernel_io> open(const kernel_io_config& c, std::string& err);
    ~kernel_io() override;
    kernel_io(const kernel_io&) = delete;
    kernel_io& operator=(const kernel_io&) = delete;

    bool send_advert(std::span<const uint8_t> vrrp, const ip_address& src,
                     const ip_address& dst) override;
    bool send_garp(std::span<const ip_address> addresses) override;
    void poll(int64_t timeout_ms, rx_sink& sink) override;
    void wake() override;
    const io_stats& stats() const override { return stats_; }

private:
    explicit kernel_io(const kernel_io_config& c);
    // Reads up to kernel_io_rx_batch packets without blocking; returns how many were read.
    int drain(rx_sink& sink);

    kernel_io_config config_;
    int raw_fd_ = -1;      // AF_INET, SOCK_RAW, 112
    int arp_fd_ = -1;      // AF_PACKET, SOCK_DGRAM, bound to garp_ifindex
    int wake_fd_ = -1;     // eventfd written by wake()
    uint16_t ip_id_ = 0;
    io_stats stats_;
    std::array<uint8_t, kernel_io_rx_packet_max> rx_buf_{};
};

}  // namespace tern::ha
