#pragma once
// Kernel interface and address control over raw rtnetlink (NETLINK_ROUTE), for the HA thread:
// look up an interface, add and remove the virtual addresses, and create the keepalived-style
// "vmac" macvlan that carries the VRRP virtual MAC. Every request asks for an ACK and waits
// for it, so a caller learns the errno of the very request it made; calls block (the HA
// thread is not a shard and does a handful of these per transition).
//
// Why the kernel holds the virtual addresses whatever the packet backend: the kernel keeps
// serving TCP on them (ha/io.hh), and it is the kernel, not the VRRP backend, that answers
// ARP for them. The backend only sends adverts and gratuitous ARPs.
//
// Why a vmac (keepalived use_vmac): with VRRP's virtual MAC 00:00:5e:00:01:<vrid> (RFC 5798
// 7.3) the hosts on the LAN never have to relearn a MAC on failover; only the switch moves
// the MAC to the new master's port, which the gratuitous ARP teaches it. But the kernel
// drops unicast frames addressed to a MAC that no interface carries, so some interface must
// carry it: a macvlan on the parent with that MAC. The virtual addresses go on the macvlan,
// so the kernel answers ARP for them with the virtual MAC. Mode private as in keepalived:
// the macvlan must not talk to sibling macvlans of the same parent (two VRIDs on one box).
// The sysctls make ARP come out right:
//   vmac   arp_ignore=1     answer ARP only for addresses configured on the vmac itself
//          arp_announce=2   ARP requests we send use the vmac's address as sender
//          accept_local=1   hear adverts whose source is one of our own addresses
//          rp_filter=0      receive on the vmac although it routes nothing (keepalived)
//   parent arp_ignore=1     the parent must not answer ARP for the VIPs with its own MAC
//          arp_filter=1     (Linux answers ARP for any local address on any interface
//                            by default, which would undo the vmac)
//          arp_announce=2   replies to clients leave through the parent (the connected
//                            route is there) with a VIP as source; without this, the ARP
//                            request the parent sends to resolve the client says "VIP is
//                            at <parent MAC>" and every host that hears it overwrites the
//                            virtual MAC (found by the vmac test; keepalived sets only the
//                            first two)
// The parent's settings are left in place by delete_link (keepalived restores them when it
// removes its last vmac; ternd keeps the vmac for its lifetime, see the report/docs).
//
// Trusts: the kernel's netlink replies (bounds are still checked on every attribute walk).
// Does not trust: interface names from the config (length-checked against IFNAMSIZ).
// Does not do: IPv6 addresses, routes, link monitoring (no multicast group subscription).

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ha/io.hh"
#include "ha/packet.hh"

namespace tern::ha {

struct link_info {
    int ifindex = 0;
    std::string name;
    mac_address mac{};
    bool up = false;                  // IFF_UP (administratively up)
    std::vector<ip_address> ipv4;     // primary addresses first, then secondaries
};

// Looks up one interface by name with its IPv4 addresses. nullopt and err set (naming the
// interface and the errno text) when it does not exist or netlink fails.
std::optional<link_info> query_link(std::string_view ifname, std::string& err);

// Adds and removes IPv4 virtual addresses on one interface (the configured interface, or the
// vmac). Addresses are added as `ip addr add A/P brd + dev IF` does: IFA_LOCAL = IFA_ADDRESS
// = A, and a broadcast address when P < 31.
class netlink_addresses : public address_control {
public:
    // ifname is used only in messages.
    netlink_addresses(int ifindex, std::string ifname);

    // RTM_NEWADDR with NLM_F_CREATE|NLM_F_REPLACE: an address already there is success.
    // Stops at the first failure (the addresses before it stay added).
    bool add(std::span<const virtual_address> addresses) override;
    // RTM_DELADDR; EADDRNOTAVAIL/ENOENT (already absent) is success. Tries every address
    // and reports the first failure.
    bool remove(std::span<const virtual_address> addresses) override;
    const std::string& error() const override { return error_; }
    // 0 (default): addresses are permanent. N: added with valid and preferred lifetimes of N
    // seconds; add() again renews them (the runner does, while master).
    void set_lifetime(uint32_t seconds) { lifetime_s_ = seconds; }

private:
    uint32_t lifetime_s_ = 0;
    int ifindex_;
    std::string ifname_;
    std::string error_;
};

// The vmac's name for a VRID: "vrrp.<vrid>" (keepalived's default vmac name).
std::string vmac_name(uint8_t vrid);

// Creates the macvlan vrrp.<vrid> on parent in private mode with MAC 00:00:5e:00:01:<vrid>,
// brings it up and sets the sysctls above. An existing vrrp.<vrid> that is a macvlan on
// this parent with the virtual MAC is reused (a restarted ternd); one that is a macvlan
// with the wrong MAC or parent is deleted and recreated; an interface of that name that is
// not a macvlan is an error (never delete what we did not make). On success fills name_out
// and ifindex_out.
bool create_vmac(const link_info& parent, uint8_t vrid, std::string& name_out, int& ifindex_out,
                 std::string& err);

// RTM_DELLINK. Deleting an interface that no longer exists (ENODEV) is success.
bool delete_link(int ifindex, std::string& err);

}  // namespace tern::ha
