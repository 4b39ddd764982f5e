#include "src/server/ha.hh"

#include <arpa/inet.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <pthread.h>
#include <time.h>

#include <future>

#include "ha/kernel_io.hh"
#include "ha/netlink.hh"
#include "src/core/log.hh"
#include "tern_build.hh"
#if TERN_HAVE_DPDK
#include "ha/dpdk_io.hh"
#endif

namespace tern::server {

namespace {

ha::millis mono_ms() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ha::millis(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

ha::ip_address to_ip(const uint8_t* b) { return ha::ip_address::v4(b[0], b[1], b[2], b[3]); }

std::string ip_text(const ha::ip_address& a) {
    char buf[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, a.bytes.data(), buf, sizeof buf);
    return buf;
}

}  // namespace

struct ha_service::impl {
    config::ha_settings cfg;
    ha::runner::health_fn health;
    std::unique_ptr<ha::packet_io> io;
    std::unique_ptr<ha::netlink_addresses> addresses;
    std::unique_ptr<ha::runner> runner;
    int vmac_ifindex = 0;
    std::string backend_name;
    int ioctl_fd = -1;  // for SIOCGIFFLAGS: the link check, one syscall per health period

    ~impl() {
        if (ioctl_fd >= 0) ::close(ioctl_fd);
    }

    // Empty when the interface is up with a carrier (IFF_UP and IFF_RUNNING).
    std::string link_state() {
        ifreq ifr{};
        snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", cfg.interface.c_str());
        if (::ioctl(ioctl_fd, SIOCGIFFLAGS, &ifr) != 0) return cfg.interface + ": " + strerror(errno);
        if (!(ifr.ifr_flags & IFF_UP)) return cfg.interface + ": link administratively down";
        if (!(ifr.ifr_flags & IFF_RUNNING)) return cfg.interface + ": no carrier";
        return {};
    }

    // Runs on the HA thread: everything that opens the interface and the backend.
    bool open(std::string& err) {
        const std::string key = "ha.interface";
        std::string e;
        auto link = ha::query_link(cfg.interface, e);
        if (!link) {
            err = key + ": \"" + cfg.interface + "\": " + e;
            return false;
        }
        ioctl_fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (ioctl_fd < 0) {
            err = std::string("socket: ") + strerror(errno);
            return false;
        }
        ifreq ifr{};
        snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", cfg.interface.c_str());
        if (::ioctl(ioctl_fd, SIOCGIFFLAGS, &ifr) == 0 && (ifr.ifr_flags & IFF_LOOPBACK)) {
            err = key + ": \"" + cfg.interface + "\" is a loopback interface: VRRP needs the segment the clients are on";
            return false;
        }
        ha::runner_config rc;
        for (const auto& v : cfg.virtual_addresses)
            rc.addresses.push_back({to_ip(v.bytes.data()), v.prefix});
        // The primary address: the interface's first IPv4 address that is not a virtual one
        // (a ternd killed as master may have left a virtual address behind).
        for (const auto& a : link->ipv4) {
            bool is_vip = false;
            for (const auto& v : rc.addresses) is_vip = is_vip || v.address == a;
            if (is_vip) continue;
            if (rc.own_addresses.empty()) rc.vrrp.primary = a;
            rc.own_addresses.push_back(a);
        }
        if (rc.own_addresses.empty()) {
            err = key + ": \"" + cfg.interface +
                  "\" has no IPv4 address of its own: VRRP adverts need one as their source";
            return false;
        }
        int addr_ifindex = link->ifindex;
        std::string addr_ifname = link->name;
        ha::mac_address src_mac = link->mac;
        if (cfg.use_vmac) {
            std::string name;
            int idx = 0;
            if (!ha::create_vmac(*link, cfg.vrid, name, idx, e)) {
                err = "ha.use_vmac: " + e;
                return false;
            }
            vmac_ifindex = idx;
            addr_ifindex = idx;
            addr_ifname = name;
            src_mac = ha::virtual_mac_v4(cfg.vrid);
        }
        if (cfg.dpdk) {
#if TERN_HAVE_DPDK
            ha::dpdk_io_config dc;
            dc.eal_args = cfg.dpdk_args;
            if (dc.eal_args.empty()) {
                unsigned ncpu = std::max(1u, std::thread::hardware_concurrency());
                dc.eal_args = "--no-huge -m 64 --no-pci --no-shconf --no-telemetry --log-level=lib.eal:notice -l " +
                              std::to_string(ncpu - 1) +
                              " --vdev net_af_packet0,iface=" + cfg.interface;
            }
            dc.src_mac = src_mac;
            // Only the interface's own MAC: under use_vmac the peer's adverts come from the
            // same virtual MAC as ours, and dropping it would hide the peer (split brain).
            // Our own adverts are still filtered by their source address.
            dc.own_macs = {link->mac};
            io = ha::dpdk_io::open(dc, e);
            if (!io) {
                err = "ha.dpdk_args: DPDK did not start (" + dc.eal_args + "): " + e;
                return false;
            }
            backend_name = "dpdk";
#else
            err = "ha.backend: this ternd was built without DPDK";
            return false;
#endif
        } else {
            // Under use_vmac the adverts leave from the vmac too, so their source MAC is the
            // virtual one (RFC 5798 7.3), as keepalived sends them.
            ha::kernel_io_config kc;
            kc.ifname = addr_ifname;
            kc.ifindex = addr_ifindex;
            kc.vrid = cfg.vrid;
            kc.unicast = !cfg.unicast_peers.empty();
            kc.garp_ifindex = addr_ifindex;
            kc.garp_mac = src_mac;
            io = ha::kernel_io::open(kc, e);
            if (!io) {
                err = key + ": \"" + cfg.interface + "\": " + e;
                return false;
            }
            backend_name = "kernel";
        }
        addresses = std::make_unique<ha::netlink_addresses>(addr_ifindex, addr_ifname);
        addresses->set_lifetime(cfg.address_lifetime_s);
        // Renewed five times per lifetime: a late renewal or two never lets it lapse.
        rc.address_renew_ms = ha::millis(cfg.address_lifetime_s) * 1000 / 5;
        rc.vrrp.vrid = cfg.vrid;
        rc.vrrp.priority = cfg.priority;
        rc.vrrp.advert_interval_cs = static_cast<uint16_t>(cfg.advert_interval_ms / 10);
        rc.vrrp.preempt = cfg.preempt;
        rc.vrrp.preempt_delay_ms = cfg.preempt_delay_ms;
        for (const auto& p : cfg.unicast_peers) {
            const auto& sin = reinterpret_cast<const sockaddr_in&>(p.ss);
            rc.unicast_peers.push_back(to_ip(reinterpret_cast<const uint8_t*>(&sin.sin_addr)));
        }
        rc.garp_burst = cfg.garp_burst;
        rc.garp_refresh_ms = cfg.garp_refresh_ms;
        rc.health_priority_drop = static_cast<uint8_t>(cfg.health_priority_drop);
        runner = std::make_unique<ha::runner>(
            rc, *io, *addresses, mono_ms, health, [](bool warning, const std::string& line) {
                if (warning) log::warn("{}", line);
                else log::info("{}", line);
            });
        std::string vips;
        for (const auto& v : rc.addresses)
            vips += (vips.empty() ? "" : ", ") + ip_text(v.address) + "/" + std::to_string(v.prefix);
        log::info("ha: VRID {} on {} ({} backend{}): priority {}, advert interval {} ms, {}, primary {}, "
                  "virtual address(es) {}",
                  cfg.vrid, cfg.interface, backend_name, cfg.use_vmac ? ", vmac " + addr_ifname : std::string(),
                  cfg.priority, cfg.advert_interval_ms,
                  cfg.unicast_peers.empty() ? std::string("multicast 224.0.0.18")
                                            : std::to_string(cfg.unicast_peers.size()) + " unicast peer(s)",
                  ip_text(rc.vrrp.primary), vips);
        runner->set_link_check([this] { return link_state(); });
        runner->start();
        return true;
    }

    // The runner stays (its status is read for the stop summary); it makes no call once
    // run() has returned.
    void close() {
        if (vmac_ifindex) {
            std::string e;
            if (!ha::delete_link(vmac_ifindex, e)) log::warn("ha.use_vmac: removing the vmac interface: {}", e);
            vmac_ifindex = 0;
        }
    }
};

ha_service::ha_service() = default;

ha_service::~ha_service() { stop(); }

bool ha_service::start(const config::ha_settings& h, ha::runner::health_fn health, std::string& err) {
    impl_ = std::make_unique<impl>();
    impl_->cfg = h;
    impl_->health = std::move(health);
    std::promise<std::string> ready;
    auto fut = ready.get_future();
    thread_ = std::thread([this, &ready] {
        pthread_setname_np(pthread_self(), "tern-ha");
        std::string e;
        if (!impl_->open(e)) {
            impl_->close();
            ready.set_value(e);
            return;
        }
        ready.set_value("");
        impl_->runner->run();  // returns after request_stop(), having resigned
        impl_->close();
    });
    err = fut.get();
    if (!err.empty()) {
        thread_.join();
        impl_.reset();
        return false;
    }
    return true;
}

void ha_service::stop() {
    if (!thread_.joinable()) return;
    if (impl_ && impl_->runner) impl_->runner->request_stop();
    thread_.join();
}

const ha::runner_status* ha_service::status() const {
    return impl_ && impl_->runner ? &impl_->runner->status() : nullptr;
}

std::string ha_service::summary() const {
    const auto* s = status();
    if (!s) return "ha: not running";
    return fmt::format(
        "ha: VRID {}: state={} priority={} healthy={} transitions={} became_master={} adverts_sent={} "
        "adverts_received={} adverts_dropped={} garps_sent={} address_errors={}",
        impl_->cfg.vrid, ha::to_string(ha::vrrp_state(s->state.load())), s->priority.load(),
        s->healthy.load() ? "yes" : "no", s->transitions.load(), s->became_master.load(), s->adverts_sent.load(),
        s->adverts_received.load(), s->adverts_dropped.load(), s->garps_sent.load(), s->address_errors.load());
}

}  // namespace tern::server
