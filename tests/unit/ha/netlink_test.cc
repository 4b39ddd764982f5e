// rtnetlink interface lookup, address control and vmac creation, against the real kernel in a
// throwaway network namespace (see netns.hh). Addresses from 198.18.0.0/15 only.
#include <gtest/gtest.h>
#include <net/if.h>

#include <string>
#include <vector>

#include "ha/netlink.hh"
#include "tests/unit/ha/netns.hh"

namespace tern::ha {
namespace {

using testing::read_file;
using testing::run_in_netns;
using testing::sh;
using testing::sh_out;

const mac_address v0_mac = {0x02, 0x00, 0x00, 0x00, 0x00, 0x01};

// v0 (up, 198.18.0.1/24 primary, 198.18.0.2/24 secondary) with its peer v1.
bool make_v0() {
    return sh("ip link add v0 address 02:00:00:00:00:01 type veth peer name v1") &&
           sh("ip addr add 198.18.0.1/24 dev v0 && ip addr add 198.18.0.2/24 dev v0") &&
           sh("ip link set v0 up && ip link set v1 up");
}

bool has(const std::vector<ip_address>& v, const ip_address& a) {
    for (const auto& x : v)
        if (x == a) return true;
    return false;
}

TEST(ha_netlink, query_link_reports_index_mac_state_and_addresses) {
    run_in_netns([] {
        ASSERT_TRUE(make_v0());
        std::string err;
        auto li = query_link("v0", err);
        ASSERT_TRUE(li) << err;
        EXPECT_EQ(li->ifindex, int(if_nametoindex("v0")));
        EXPECT_EQ(li->name, "v0");
        EXPECT_EQ(li->mac, v0_mac);
        EXPECT_TRUE(li->up);
        ASSERT_EQ(li->ipv4.size(), 2u);
        EXPECT_EQ(li->ipv4[0], ip_address::v4(198, 18, 0, 1));  // primary first
        EXPECT_EQ(li->ipv4[1], ip_address::v4(198, 18, 0, 2));

        // v1 is down and has no address: the address dump must not leak v0's into it.
        sh("ip link set v1 down");
        auto l1 = query_link("v1", err);
        ASSERT_TRUE(l1) << err;
        EXPECT_FALSE(l1->up);
        EXPECT_TRUE(l1->ipv4.empty());
    });
}

TEST(ha_netlink, query_link_unknown_interface_names_it) {
    run_in_netns([] {
        std::string err;
        EXPECT_FALSE(query_link("nosuch0", err));
        EXPECT_NE(err.find("nosuch0"), std::string::npos) << err;
        EXPECT_NE(err.find("No such device"), std::string::npos) << err;

        err.clear();
        EXPECT_FALSE(query_link("a-name-far-too-long-for-linux", err));
        EXPECT_NE(err.find("longer than"), std::string::npos) << err;
    });
}

TEST(ha_netlink, add_and_remove_are_idempotent) {
    run_in_netns([] {
        ASSERT_TRUE(make_v0());
        int idx = int(if_nametoindex("v0"));
        netlink_addresses ctl(idx, "v0");
        const std::vector<virtual_address> vips = {
            {ip_address::v4(198, 18, 0, 10), 32},
            {ip_address::v4(198, 18, 1, 10), 24},
        };
        ASSERT_TRUE(ctl.add(vips)) << ctl.error();
        std::string err;
        auto li = query_link("v0", err);
        ASSERT_TRUE(li) << err;
        EXPECT_TRUE(has(li->ipv4, vips[0].address));
        EXPECT_TRUE(has(li->ipv4, vips[1].address));
        // The /24 carries the broadcast `ip addr add ... brd +` would give it; the /32 none.
        std::string shown = sh_out("ip -4 addr show dev v0");
        EXPECT_NE(shown.find("inet 198.18.1.10/24 brd 198.18.1.255"), std::string::npos) << shown;
        EXPECT_NE(shown.find("inet 198.18.0.10/32 scope global"), std::string::npos) << shown;

        // Already present: still success, and no duplicate.
        ASSERT_TRUE(ctl.add(vips)) << ctl.error();
        li = query_link("v0", err);
        ASSERT_TRUE(li) << err;
        EXPECT_EQ(li->ipv4.size(), 4u);

        ASSERT_TRUE(ctl.remove(vips)) << ctl.error();
        li = query_link("v0", err);
        ASSERT_TRUE(li) << err;
        EXPECT_FALSE(has(li->ipv4, vips[0].address));
        EXPECT_FALSE(has(li->ipv4, vips[1].address));
        EXPECT_TRUE(has(li->ipv4, ip_address::v4(198, 18, 0, 1)));  // the real ones stay

        // Already absent: still success.
        EXPECT_TRUE(ctl.remove(vips)) << ctl.error();
    });
}

TEST(ha_netlink, bad_ifindex_fails_with_address_interface_and_errno) {
    run_in_netns([] {
        netlink_addresses ctl(9999, "ghost0");
        const std::vector<virtual_address> vips = {{ip_address::v4(198, 18, 0, 10), 32}};
        EXPECT_FALSE(ctl.add(vips));
        EXPECT_NE(ctl.error().find("198.18.0.10/32"), std::string::npos) << ctl.error();
        EXPECT_NE(ctl.error().find("ghost0"), std::string::npos) << ctl.error();
        EXPECT_NE(ctl.error().find("No such device"), std::string::npos) << ctl.error();

        EXPECT_FALSE(ctl.remove(vips));
        EXPECT_NE(ctl.error().find("removing 198.18.0.10/32 from ghost0"), std::string::npos)
            << ctl.error();
    });
}

TEST(ha_netlink, ipv6_and_bad_prefix_are_refused_with_a_message) {
    run_in_netns([] {
        ASSERT_TRUE(make_v0());
        netlink_addresses ctl(int(if_nametoindex("v0")), "v0");
        std::array<uint8_t, 16> b{};
        b[0] = 0x20;
        b[1] = 0x01;
        b[2] = 0x0d;
        b[3] = 0xb8;
        const std::vector<virtual_address> v6 = {{ip_address::v6(b), 64}};
        EXPECT_FALSE(ctl.add(v6));
        EXPECT_NE(ctl.error().find("only IPv4"), std::string::npos) << ctl.error();
        const std::vector<virtual_address> bad = {{ip_address::v4(198, 18, 0, 10), 33}};
        EXPECT_FALSE(ctl.add(bad));
        EXPECT_NE(ctl.error().find("198.18.0.10/33"), std::string::npos) << ctl.error();
    });
}

std::string sysctl(const std::string& ifname, const std::string& key) {
    return read_file("/proc/sys/net/ipv4/conf/" + ifname + "/" + key);
}

TEST(ha_netlink, create_vmac_makes_private_macvlan_with_virtual_mac_and_sysctls) {
    run_in_netns([] {
        ASSERT_TRUE(make_v0());
        std::string err;
        auto parent = query_link("v0", err);
        ASSERT_TRUE(parent) << err;

        std::string name;
        int idx = 0;
        ASSERT_TRUE(create_vmac(*parent, 42, name, idx, err)) << err;
        EXPECT_EQ(name, "vrrp.42");
        EXPECT_EQ(idx, int(if_nametoindex("vrrp.42")));
        auto vm = query_link("vrrp.42", err);
        ASSERT_TRUE(vm) << err;
        EXPECT_EQ(vm->mac, virtual_mac_v4(42));
        EXPECT_TRUE(vm->up);

        std::string details = sh_out("ip -d link show vrrp.42");
        EXPECT_NE(details.find("vrrp.42@v0"), std::string::npos) << details;
        EXPECT_NE(details.find("macvlan mode private"), std::string::npos) << details;

        EXPECT_EQ(sysctl("vrrp.42", "arp_ignore"), "1");
        EXPECT_EQ(sysctl("vrrp.42", "arp_announce"), "2");
        EXPECT_EQ(sysctl("vrrp.42", "accept_local"), "1");
        EXPECT_EQ(sysctl("vrrp.42", "rp_filter"), "0");
        EXPECT_EQ(sysctl("v0", "arp_ignore"), "1");
        EXPECT_EQ(sysctl("v0", "arp_filter"), "1");
        EXPECT_EQ(sysctl("v0", "arp_announce"), "2");

        // A second call (ternd restarted) reuses the interface as it is.
        std::string name2;
        int idx2 = 0;
        ASSERT_TRUE(create_vmac(*parent, 42, name2, idx2, err)) << err;
        EXPECT_EQ(name2, name);
        EXPECT_EQ(idx2, idx);

        ASSERT_TRUE(delete_link(idx, err)) << err;
        EXPECT_FALSE(query_link("vrrp.42", err));
        EXPECT_TRUE(delete_link(idx, err)) << "deleting a deleted link is success: " << err;
    });
}

TEST(ha_netlink, create_vmac_replaces_stale_macvlan_and_refuses_other_kinds) {
    run_in_netns([] {
        ASSERT_TRUE(make_v0());
        std::string err;
        auto parent = query_link("v0", err);
        ASSERT_TRUE(parent) << err;

        // A leftover macvlan with the wrong MAC is replaced.
        ASSERT_TRUE(sh("ip link add link v0 name vrrp.7 address 02:11:22:33:44:55 "
                       "type macvlan mode private"));
        int stale = int(if_nametoindex("vrrp.7"));
        std::string name;
        int idx = 0;
        ASSERT_TRUE(create_vmac(*parent, 7, name, idx, err)) << err;
        EXPECT_NE(idx, stale);
        auto vm = query_link("vrrp.7", err);
        ASSERT_TRUE(vm) << err;
        EXPECT_EQ(vm->mac, virtual_mac_v4(7));

        // Something else with the vmac's name is not ours to delete.
        ASSERT_TRUE(sh("ip link add vrrp.8 type veth peer name x8"));
        EXPECT_FALSE(create_vmac(*parent, 8, name, idx, err));
        EXPECT_NE(err.find("not a macvlan"), std::string::npos) << err;
        EXPECT_NE(if_nametoindex("vrrp.8"), 0u);
    });
}

}  // namespace
}  // namespace tern::ha
