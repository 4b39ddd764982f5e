#include "ha/runner.hh"

#include <algorithm>
#include <array>
#include <cstdio>

namespace tern::ha {

namespace {

std::string format_ip(const ip_address& a) {
    char buf[64];
    if (a.family == ip_family::ipv4) {
        snprintf(buf, sizeof buf, "%u.%u.%u.%u", a.bytes[0], a.bytes[1], a.bytes[2], a.bytes[3]);
        return buf;
    }
    std::string s;
    for (size_t i = 0; i < 16; i += 2) {
        snprintf(buf, sizeof buf, "%s%x", i ? ":" : "", unsigned(a.bytes[i]) << 8 | a.bytes[i + 1]);
        s += buf;
    }
    return s;
}

}  // namespace

runner::runner(const runner_config& cfg, packet_io& io, address_control& addresses, clock_fn clock,
               health_fn health, log_fn log)
    : cfg_(cfg),
      io_(io),
      addr_(addresses),
      clock_(std::move(clock)),
      health_(std::move(health)),
      log_(std::move(log)),
      vrrp_(cfg.vrrp, *this) {
    for (const auto& v : cfg_.addresses) vips_.push_back(v.address);
    millis interval = millis(cfg_.vrrp.advert_interval_cs) * 10;
    health_period_ = cfg_.health_period_ms > 0 ? cfg_.health_period_ms : std::min<millis>(interval, 100);
    publish();
}

void runner::publish() {
    status_.state.store(uint8_t(vrrp_.state()), std::memory_order_relaxed);
    status_.priority.store(vrrp_.priority(), std::memory_order_relaxed);
    const auto& c = vrrp_.counters();
    status_.transitions.store(c.transitions, std::memory_order_relaxed);
    status_.became_master.store(c.became_master, std::memory_order_relaxed);
    status_.adverts_sent.store(c.adverts_sent, std::memory_order_relaxed);
    status_.adverts_received.store(c.adverts_received, std::memory_order_relaxed);
    status_.adverts_dropped.store(c.adverts_dropped, std::memory_order_relaxed);
}

void runner::start() {
    // A backup must not hold the address: a previous ternd killed with -9 as master left it
    // on the interface, and two nodes answering ARP for it is the split brain VRRP prevents.
    if (!addr_.remove(cfg_.addresses)) {
        status_.address_errors.fetch_add(1, std::memory_order_relaxed);
        log_(true, "ha: VRID " + std::to_string(cfg_.vrrp.vrid) + ": " + addr_.error());
    }
    millis now = clock_();
    check_health(now);
    vrrp_.start(now);
    publish();
}

void runner::check_health(millis now) {
    next_health_ = now + health_period_;
    if (!health_ && !link_) return;
    bool link_fault = false;
    std::string why;
    if (link_) {
        why = link_();
        link_fault = !why.empty();
    }
    if (why.empty() && health_) why = health_(now);
    if (why == unhealthy_why_) return;
    bool was_healthy = unhealthy_why_.empty();
    unhealthy_why_ = why;
    status_.healthy.store(why.empty(), std::memory_order_relaxed);
    status_.health_changes.fetch_add(1, std::memory_order_relaxed);
    uint8_t base = cfg_.vrrp.priority;
    uint8_t prio = base;
    std::string vrid = "ha: VRID " + std::to_string(cfg_.vrrp.vrid) + ": ";
    if (!why.empty()) {
        prio = link_fault || cfg_.health_priority_drop == 0 ? 0
               : base > cfg_.health_priority_drop ? uint8_t(base - cfg_.health_priority_drop)
                                                  : uint8_t(1);
        log_(true, vrid + "unhealthy: " + why +
                       (prio == 0 ? ": giving up mastership (priority 0)"
                                  : ": priority " + std::to_string(base) + " -> " + std::to_string(prio)));
    } else if (!was_healthy) {
        log_(false, vrid + "healthy again: priority " + std::to_string(prio));
    }
    vrrp_.set_priority(now, prio);
    publish();
}

void runner::step() {
    millis now = clock_();
    if (now >= next_health_) check_health(now);
    vrrp_.tick(now);
    if (next_garp_ && now >= next_garp_ && vrrp_.state() == vrrp_state::master) {
        garps(1);
        next_garp_ = now + cfg_.garp_refresh_ms;
    }
    if (next_renew_ && now >= next_renew_ && vrrp_.state() == vrrp_state::master) {
        add_addresses();
        next_renew_ = now + cfg_.address_renew_ms;
    }
    publish();
    millis next = next_health_;
    if (next_renew_ && vrrp_.state() == vrrp_state::master) next = std::min(next, next_renew_);
    if (auto d = vrrp_.next_deadline()) next = std::min(next, *d);
    if (next_garp_ && vrrp_.state() == vrrp_state::master) next = std::min(next, next_garp_);
    now = clock_();
    io_.poll(std::max<millis>(0, next - now), *this);
    publish();
}

void runner::run() {
    while (!stop_requested_.load(std::memory_order_acquire)) step();
    stop();
}

void runner::request_stop() {
    stop_requested_.store(true, std::memory_order_release);
    io_.wake();
}

void runner::stop() {
    vrrp_.stop(clock_());
    next_garp_ = 0;
    publish();
}

void runner::on_packet(const rx_packet& p) {
    local_view us;
    us.vrid = cfg_.vrrp.vrid;
    us.own_addresses = cfg_.own_addresses;
    us.virtual_addresses = vips_;
    advert a;
    drop_reason r = filter(p.ttl, p.src, p.dst, p.payload, us, a);
    if (r != drop_reason::accept) {
        vrrp_.advert_dropped(r);
        return;
    }
    vrrp_.advert_received(clock_(), a, p.src);
}

void runner::send_advert(uint8_t priority) {
    advert a;
    a.vrid = cfg_.vrrp.vrid;
    a.priority = priority;
    a.max_advert_interval_cs = cfg_.vrrp.advert_interval_cs;
    a.family = ip_family::ipv4;
    a.count = uint8_t(std::min(vips_.size(), max_advert_addresses));
    for (size_t i = 0; i < a.count; ++i) a.addresses[i] = vips_[i];
    std::array<uint8_t, vrrp_header_size + 16 * max_advert_addresses> buf;
    auto send_to = [&](const ip_address& dst) {
        size_t n = encode(a, cfg_.vrrp.primary, dst, buf);
        if (n) io_.send_advert(std::span<const uint8_t>(buf.data(), n), cfg_.vrrp.primary, dst);
    };
    if (cfg_.unicast_peers.empty()) {
        send_to(vrrp_multicast_v4());
    } else {
        for (const auto& peer : cfg_.unicast_peers) send_to(peer);
    }
}

void runner::add_addresses() {
    if (cfg_.address_renew_ms && !next_renew_) next_renew_ = clock_() + cfg_.address_renew_ms;
    if (!addr_.add(cfg_.addresses)) {
        status_.address_errors.fetch_add(1, std::memory_order_relaxed);
        log_(true, "ha: VRID " + std::to_string(cfg_.vrrp.vrid) + ": " + addr_.error());
    }
}

void runner::remove_addresses() {
    next_garp_ = 0;
    next_renew_ = 0;
    if (!addr_.remove(cfg_.addresses)) {
        status_.address_errors.fetch_add(1, std::memory_order_relaxed);
        log_(true, "ha: VRID " + std::to_string(cfg_.vrrp.vrid) + ": " + addr_.error());
    }
}

void runner::garps(uint32_t rounds) {
    for (uint32_t i = 0; i < rounds; ++i)
        if (io_.send_garp(vips_)) status_.garps_sent.fetch_add(vips_.size(), std::memory_order_relaxed);
}

void runner::send_garp_burst() {
    garps(cfg_.garp_burst);
    next_garp_ = cfg_.garp_refresh_ms ? clock_() + cfg_.garp_refresh_ms : 0;
}

void runner::lower_priority_master_seen() {
    millis now = clock_();
    if (last_reassert_garp_ >= 0 && now < last_reassert_garp_ + 1000) return;
    last_reassert_garp_ = now;
    log_(false, "ha: VRID " + std::to_string(cfg_.vrrp.vrid) +
                    ": another master with a lower priority: announcing the addresses again");
    garps(cfg_.garp_burst);
}

void runner::log_transition(vrrp_state from, vrrp_state to, transition_reason why) {
    std::string vips;
    for (const auto& v : cfg_.addresses)
        vips += (vips.empty() ? "" : " ") + format_ip(v.address) + "/" + std::to_string(v.prefix);
    std::string line = "ha: VRID " + std::to_string(cfg_.vrrp.vrid) + " " + std::string(to_string(from)) +
                       " -> " + std::string(to_string(to)) + " (reason " + std::string(to_string(why)) +
                       ", priority " + std::to_string(vrrp_.priority()) + ")";
    if (to == vrrp_state::master) line += ": holding " + vips;
    if (from == vrrp_state::master) line += ": released " + vips;
    if (why == transition_reason::priority_dropped && !unhealthy_why_.empty()) line += ": " + unhealthy_why_;
    log_(to != vrrp_state::master && from == vrrp_state::master, line);
}

}  // namespace tern::ha
