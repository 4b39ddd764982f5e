#pragma once
// The VRRP runner: one virtual router driven on one thread (ternd's HA thread). It joins
// the pure parts (ha::filter, vrrp_instance) to the effects: a packet_io backend for
// adverts and gratuitous ARPs, an address_control for the virtual addresses, a clock and a
// health check. It owns no socket itself, so the unit tests drive it with a fake backend
// and a fake clock.
//
// Loop (step()): health check when due, vrrp tick, GARP refresh when due, then poll the
// backend until the earliest of those deadlines; each received packet goes through
// ha::filter before the state machine sees it.
//
// Trusts: the backend to hand up only protocol-112 packets with the TTL it saw; the health
// function to be cheap (it is called every health period, 10-100 ms).
// Does not trust: received packets (ha::filter), the peers' advertised intervals.

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "ha/io.hh"
#include "ha/vrrp.hh"

namespace tern::ha {

struct runner_config {
    vrrp_config vrrp;                        // vrrp.primary: the interface's primary IPv4 address
    std::vector<virtual_address> addresses;  // the virtual addresses (all IPv4 for now)
    std::vector<ip_address> unicast_peers;   // empty: multicast to 224.0.0.18
    std::vector<ip_address> own_addresses;   // the interface's addresses: adverts from them are ours
    uint32_t garp_burst = 5;                 // GARPs per address on becoming master
    millis garp_refresh_ms = 60000;          // one more per address this often while master; 0 = off
    uint8_t health_priority_drop = 0;        // unhealthy: 0 = resign (priority 0), N = priority - N
    millis health_period_ms = 0;             // 0: min(advert interval, 100 ms)
    millis address_renew_ms = 0;             // while master, add the addresses again this often; 0 = never
};

// Read by other threads (stop summary, SIGUSR1 stats, metrics); written by the runner only.
struct runner_status {
    std::atomic<uint8_t> state{0};  // vrrp_state
    std::atomic<uint8_t> priority{0};
    std::atomic<bool> healthy{true};
    std::atomic<uint64_t> transitions{0};
    std::atomic<uint64_t> became_master{0};
    std::atomic<uint64_t> adverts_sent{0};
    std::atomic<uint64_t> adverts_received{0};
    std::atomic<uint64_t> adverts_dropped{0};
    std::atomic<uint64_t> garps_sent{0};
    std::atomic<uint64_t> address_errors{0};
    std::atomic<uint64_t> health_changes{0};
};

class runner final : private vrrp_output, private rx_sink {
public:
    // Empty string: healthy. Otherwise why not ("shard 1: spool unwritable").
    using health_fn = std::function<std::string(millis now)>;
    using clock_fn = std::function<millis()>;
    using log_fn = std::function<void(bool warning, const std::string& line)>;
    // Empty string: the link can carry VRRP. Otherwise why not ("eth0: no carrier"). A link
    // fault always means priority 0, whatever health_priority_drop says: a node that cannot
    // reach the segment must not hold the address (keepalived's FAULT state).
    using link_fn = std::function<std::string()>;

    // io, addresses and the functions must outlive the runner.
    runner(const runner_config& cfg, packet_io& io, address_control& addresses, clock_fn clock,
           health_fn health, log_fn log);

    // Before start(): the link check, polled with the health check.
    void set_link_check(link_fn link) { link_ = std::move(link); }

    // Initialize -> Backup (or Master for priority 255). Removes any virtual address left
    // on the interface by an earlier run that died without cleaning up: a backup must not
    // hold the address.
    void start();
    // One loop iteration: at most one poll, bounded by the next deadline.
    void step();
    // Runs step() until request_stop(), then stop(): priority-0 advert if master, addresses
    // removed.
    void run();
    // Thread-safe: makes run() return after resigning.
    void request_stop();
    // Resigns now (priority-0 advert when master) and removes the addresses. Idempotent.
    void stop();

    vrrp_state state() const { return vrrp_.state(); }
    const vrrp_instance& instance() const { return vrrp_; }
    const runner_status& status() const { return status_; }
    const runner_config& config() const { return cfg_; }

private:
    // vrrp_output
    void send_advert(uint8_t priority) override;
    void add_addresses() override;
    void remove_addresses() override;
    void send_garp_burst() override;
    void log_transition(vrrp_state from, vrrp_state to, transition_reason why) override;
    void lower_priority_master_seen() override;
    // rx_sink
    void on_packet(const rx_packet& p) override;

    void check_health(millis now);
    void publish();
    void garps(uint32_t rounds);

    runner_config cfg_;
    packet_io& io_;
    address_control& addr_;
    clock_fn clock_;
    health_fn health_;
    log_fn log_;
    link_fn link_;
    millis last_reassert_garp_ = -1;  // lower_priority_master_seen: at most one burst a second
    vrrp_instance vrrp_;
    std::vector<ip_address> vips_;  // cfg_.addresses' addresses, for the filter and the adverts
    millis health_period_;
    millis next_health_ = 0;
    millis next_garp_ = 0;          // 0: no refresh pending
    millis next_renew_ = 0;         // 0: no renewal pending
    std::string unhealthy_why_;     // empty while healthy
    std::atomic<bool> stop_requested_{false};
    runner_status status_;
};

}  // namespace tern::ha
