#include "ha/dpdk_io.hh"

#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>

#include <linux/if_packet.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>

#include "ha/frames.hh"

namespace tern::ha {

namespace {

// rx burst size: VRRP is a few packets a second; 32 also drains the kernel's own frames
// (which net_af_packet reflects) without a second trip round the loop.
constexpr uint16_t rx_burst = 32;
// Per-lcore mempool cache; the pool serves one thread. Capped below n / 1.5 (DPDK's rule).
constexpr unsigned mempool_cache = 32;
constexpr const char* mempool_name = "tern_ha_mbufs";

enum class eal_state { never, failed, running };
// rte_eal_init works once per process; the state says why a second open() fails.
std::atomic<eal_state> eal{eal_state::never};
std::atomic<bool> eal_claimed{false};

std::vector<std::string> split_args(const std::string& s) {
    std::vector<std::string> out;
    size_t i = 0;
    while (i < s.size()) {
        while (i < s.size() && (s[i] == ' ' || s[i] == '\t')) ++i;
        size_t j = i;
        while (j < s.size() && s[j] != ' ' && s[j] != '\t') ++j;
        if (j > i) out.emplace_back(s.substr(i, j - i));
        i = j;
    }
    return out;
}

std::string rte_error_text(int e) {
    return std::string(rte_strerror(e < 0 ? -e : e));
}

bool init_eal(const std::string& eal_args, std::string& err) {
    if (eal_claimed.exchange(true)) {
        err = eal.load() == eal_state::failed
                  ? "dpdk: EAL initialisation already failed in this process and cannot be "
                    "retried (rte_eal_init runs once per process); restart ternd"
                  : "dpdk: EAL is already initialised in this process (rte_eal_init runs "
                    "once per process); one DPDK port per process, restart ternd to reopen";
        return false;
    }
    std::vector<std::string> args = split_args(eal_args);
    args.insert(args.begin(), "ternd-ha");
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    int argc = int(args.size());
    int parsed = rte_eal_init(argc, argv.data());
    if (parsed < 0) {
        eal.store(eal_state::failed);
        err = "dpdk: rte_eal_init failed: " + rte_error_text(rte_errno) + " (eal_args \"" +
              eal_args + "\")";
        return false;
    }
    eal.store(eal_state::running);
    // EAL stops at the first argument that is not its own: anything left is a typo in the
    // configuration, not an argument for us.
    if (parsed + 1 < argc) {
        err = "dpdk: eal_args has an argument EAL does not take: \"" +
              args[size_t(parsed) + 1] + "\"";
        return false;
    }
    return true;
}

}  // namespace

std::unique_ptr<dpdk_io> dpdk_io::open(const dpdk_io_config& c, std::string& err) {
    if (!init_eal(c.eal_args, err)) return nullptr;

    const uint16_t port = c.port;
    if (!rte_eth_dev_is_valid_port(port)) {
        err = "dpdk: no port " + std::to_string(port) + " (" +
              std::to_string(rte_eth_dev_count_avail()) +
              " probed; does eal_args name a device, e.g. --vdev net_af_packet0,iface=eth1?)";
        return nullptr;
    }
    auto fail = [&](const char* step, int rc) {
        err = std::string("dpdk: port ") + std::to_string(port) + ": " + step + ": " +
              rte_error_text(rc);
        return nullptr;
    };

    rte_eth_conf conf;
    std::memset(&conf, 0, sizeof conf);
    int rc = rte_eth_dev_configure(port, 1, 1, &conf);
    if (rc < 0) return fail("rte_eth_dev_configure", rc);
    uint16_t nrx = c.rx_descriptors, ntx = c.tx_descriptors;
    rc = rte_eth_dev_adjust_nb_rx_tx_desc(port, &nrx, &ntx);
    if (rc < 0) return fail("rte_eth_dev_adjust_nb_rx_tx_desc", rc);

    unsigned cache = std::min<unsigned>(mempool_cache, c.mbufs * 2 / 3);
    rte_mempool* pool = rte_pktmbuf_pool_create(mempool_name, c.mbufs, cache, 0,
                                                RTE_MBUF_DEFAULT_BUF_SIZE, int(rte_socket_id()));
    if (pool == nullptr) return fail("rte_pktmbuf_pool_create", rte_errno);
    // From here the pool is the dpdk_io's: its destructor frees it and closes the port.
    std::unique_ptr<dpdk_io> io(new dpdk_io(c, pool));

    rte_ether_addr addr;
    rc = rte_eth_macaddr_get(port, &addr);
    if (rc < 0) return fail("rte_eth_macaddr_get", rc);
    std::memcpy(io->port_mac_.data(), addr.addr_bytes, 6);
    if (io->config_.src_mac == mac_address{}) io->config_.src_mac = io->port_mac_;
    auto& own = io->config_.own_macs;
    if (std::find(own.begin(), own.end(), io->port_mac_) == own.end())
        own.push_back(io->port_mac_);

    int socket = rte_eth_dev_socket_id(port);
    unsigned queue_socket = socket < 0 ? unsigned(SOCKET_ID_ANY) : unsigned(socket);
    rc = rte_eth_rx_queue_setup(port, 0, nrx, queue_socket, nullptr, pool);
    if (rc < 0) return fail("rte_eth_rx_queue_setup", rc);
    rc = rte_eth_tx_queue_setup(port, 0, ntx, queue_socket, nullptr);
    if (rc < 0) return fail("rte_eth_tx_queue_setup", rc);
    rc = rte_eth_dev_start(port);
    if (rc < 0) return fail("rte_eth_dev_start", rc);

    // Promiscuous off: the NIC's unicast filter keeps other hosts' traffic off our ring.
    // All-multicast on, to hear 224.0.0.18 without programming the group into the NIC.
    // Drivers without the mode (net_af_packet) say ENOTSUP: kernel_allmulti() then asks the
    // kernel interface underneath, if there is one.
    rc = rte_eth_promiscuous_disable(port);
    if (rc < 0 && rc != -ENOTSUP) return fail("rte_eth_promiscuous_disable", rc);
    rc = rte_eth_allmulticast_enable(port);
    if (rc < 0 && rc != -ENOTSUP) return fail("rte_eth_allmulticast_enable", rc);
    io->allmulticast_ = rc == 0 && rte_eth_allmulticast_get(port) == 1;
    if (!io->allmulticast_) io->kernel_allmulti();
    return io;
}

dpdk_io::dpdk_io(const dpdk_io_config& c, rte_mempool* pool)
    : config_(c), port_(c.port), pool_(pool) {}

void dpdk_io::kernel_allmulti() {
    // A port over a kernel interface (net_af_packet reports its ifindex) receives what the
    // kernel's NIC filter passes, and 224.0.0.18 passes only if something joined it. A
    // packet socket's PACKET_MR_ALLMULTI membership puts the interface in all-multicast for
    // as long as the socket stays open, and the kernel drops it when we close it (or die).
    rte_eth_dev_info info;
    if (rte_eth_dev_info_get(port_, &info) != 0 || info.if_index == 0) return;
    int fd = ::socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (fd < 0) return;
    packet_mreq mr;
    std::memset(&mr, 0, sizeof mr);
    mr.mr_ifindex = int(info.if_index);
    mr.mr_type = PACKET_MR_ALLMULTI;
    if (setsockopt(fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mr, sizeof mr) != 0) {
        ::close(fd);
        return;
    }
    allmulti_fd_ = fd;
    allmulticast_ = true;
}

dpdk_io::~dpdk_io() {
    if (allmulti_fd_ >= 0) ::close(allmulti_fd_);
    // Stop before freeing the pool: the driver holds rx mbufs from it until stopped.
    // rte_eth_dev_stop on a port that never started only returns an error.
    rte_eth_dev_stop(port_);
    rte_eth_dev_close(port_);
    rte_mempool_free(pool_);
}

template <class Build>
bool dpdk_io::send_frame(Build&& build) {
    rte_mbuf* m = rte_pktmbuf_alloc(pool_);
    if (m == nullptr) {
        ++stats_.tx_errors;
        return false;
    }
    std::span<uint8_t> room(rte_pktmbuf_mtod(m, uint8_t*), rte_pktmbuf_tailroom(m));
    size_t n = build(room);
    if (n == 0 || n > UINT16_MAX || rte_pktmbuf_append(m, uint16_t(n)) == nullptr ||
        rte_eth_tx_burst(port_, 0, &m, 1) != 1) {
        rte_pktmbuf_free(m);
        ++stats_.tx_errors;
        return false;
    }
    return true;
}

const mac_address* dpdk_io::peer_mac(const ip_address& dst) const {
    for (const auto& n : config_.unicast_peers)
        if (n.address == dst) return &n.mac;
    return nullptr;
}

bool dpdk_io::send_advert(std::span<const uint8_t> vrrp, const ip_address& src,
                          const ip_address& dst) {
    mac_address dst_mac;
    if (is_multicast_v4(dst)) {
        dst_mac = multicast_mac_v4(dst);
    } else if (const mac_address* m = peer_mac(dst)) {
        dst_mac = *m;
    } else {
        // IPv6, or a unicast peer without a configured MAC: nothing here can resolve it.
        ++stats_.tx_errors;
        return false;
    }
    bool ok = send_frame([&](std::span<uint8_t> out) {
        return build_vrrp_frame(out, config_.src_mac, dst_mac, src, dst, vrrp);
    });
    if (ok) ++stats_.tx_adverts;
    return ok;
}

bool dpdk_io::send_garp(std::span<const ip_address> addresses) {
    bool all = true;
    for (const auto& a : addresses) {
        // build_garp_frame refuses IPv6 (neighbour advertisements are not done here).
        bool ok = send_frame([&](std::span<uint8_t> out) {
            return build_garp_frame(out, config_.src_mac, a);
        });
        if (ok)
            ++stats_.tx_garps;
        else
            all = false;
    }
    return all;
}

unsigned dpdk_io::rx_once(rx_sink& sink, bool& more) {
    rte_mbuf* bufs[rx_burst];
    uint16_t n = rte_eth_rx_burst(port_, 0, bufs, rx_burst);
    unsigned delivered = 0;
    for (uint16_t i = 0; i < n; ++i) {
        rte_mbuf* m = bufs[i];
        std::span<const uint8_t> frame(rte_pktmbuf_mtod(m, const uint8_t*),
                                       rte_pktmbuf_data_len(m));
        mac_address from;
        rx_packet p;
        if (m->nb_segs != 1 || !frame_source_mac(frame, from)) {
            ++rx_detail_.malformed;
            ++stats_.rx_ignored;
        } else if (std::find(config_.own_macs.begin(), config_.own_macs.end(), from) !=
                   config_.own_macs.end()) {
            ++rx_detail_.own_mac;
            ++stats_.rx_ignored;
        } else {
            switch (parse_frame(frame, p)) {
            case frame_kind::vrrp:
                ++stats_.rx_packets;
                ++delivered;
                sink.on_packet(p);
                break;
            case frame_kind::other:
                ++rx_detail_.other;
                ++stats_.rx_ignored;
                break;
            case frame_kind::malformed:
                ++rx_detail_.malformed;
                ++stats_.rx_ignored;
                break;
            }
        }
        rte_pktmbuf_free(m);
    }
    // A full burst means more may be waiting: the caller goes round again without sleeping.
    more = n == rx_burst;
    return delivered;
}

void dpdk_io::poll(int64_t timeout_ms, rx_sink& sink) {
    using clock = std::chrono::steady_clock;
    const auto deadline =
        clock::now() + std::chrono::milliseconds(std::max<int64_t>(timeout_ms, 0));
    const auto interval = std::chrono::microseconds(config_.poll_interval_us);
    for (;;) {
        if (wake_.exchange(false, std::memory_order_acq_rel)) return;
        bool more = false;
        if (rx_once(sink, more) > 0) return;
        auto now = clock::now();
        if (now >= deadline) return;
        if (more) continue;
        // Sleep, never spin by default: the HA thread shares small boxes with the relay.
        // poll_interval_us <= 0 spins (a dedicated core).
        if (config_.poll_interval_us > 0)
            std::this_thread::sleep_for(std::min<clock::duration>(interval, deadline - now));
    }
}

void dpdk_io::wake() { wake_.store(true, std::memory_order_release); }

}  // namespace tern::ha
