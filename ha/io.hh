#pragma once
// The packet I/O seam between the VRRP runner and a backend (kernel sockets or DPDK).
// The runner (one HA thread) owns the state machine and calls into one packet_io; the
// backend moves VRRP adverts and gratuitous ARPs and nothing else. Virtual addresses are
// always added and removed by the kernel (netlink), whatever the backend: the kernel keeps
// serving TCP on them, and only VRRP/ARP traffic takes the backend's path.
//
// Trusts: the runner to call every method from the HA thread, except wake().
// Does not trust: received frames. A backend hands up only IPv4 (later IPv6) packets whose
// protocol is 112, with the TTL and the addresses taken from the IP header it saw; the
// VRRP payload is still untrusted and goes through ha::filter.

#include <array>
#include <cstdint>
#include <span>
#include <string>

#include "ha/packet.hh"

namespace tern::ha {

using mac_address = std::array<uint8_t, 6>;

// 00:00:5e:00:01:VRID (RFC 5798 7.3, IPv4).
inline mac_address virtual_mac_v4(uint8_t vrid) { return {0x00, 0x00, 0x5e, 0x00, 0x01, vrid}; }

// One received VRRP packet, valid only during the rx_sink call.
struct rx_packet {
    ip_address src;
    ip_address dst;
    uint8_t ttl = 0;                     // IPv4 TTL or IPv6 hop limit as received
    std::span<const uint8_t> payload;    // the VRRP message, from the version nibble on
};

class rx_sink {
public:
    virtual ~rx_sink() = default;
    virtual void on_packet(const rx_packet& p) = 0;
};

// Counters every backend keeps (exported as metrics by ternd).
struct io_stats {
    uint64_t rx_packets = 0;       // VRRP packets handed to the sink
    uint64_t rx_ignored = 0;       // frames not for us: other protocols, own MAC, bad IP header
    uint64_t tx_adverts = 0;
    uint64_t tx_garps = 0;
    uint64_t tx_errors = 0;
};

class packet_io {
public:
    virtual ~packet_io() = default;

    // Sends one VRRP message (already encoded, checksum computed for src -> dst) in an IP
    // packet with TTL 255 from src to dst: the multicast group 224.0.0.18 or a unicast peer.
    // Returns false (and counts tx_errors) when the packet could not be queued.
    virtual bool send_advert(std::span<const uint8_t> vrrp, const ip_address& src,
                             const ip_address& dst) = 0;

    // One gratuitous ARP per IPv4 address (an ARP request with sender = target = the address,
    // to the broadcast MAC), from the MAC that now answers for the addresses: the virtual
    // MAC with use_vmac, else the interface's own.
    virtual bool send_garp(std::span<const ip_address> addresses) = 0;

    // Waits at most timeout_ms for packets and hands each VRRP packet to sink. Returns
    // after the first batch, at the timeout, or soon after wake().
    virtual void poll(int64_t timeout_ms, rx_sink& sink) = 0;

    // Makes a poll() in progress return soon. The only method safe from any thread.
    virtual void wake() = 0;

    virtual const io_stats& stats() const = 0;
};

// A virtual address with the prefix length it is added with (CIDR in the config).
struct virtual_address {
    ip_address address;
    uint8_t prefix = 32;
    friend bool operator==(const virtual_address&, const virtual_address&) = default;
};

// Adds and removes the virtual addresses on the interface that carries them (the configured
// interface, or the macvlan with the virtual MAC under use_vmac). Kernel netlink in ternd;
// a recorder in tests.
class address_control {
public:
    virtual ~address_control() = default;
    // Idempotent: an address already present counts as added. On failure returns false and
    // sets error() to a message naming the address and the errno text.
    virtual bool add(std::span<const virtual_address> addresses) = 0;
    // Idempotent: an address already absent counts as removed.
    virtual bool remove(std::span<const virtual_address> addresses) = 0;
    virtual const std::string& error() const = 0;
};

}  // namespace tern::ha
