// The DPDK packet_io against real DPDK: net_ring (no privileges: the port's tx ring is its rx
// ring, so what we send comes back, and the test can inject or capture frames on the same
// port), and net_af_packet on a veth pair in a fresh network namespace (root), with a raw
// packet socket on the other end standing in for the peer.
//
// rte_eal_init works once per process, so every scenario runs in a forked child; the child's
// gtest failures print from the child and its exit status carries the verdict. Decisions to
// skip are taken in the parent, before the fork.
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <rte_ethdev.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "ha/dpdk_io.hh"
#include "ha/frames.hh"
#include "ha/packet.hh"

namespace tern::ha {
namespace {

using bytes = std::vector<uint8_t>;

constexpr int child_skip = 77;

// Runs body in a forked child and fails the test if the child failed or crashed.
template <class F>
void in_child(F body) {
    std::fflush(stdout);
    std::fflush(stderr);
    pid_t pid = fork();
    ASSERT_GE(pid, 0) << std::strerror(errno);
    if (pid == 0) {
        body();
        std::fflush(stdout);
        std::fflush(stderr);
        _exit(::testing::Test::HasFailure() ? 1 : 0);
    }
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    if (WIFEXITED(status) && WEXITSTATUS(status) == child_skip)
        GTEST_SKIP() << "the child could not set up its environment (see its output)";
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "child " << (WIFEXITED(status) ? "exited " + std::to_string(WEXITSTATUS(status))
                                          : "killed by signal " +
                                                std::to_string(WTERMSIG(status)));
}

// The first CPU this process may run on: EAL pins its main lcore there.
int first_cpu() {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) != 0) return 0;
    for (int i = 0; i < CPU_SETSIZE; ++i)
        if (CPU_ISSET(i, &set)) return i;
    return 0;
}

std::string eal_args(const std::string& vdev) {
    return "--no-huge -m 64 --no-pci --no-shconf --no-telemetry --log-level=warning -l " +
           std::to_string(first_cpu()) + " --vdev " + vdev;
}

const mac_address vmac = virtual_mac_v4(51);
const mac_address peer_mac = {0x02, 0x00, 0x00, 0x00, 0x00, 0xb1};
const ip_address our_ip = ip_address::v4(198, 18, 0, 1);
const ip_address peer_ip = ip_address::v4(198, 18, 0, 2);
const ip_address group = vrrp_multicast_v4();
const ip_address vip1 = ip_address::v4(198, 18, 0, 100);
const ip_address vip2 = ip_address::v4(198, 18, 0, 101);

bytes advert_from(const ip_address& src, const ip_address& dst, uint8_t priority = 100) {
    advert a;
    a.vrid = 51;
    a.priority = priority;
    a.max_advert_interval_cs = 100;
    a.count = 2;
    a.addresses[0] = vip1;
    a.addresses[1] = vip2;
    bytes out(64);
    out.resize(encode(a, src, dst, out));
    return out;
}

struct received {
    ip_address src, dst;
    uint8_t ttl;
    bytes payload;
};

struct recording_sink : rx_sink {
    std::vector<received> got;
    void on_packet(const rx_packet& p) override {
        got.push_back({p.src, p.dst, p.ttl, bytes(p.payload.begin(), p.payload.end())});
    }
};

// The advert must pass ha::filter as the peer that receives it would run it.
void expect_accepted(const received& r) {
    const std::array<ip_address, 1> own = {ip_address::v4(198, 18, 0, 77)};
    const std::array<ip_address, 2> vips = {vip1, vip2};
    local_view us{.vrid = 51, .own_addresses = own, .virtual_addresses = vips};
    advert a;
    EXPECT_EQ(filter(r.ttl, r.src, r.dst, r.payload, us, a), drop_reason::accept);
}

dpdk_io_config ring_config() {
    dpdk_io_config c;
    c.eal_args = eal_args("net_ring0");
    c.src_mac = vmac;
    return c;
}

std::unique_ptr<dpdk_io> open_or_fail(const dpdk_io_config& c) {
    std::string err;
    auto io = dpdk_io::open(c, err);
    EXPECT_NE(io, nullptr) << err;
    return io;
}

// Test-side access to the same port: frames queued here come back on dpdk_io's rx queue.
struct port_access {
    rte_mempool* pool;
    uint16_t port;
    explicit port_access(uint16_t p) : port(p) {
        pool = rte_pktmbuf_pool_create("test_mbufs", 63, 0, 0, RTE_MBUF_DEFAULT_BUF_SIZE,
                                       int(rte_socket_id()));
        EXPECT_NE(pool, nullptr);
    }
    void inject(const bytes& frame) {
        rte_mbuf* m = rte_pktmbuf_alloc(pool);
        ASSERT_NE(m, nullptr);
        char* d = rte_pktmbuf_append(m, uint16_t(frame.size()));
        ASSERT_NE(d, nullptr);
        std::memcpy(d, frame.data(), frame.size());
        ASSERT_EQ(rte_eth_tx_burst(port, 0, &m, 1), 1);
    }
    std::vector<bytes> capture() {
        std::vector<bytes> out;
        rte_mbuf* bufs[32];
        uint16_t n = rte_eth_rx_burst(port, 0, bufs, 32);
        for (uint16_t i = 0; i < n; ++i) {
            auto* p = rte_pktmbuf_mtod(bufs[i], const uint8_t*);
            out.emplace_back(p, p + rte_pktmbuf_data_len(bufs[i]));
            rte_pktmbuf_free(bufs[i]);
        }
        return out;
    }
};

// These run under ASan+UBSan too (checked with -Db_sanitize=address,undefined): DPDK's
// libraries are not instrumented, our code over its mbufs is. A sanitizer report in a child
// aborts it, which fails the test.
class ha_dpdk : public ::testing::Test {};

class ha_dpdk_veth : public ::testing::Test {
protected:
    void SetUp() override {
        if (geteuid() != 0)
            GTEST_SKIP() << "needs root: creates a network namespace and a veth pair "
                            "(unshare(CLONE_NEWNET), ip link) and opens AF_PACKET sockets";
    }
};

// ---------------------------------------------------------------- net_ring, no privileges

TEST_F(ha_dpdk, advert_goes_out_and_comes_back_to_the_sink) {
    in_child([] {
        auto io = open_or_fail(ring_config());
        ASSERT_NE(io, nullptr);
        bytes msg = advert_from(our_ip, group);
        ASSERT_TRUE(io->send_advert(msg, our_ip, group));
        recording_sink sink;
        io->poll(2000, sink);
        ASSERT_EQ(sink.got.size(), 1u);
        EXPECT_EQ(sink.got[0].src, our_ip);
        EXPECT_EQ(sink.got[0].dst, group);
        EXPECT_EQ(sink.got[0].ttl, 255);
        EXPECT_EQ(sink.got[0].payload, msg);
        expect_accepted(sink.got[0]);
        EXPECT_EQ(io->stats().tx_adverts, 1u);
        EXPECT_EQ(io->stats().rx_packets, 1u);
        EXPECT_EQ(io->stats().rx_ignored, 0u);
        EXPECT_EQ(io->stats().tx_errors, 0u);
    });
}

TEST_F(ha_dpdk, advert_frame_on_the_wire_is_the_built_frame) {
    in_child([] {
        auto io = open_or_fail(ring_config());
        ASSERT_NE(io, nullptr);
        port_access port(io->port());
        bytes msg = advert_from(our_ip, group);
        ASSERT_TRUE(io->send_advert(msg, our_ip, group));
        auto frames = port.capture();
        ASSERT_EQ(frames.size(), 1u);
        bytes want(128);
        want.resize(build_vrrp_frame(want, vmac, our_ip, group, msg));
        EXPECT_EQ(frames[0], want);
    });
}

TEST_F(ha_dpdk, frames_from_own_macs_are_dropped) {
    in_child([] {
        const mac_address kernel_mac = {0x02, 0x00, 0x00, 0x00, 0x00, 0xa0};
        dpdk_io_config c = ring_config();
        c.own_macs = {kernel_mac};
        auto io = open_or_fail(c);
        ASSERT_NE(io, nullptr);
        port_access port(io->port());
        bytes msg = advert_from(our_ip, group);
        bytes frame(128);
        frame.resize(build_vrrp_frame(frame, kernel_mac, our_ip, group, msg));
        port.inject(frame);
        // The port's own MAC is an own MAC without being configured.
        frame.resize(128);
        frame.resize(build_vrrp_frame(frame, io->port_mac(), our_ip, group, msg));
        port.inject(frame);
        recording_sink sink;
        io->poll(100, sink);
        EXPECT_TRUE(sink.got.empty());
        EXPECT_EQ(io->rx_detail().own_mac, 2u);
        EXPECT_EQ(io->stats().rx_ignored, 2u);
        EXPECT_EQ(io->stats().rx_packets, 0u);
    });
}

// Regression guard for use_vmac: every master sends from 00:00:5e:00:01:VRID, the peer
// included. An advert from the virtual MAC we also send from must still reach the sink.
TEST_F(ha_dpdk, peer_advert_from_the_shared_virtual_mac_is_heard) {
    in_child([] {
        auto io = open_or_fail(ring_config());
        ASSERT_NE(io, nullptr);
        ASSERT_EQ(io->src_mac(), vmac);
        port_access port(io->port());
        bytes msg = advert_from(peer_ip, group, 200);
        bytes frame(128);
        frame.resize(build_vrrp_frame(frame, vmac, peer_ip, group, msg));
        port.inject(frame);
        recording_sink sink;
        io->poll(2000, sink);
        ASSERT_EQ(sink.got.size(), 1u);
        EXPECT_EQ(sink.got[0].src, peer_ip);
        EXPECT_EQ(io->rx_detail().own_mac, 0u);
    });
}

// (net_ring's MAC is 00:00:00:00:00:00; the veth test below checks a real interface's.)
TEST_F(ha_dpdk, zero_src_mac_means_the_port_mac) {
    in_child([] {
        dpdk_io_config c = ring_config();
        c.src_mac = {};
        auto io = open_or_fail(c);
        ASSERT_NE(io, nullptr);
        EXPECT_EQ(io->src_mac(), io->port_mac());
        port_access port(io->port());
        const std::array<ip_address, 1> vips = {vip1};
        ASSERT_TRUE(io->send_garp(vips));
        auto frames = port.capture();
        ASSERT_EQ(frames.size(), 1u);
        mac_address from{};
        ASSERT_TRUE(frame_source_mac(frames[0], from));
        EXPECT_EQ(from, io->port_mac());
    });
}

TEST_F(ha_dpdk, garp_frames_are_byte_exact_and_not_handed_up) {
    in_child([] {
        auto io = open_or_fail(ring_config());
        ASSERT_NE(io, nullptr);
        port_access port(io->port());
        const std::array<ip_address, 2> vips = {vip1, vip2};
        ASSERT_TRUE(io->send_garp(vips));
        EXPECT_EQ(io->stats().tx_garps, 2u);
        auto frames = port.capture();
        ASSERT_EQ(frames.size(), 2u);
        for (size_t i = 0; i < 2; ++i) {
            bytes want(64);
            want.resize(build_garp_frame(want, vmac, vips[i]));
            EXPECT_EQ(frames[i], want) << i;
        }
        // Sent again and received: ARP is not VRRP, counted as ignored.
        ASSERT_TRUE(io->send_garp(vips));
        recording_sink sink;
        io->poll(50, sink);
        EXPECT_TRUE(sink.got.empty());
        EXPECT_EQ(io->rx_detail().other, 2u);
        // An IPv6 address has no GARP: refused and counted.
        const std::array<ip_address, 1> v6 = {vrrp_multicast_v6()};
        EXPECT_FALSE(io->send_garp(v6));
        EXPECT_EQ(io->stats().tx_errors, 1u);
    });
}

TEST_F(ha_dpdk, received_frames_are_classified) {
    in_child([] {
        auto io = open_or_fail(ring_config());
        ASSERT_NE(io, nullptr);
        port_access port(io->port());
        bytes msg = advert_from(peer_ip, group, 200);
        bytes good(128);
        good.resize(build_vrrp_frame(good, peer_mac, peer_ip, group, msg));
        bytes tagged = good;
        tagged.insert(tagged.begin() + 12, {0x81, 0x00, 0x00, 0x0a});
        bytes bad_checksum = good;
        bad_checksum[ethernet_header_size + 10] ^= 0xff;
        bytes runt(good.begin(), good.begin() + 10);
        bytes arp(64);
        arp.resize(build_garp_frame(arp, peer_mac, vip1));
        for (const bytes* f : {&good, &tagged, &bad_checksum, &runt, &arp}) port.inject(*f);

        recording_sink sink;
        // Two VRRP packets arrive in one burst: poll returns after that first batch.
        io->poll(2000, sink);
        ASSERT_EQ(sink.got.size(), 2u);
        for (const auto& r : sink.got) {
            EXPECT_EQ(r.src, peer_ip);
            EXPECT_EQ(r.payload, msg);
        }
        EXPECT_EQ(io->stats().rx_packets, 2u);
        EXPECT_EQ(io->rx_detail().malformed, 2u);
        EXPECT_EQ(io->rx_detail().other, 1u);
        EXPECT_EQ(io->stats().rx_ignored, 3u);
    });
}

TEST_F(ha_dpdk, unicast_needs_a_configured_peer_mac_and_ipv6_is_refused) {
    in_child([] {
        dpdk_io_config c = ring_config();
        c.unicast_peers = {{peer_ip, peer_mac}};
        auto io = open_or_fail(c);
        ASSERT_NE(io, nullptr);
        port_access port(io->port());
        bytes msg = advert_from(our_ip, peer_ip);
        ASSERT_TRUE(io->send_advert(msg, our_ip, peer_ip));
        auto frames = port.capture();
        ASSERT_EQ(frames.size(), 1u);
        EXPECT_EQ(bytes(frames[0].begin(), frames[0].begin() + 6),
                  bytes(peer_mac.begin(), peer_mac.end()));
        const ip_address stranger = ip_address::v4(198, 18, 0, 3);
        EXPECT_FALSE(io->send_advert(advert_from(our_ip, stranger), our_ip, stranger));
        EXPECT_FALSE(io->send_advert(msg, vrrp_multicast_v6(), vrrp_multicast_v6()));
        EXPECT_EQ(io->stats().tx_adverts, 1u);
        EXPECT_EQ(io->stats().tx_errors, 2u);
        EXPECT_TRUE(port.capture().empty());
    });
}

TEST_F(ha_dpdk, wake_ends_a_long_poll) {
    in_child([] {
        auto io = open_or_fail(ring_config());
        ASSERT_NE(io, nullptr);
        recording_sink sink;
        // Woken before the poll: the wake is not lost, the poll returns at once.
        io->wake();
        auto t0 = std::chrono::steady_clock::now();
        io->poll(600000, sink);
        // From another thread, during the poll. The bounds are a tenth of the timeout: they
        // tell "woken" from "ran to its 10-minute timeout", nothing finer.
        std::thread waker([&] {
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
            io->wake();
        });
        io->poll(600000, sink);
        waker.join();
        auto elapsed = std::chrono::steady_clock::now() - t0;
        EXPECT_LT(elapsed, std::chrono::seconds(60));
        EXPECT_TRUE(sink.got.empty());
        // The wake was consumed: the next poll runs to its (short) timeout.
        io->poll(10, sink);
    });
}

TEST_F(ha_dpdk, second_open_in_a_process_fails_and_says_why) {
    in_child([] {
        auto io = open_or_fail(ring_config());
        ASSERT_NE(io, nullptr);
        std::string err;
        EXPECT_EQ(dpdk_io::open(ring_config(), err), nullptr);
        EXPECT_NE(err.find("once per process"), std::string::npos) << err;
        io.reset();
        err.clear();
        EXPECT_EQ(dpdk_io::open(ring_config(), err), nullptr);
        EXPECT_NE(err.find("once per process"), std::string::npos) << err;
    });
}

TEST_F(ha_dpdk, bad_eal_args_fail_with_a_message) {
    in_child([] {
        dpdk_io_config c = ring_config();
        c.eal_args += " --no-such-eal-option";
        std::string err;
        EXPECT_EQ(dpdk_io::open(c, err), nullptr);
        EXPECT_NE(err.find("rte_eal_init failed"), std::string::npos) << err;
        err.clear();
        EXPECT_EQ(dpdk_io::open(ring_config(), err), nullptr);
        EXPECT_NE(err.find("already failed"), std::string::npos) << err;
    });
}

TEST_F(ha_dpdk, missing_port_and_stray_arguments_are_reported) {
    in_child([] {
        dpdk_io_config c = ring_config();
        c.port = 5;
        std::string err;
        EXPECT_EQ(dpdk_io::open(c, err), nullptr);
        EXPECT_NE(err.find("no port 5"), std::string::npos) << err;
    });
    in_child([] {
        dpdk_io_config c = ring_config();
        c.eal_args += " -- stray";
        std::string err;
        EXPECT_EQ(dpdk_io::open(c, err), nullptr);
        EXPECT_NE(err.find("does not take"), std::string::npos) << err;
    });
}

// The idle cost of the sleep-poll: CPU time (all threads, user + system) over 5 s of poll()
// with nothing arriving. A figure for the docs, printed; asserted only against busy-polling
// (which would use the whole 5 s). Opt-in: TERN_HA_DPDK_MEASURE=1.
TEST_F(ha_dpdk, idle_poll_cpu_cost) {
    if (std::getenv("TERN_HA_DPDK_MEASURE") == nullptr)
        GTEST_SKIP() << "a 5 s measurement: set TERN_HA_DPDK_MEASURE=1 to run it";
    in_child([] {
        auto io = open_or_fail(ring_config());
        ASSERT_NE(io, nullptr);
        recording_sink sink;
        rusage before{}, after{};
        getrusage(RUSAGE_SELF, &before);
        auto t0 = std::chrono::steady_clock::now();
        io->poll(5000, sink);
        auto wall = std::chrono::steady_clock::now() - t0;
        getrusage(RUSAGE_SELF, &after);
        auto us = [](const timeval& t) { return double(t.tv_sec) * 1e6 + double(t.tv_usec); };
        double user = us(after.ru_utime) - us(before.ru_utime);
        double sys = us(after.ru_stime) - us(before.ru_stime);
        double wall_us =
            double(std::chrono::duration_cast<std::chrono::microseconds>(wall).count());
        std::printf("idle sleep-poll (net_ring, 1 ms interval): %.0f ms wall, %.1f ms user + "
                    "%.1f ms sys = %.2f%% of one core\n",
                    wall_us / 1000, user / 1000, sys / 1000, 100 * (user + sys) / wall_us);
        EXPECT_LT(user + sys, wall_us / 2);
    });
}

// ------------------------------------------------- net_af_packet on a veth pair, as root

constexpr const char* dpdk_side = "tv0";
constexpr const char* peer_side = "tv1";
const mac_address dpdk_if_mac = {0x02, 0x00, 0x00, 0x00, 0x00, 0xa0};

bool run(const std::string& cmd) {
    int rc = std::system((cmd + " >/dev/null 2>&1").c_str());
    if (rc != 0) std::fprintf(stderr, "setup command failed (%d): %s\n", rc, cmd.c_str());
    return rc == 0;
}

void write_sysctl(const char* path, const char* value) {
    std::ofstream f(path);
    if (f) f << value;
}

// In the child: a private network namespace with tv0 <-> tv1 up, IPv6 off (no router
// solicitations or MLD reports in the captures). Exits 77 (skip) if that cannot be built.
void make_veth_lab() {
    // A mount namespace too, with sysfs mounted again: /sys/class/net shows the namespace
    // of whoever mounted sysfs, and the tests read tv0's flags there.
    if (unshare(CLONE_NEWNET | CLONE_NEWNS) != 0) {
        std::fprintf(stderr, "unshare(CLONE_NEWNET | CLONE_NEWNS): %s\n", std::strerror(errno));
        _exit(child_skip);
    }
    if (mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
        mount("sysfs", "/sys", "sysfs", 0, nullptr) != 0) {
        std::fprintf(stderr, "mounting sysfs in the test's namespace: %s\n", std::strerror(errno));
        _exit(child_skip);
    }
    write_sysctl("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
    write_sysctl("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1");
    if (!run(std::string("ip link add ") + dpdk_side + " address 02:00:00:00:00:a0 type veth "
             "peer name " + peer_side + " address 02:00:00:00:00:b1") ||
        !run(std::string("ip link set ") + dpdk_side + " up") ||
        !run(std::string("ip link set ") + peer_side + " up"))
        _exit(child_skip);
}

// The kernel's flags for an interface (dev->flags, as sysfs shows them: SIOCGIFFLAGS
// hides an IFF_ALLMULTI that comes from a membership rather than from the user).
unsigned interface_flags(const char* name) {
    std::ifstream f(std::string("/sys/class/net/") + name + "/flags");
    unsigned v = 0;
    f >> std::hex >> v;
    return v;
}

// A raw packet socket on the peer's end of the veth pair.
struct peer_socket {
    int fd = -1;
    int ifindex = 0;
    peer_socket() {
        fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_ALL));
        EXPECT_GE(fd, 0) << std::strerror(errno);
        ifindex = int(if_nametoindex(peer_side));
        sockaddr_ll sll{};
        sll.sll_family = AF_PACKET;
        sll.sll_protocol = htons(ETH_P_ALL);
        sll.sll_ifindex = ifindex;
        EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&sll), sizeof sll), 0)
            << std::strerror(errno);
    }
    ~peer_socket() {
        if (fd >= 0) close(fd);
    }
    // The next received frame whose ethertype (after the MACs) is ethertype, or empty.
    bytes next(uint16_t ethertype, int timeout_ms = 2000) {
        auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
        while (std::chrono::steady_clock::now() < deadline) {
            pollfd p{fd, POLLIN, 0};
            if (::poll(&p, 1, 100) <= 0) continue;
            bytes buf(2048);
            sockaddr_ll from{};
            socklen_t len = sizeof from;
            ssize_t n = recvfrom(fd, buf.data(), buf.size(), 0,
                                 reinterpret_cast<sockaddr*>(&from), &len);
            if (n < 14) continue;
            if (from.sll_pkttype == PACKET_OUTGOING) continue;  // our own sends
            buf.resize(size_t(n));
            if (((uint16_t(buf[12]) << 8) | buf[13]) == ethertype) return buf;
        }
        return {};
    }
    void send(const bytes& frame) {
        sockaddr_ll to{};
        to.sll_family = AF_PACKET;
        to.sll_ifindex = ifindex;
        to.sll_halen = 6;
        std::memcpy(to.sll_addr, frame.data(), 6);
        EXPECT_EQ(sendto(fd, frame.data(), frame.size(), 0, reinterpret_cast<sockaddr*>(&to),
                         sizeof to),
                  ssize_t(frame.size()))
            << std::strerror(errno);
    }
};

dpdk_io_config veth_config() {
    dpdk_io_config c;
    c.eal_args = eal_args(std::string("net_af_packet0,iface=") + dpdk_side);
    c.src_mac = vmac;
    // own_macs left empty: the port's MAC (tv0's) is added by open().
    return c;
}

TEST_F(ha_dpdk_veth, advert_and_garp_reach_the_peer_with_valid_headers) {
    in_child([] {
        make_veth_lab();
        peer_socket peer;
        auto io = open_or_fail(veth_config());
        ASSERT_NE(io, nullptr);
        // net_af_packet has no all-multicast mode: the kernel interface is put in it.
        EXPECT_TRUE(io->allmulticast());
        EXPECT_TRUE(interface_flags(dpdk_side) & IFF_ALLMULTI);
        bytes msg = advert_from(our_ip, group);
        ASSERT_TRUE(io->send_advert(msg, our_ip, group));
        bytes f = peer.next(ethertype_ipv4);
        ASSERT_FALSE(f.empty()) << "no IPv4 frame reached " << peer_side;
        // Checked field by field as a receiver would, then against the built frame.
        EXPECT_EQ(bytes(f.begin(), f.begin() + 6),
                  (bytes{0x01, 0x00, 0x5e, 0x00, 0x00, 0x12}));
        EXPECT_EQ(bytes(f.begin() + 6, f.begin() + 12), bytes(vmac.begin(), vmac.end()));
        std::span<const uint8_t> ip(f.data() + ethernet_header_size, ipv4_header_size);
        EXPECT_EQ(ipv4_header_checksum(ip), 0) << "IPv4 header checksum";
        rx_packet p;
        ASSERT_EQ(parse_frame(f, p), frame_kind::vrrp);
        EXPECT_EQ(p.ttl, 255);
        EXPECT_EQ(p.src, our_ip);
        EXPECT_EQ(p.dst, group);
        EXPECT_EQ(vrrp_checksum(p.src, p.dst, p.payload), 0) << "VRRP checksum";
        expect_accepted({p.src, p.dst, p.ttl, bytes(p.payload.begin(), p.payload.end())});

        const std::array<ip_address, 1> vips = {vip1};
        ASSERT_TRUE(io->send_garp(vips));
        bytes g = peer.next(ethertype_arp);
        ASSERT_EQ(g.size(), garp_frame_size);
        EXPECT_EQ(bytes(g.begin(), g.begin() + 6), bytes(6, 0xff));       // broadcast
        EXPECT_EQ(bytes(g.begin() + 6, g.begin() + 12), bytes(vmac.begin(), vmac.end()));
        EXPECT_EQ(bytes(g.begin() + 14, g.begin() + 22),
                  (bytes{0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01}));      // Eth/IPv4 request
        EXPECT_EQ(bytes(g.begin() + 22, g.begin() + 28), bytes(vmac.begin(), vmac.end()));
        EXPECT_EQ(bytes(g.begin() + 28, g.begin() + 32), (bytes{198, 18, 0, 100}));  // sender
        EXPECT_EQ(bytes(g.begin() + 32, g.begin() + 38), bytes(6, 0xff));  // target MAC
        EXPECT_EQ(bytes(g.begin() + 38, g.begin() + 42), (bytes{198, 18, 0, 100}));  // target

        // Our own transmissions are not handed back up.
        recording_sink sink;
        io->poll(100, sink);
        EXPECT_TRUE(sink.got.empty());
        EXPECT_EQ(io->stats().rx_packets, 0u);
        // Closing gives the interface's all-multicast back.
        io.reset();
        EXPECT_FALSE(interface_flags(dpdk_side) & IFF_ALLMULTI);
    });
}

TEST_F(ha_dpdk_veth, peer_advert_reaches_the_sink) {
    in_child([] {
        make_veth_lab();
        peer_socket peer;
        dpdk_io_config c = veth_config();
        c.src_mac = {};  // not use_vmac: we send from the interface's MAC, read at probe time
        auto io = open_or_fail(c);
        ASSERT_NE(io, nullptr);
        EXPECT_EQ(io->src_mac(), dpdk_if_mac);
        bytes msg = advert_from(peer_ip, group, 200);
        bytes frame(128);
        frame.resize(build_vrrp_frame(frame, peer_mac, peer_ip, group, msg));
        peer.send(frame);
        recording_sink sink;
        for (int i = 0; i < 20 && sink.got.empty(); ++i) io->poll(100, sink);
        ASSERT_EQ(sink.got.size(), 1u);
        EXPECT_EQ(sink.got[0].src, peer_ip);
        EXPECT_EQ(sink.got[0].dst, group);
        EXPECT_EQ(sink.got[0].ttl, 255);
        EXPECT_EQ(sink.got[0].payload, msg);
        expect_accepted(sink.got[0]);
    });
}

// net_af_packet's socket sees the kernel's own outgoing frames on the interface. The kernel
// sends a real VRRP advert out of tv0 (raw IP socket, protocol 112, TTL 255): the peer gets
// it, and dpdk_io drops it by its source MAC instead of handing our host's packet up.
TEST_F(ha_dpdk_veth, kernel_outgoing_frames_are_not_handed_up) {
    in_child([] {
        make_veth_lab();
        if (!run(std::string("ip addr add 198.18.0.1/24 dev ") + dpdk_side)) _exit(child_skip);
        peer_socket peer;
        auto io = open_or_fail(veth_config());
        ASSERT_NE(io, nullptr);
        EXPECT_EQ(io->port_mac(), dpdk_if_mac);

        int s = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, vrrp_protocol);
        ASSERT_GE(s, 0) << std::strerror(errno);
        ASSERT_EQ(setsockopt(s, SOL_SOCKET, SO_BINDTODEVICE, dpdk_side,
                             socklen_t(std::strlen(dpdk_side))),
                  0)
            << std::strerror(errno);
        int ttl = 255;
        ASSERT_EQ(setsockopt(s, IPPROTO_IP, IP_MULTICAST_TTL, &ttl, sizeof ttl), 0);
        in_addr ifaddr{};
        ifaddr.s_addr = htonl(0xc6120001);  // 198.18.0.1
        ASSERT_EQ(setsockopt(s, IPPROTO_IP, IP_MULTICAST_IF, &ifaddr, sizeof ifaddr), 0);
        bytes msg = advert_from(our_ip, group);
        sockaddr_in to{};
        to.sin_family = AF_INET;
        to.sin_addr.s_addr = htonl(0xe0000012);  // 224.0.0.18
        ASSERT_EQ(sendto(s, msg.data(), msg.size(), 0, reinterpret_cast<sockaddr*>(&to),
                         sizeof to),
                  ssize_t(msg.size()))
            << std::strerror(errno);
        close(s);

        bytes f = peer.next(ethertype_ipv4);
        ASSERT_FALSE(f.empty()) << "the kernel's advert did not leave " << dpdk_side;
        rx_packet p;
        ASSERT_EQ(parse_frame(f, p), frame_kind::vrrp);  // a real advert: only the MAC tells
        EXPECT_EQ(bytes(f.begin() + 6, f.begin() + 12),
                  bytes(dpdk_if_mac.begin(), dpdk_if_mac.end()));

        recording_sink sink;
        io->poll(200, sink);
        EXPECT_TRUE(sink.got.empty());
        EXPECT_GE(io->rx_detail().own_mac, 1u);
        EXPECT_EQ(io->stats().rx_packets, 0u);
    });
}

TEST_F(ha_dpdk_veth, idle_poll_cpu_cost_on_af_packet) {
    if (std::getenv("TERN_HA_DPDK_MEASURE") == nullptr)
        GTEST_SKIP() << "a 5 s measurement: set TERN_HA_DPDK_MEASURE=1 to run it";
    in_child([] {
        make_veth_lab();
        auto io = open_or_fail(veth_config());
        ASSERT_NE(io, nullptr);
        recording_sink sink;
        rusage before{}, after{};
        getrusage(RUSAGE_SELF, &before);
        auto t0 = std::chrono::steady_clock::now();
        io->poll(5000, sink);
        auto wall = std::chrono::steady_clock::now() - t0;
        getrusage(RUSAGE_SELF, &after);
        auto us = [](const timeval& t) { return double(t.tv_sec) * 1e6 + double(t.tv_usec); };
        double cpu = us(after.ru_utime) - us(before.ru_utime) + us(after.ru_stime) -
                     us(before.ru_stime);
        double wall_us =
            double(std::chrono::duration_cast<std::chrono::microseconds>(wall).count());
        std::printf("idle sleep-poll (net_af_packet, 1 ms interval): %.0f ms wall, %.1f ms "
                    "CPU = %.2f%% of one core\n",
                    wall_us / 1000, cpu / 1000, 100 * cpu / wall_us);
        EXPECT_LT(cpu, wall_us / 2);
    });
}

}  // namespace
}  // namespace tern::ha
