#pragma once
// The DPDK packet_io: VRRP adverts and gratuitous ARPs through one DPDK port (a NIC under a
// poll-mode driver, or net_af_packet on a kernel interface), for hosts where the data plane
// is DPDK's and the kernel does not see VRRP traffic. Virtual addresses are still added by the
// kernel (netlink); only VRRP and ARP take this path.
//
// Threads: open() initialises DPDK's EAL on the calling thread, which becomes EAL's main
// lcore: EAL pins it to the first core of the -l list in eal_args. The runner calls open()
// and every method but wake() from its HA thread. EAL starts its own service threads
// (interrupts; no telemetry with --no-telemetry).
// Once per process: rte_eal_init cannot run twice, so open() succeeds at most once per
// process, even after the dpdk_io is destroyed (a second call fails and says so).
// CPU: poll() sleeps poll_interval_us between empty rx bursts instead of spinning, so an idle
// HA thread costs about a thousand wakeups a second, not a core: 1.5-2.2% of one core
// measured at 1 ms on net_ring and net_af_packet (ha_dpdk.idle_poll_cpu_cost*).
//
// Trusts: eal_args from the configuration (they name devices and cores).
// Does not trust: received frames. Frames from own_macs are dropped first (net_af_packet
// sees the kernel's own outgoing frames on the interface); the rest go through
// ha::parse_frame and only valid IPv4 protocol-112 packets reach the sink, whose payload
// still goes through ha::filter.
// Does not do: IPv6 (adverts and neighbour advertisements are refused and counted as
// tx_errors), neighbour resolution (a unicast peer's MAC is configured), multi-segment mbufs.

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "ha/io.hh"
#include "ha/packet.hh"

struct rte_mempool;

namespace tern::ha {

// A unicast peer's MAC: nothing on the DPDK path answers or sends ARP for us.
struct static_neighbour {
    ip_address address;
    mac_address mac{};
};

struct dpdk_io_config {
    // EAL command line, split on spaces (argv[0] is "ternd-ha"). Without hugepages:
    // "--no-huge -m 64 --no-pci --no-shconf --no-telemetry -l 1 --vdev
    // net_af_packet0,iface=eth1". (--in-memory does not combine with --no-huge.)
    std::string eal_args;
    uint16_t port = 0;  // DPDK port id, 0 = the first device EAL probed
    // Adverts and GARPs leave with this MAC: the virtual MAC under use_vmac, else the
    // interface's own. All zero (the default): the port's MAC (rte_eth_macaddr_get; for
    // net_af_packet, the kernel interface's MAC when the port was probed).
    mac_address src_mac{};
    // Frames from these MACs are ours (the kernel's outgoing frames, which net_af_packet
    // reflects): dropped before parsing. The port's own MAC is always added. Never put the
    // virtual MAC here: under use_vmac every master sends from it, the peer included, and
    // its adverts must be heard. Our own adverts from the virtual MAC do not come back
    // (net_af_packet does not hand a socket its own tx) and, if reflected, ha::filter
    // drops them by their source address (own_packet).
    std::vector<mac_address> own_macs;
    std::vector<static_neighbour> unicast_peers;  // MACs of unicast advert destinations
    // Sleep between empty rx bursts. Default 1000 us: adverts are 10 ms apart at the
    // fastest, so 1 ms of rx latency is noise, and the HA thread stays off the CPU.
    int64_t poll_interval_us = 1000;
    // Limits, with their defaults. mbufs: the pool the port receives into and we send from
    // (a few per burst in flight; VRRP is a handful of packets a second).
    uint32_t mbufs = 1023;
    uint16_t rx_descriptors = 128;
    uint16_t tx_descriptors = 128;
};

// Receive-side detail beyond io_stats (io_stats.rx_ignored is their sum).
struct dpdk_rx_detail {
    uint64_t own_mac = 0;     // from a MAC in own_macs
    uint64_t other = 0;       // ARP, IPv6, other IP protocols
    uint64_t malformed = 0;   // refused by parse_frame, or a chained (multi-segment) mbuf
};

class dpdk_io final : public packet_io {
public:
    // Initialises EAL from c.eal_args and starts c.port with one rx and one tx queue. Returns
    // nullptr and sets err (which names the step and rte_errno's text) on failure. At most
    // one successful EAL initialisation per process: see the header comment.
    static std::unique_ptr<dpdk_io> open(const dpdk_io_config& c, std::string& err);

    ~dpdk_io() override;
    dpdk_io(const dpdk_io&) = delete;
    dpdk_io& operator=(const dpdk_io&) = delete;

    bool send_advert(std::span<const uint8_t> vrrp, const ip_address& src,
                     const ip_address& dst) override;
    bool send_garp(std::span<const ip_address> addresses) override;
    void poll(int64_t timeout_ms, rx_sink& sink) override;
    void wake() override;
    const io_stats& stats() const override { return stats_; }

    const dpdk_rx_detail& rx_detail() const { return rx_detail_; }
    // Whether the port hears all multicast (so 224.0.0.18). Drivers without the mode
    // (net_af_packet) over a kernel interface get it from the kernel instead: a packet
    // socket holds a PACKET_MR_ALLMULTI membership on the interface while we live (needs
    // CAP_NET_RAW, which net_af_packet needs anyway). False when neither worked.
    bool allmulticast() const { return allmulticast_; }
    uint16_t port() const { return port_; }
    // The port's MAC (the kernel interface's under net_af_packet).
    const mac_address& port_mac() const { return port_mac_; }
    // The MAC adverts and GARPs leave with (config's src_mac, or the port's).
    const mac_address& src_mac() const { return config_.src_mac; }

private:
    dpdk_io(const dpdk_io_config& c, rte_mempool* pool);
    // Builds one frame into a fresh mbuf and queues it; false (mbuf freed) on failure.
    template <class Build>
    bool send_frame(Build&& build);
    const mac_address* peer_mac(const ip_address& dst) const;
    void kernel_allmulti();
    // One rx burst; returns how many VRRP packets went to the sink. more: the burst was
    // full, so frames may still be waiting.
    unsigned rx_once(rx_sink& sink, bool& more);

    dpdk_io_config config_;
    uint16_t port_;
    mac_address port_mac_{};
    rte_mempool* pool_;
    bool allmulticast_ = false;
    int allmulti_fd_ = -1;  // the packet socket holding the kernel interface's allmulti
    std::atomic<bool> wake_{false};
    io_stats stats_;
    dpdk_rx_detail rx_detail_;
};

}  // namespace tern::ha
