#pragma once
// ternd's HA thread: one VRRPv3 virtual router ([ha] in the configuration) beside the
// shards. It opens the backend on its own thread (DPDK's EAL makes the calling thread its
// main lcore), runs ha::runner until stop, then resigns with a priority-0 advert and
// removes the virtual addresses.
//
// Trusts: the configuration (validated by src/config) and the health function, which
// reads only atomics the shards publish (spool_healthy, heartbeat_ms).
// Does not trust: the interface to exist or to have an IPv4 address at start: both are
// checked, and failing start ends ternd with one error naming ha.interface.

#include <memory>
#include <string>
#include <thread>

#include "ha/runner.hh"
#include "src/config/config.hh"

namespace tern::server {

class ha_service {
public:
    ha_service();
    ~ha_service();
    ha_service(const ha_service&) = delete;
    ha_service& operator=(const ha_service&) = delete;

    // Starts the thread and waits until the backend is open and the runner has started
    // (Backup, or Master for an owner). On failure returns false with err set; no thread is
    // left running.
    bool start(const config::ha_settings& h, ha::runner::health_fn health, std::string& err);
    // Resigns (priority 0 when master), removes the addresses, joins. Idempotent.
    void stop();
    bool running() const { return thread_.joinable(); }
    // Null before start.
    const ha::runner_status* status() const;
    // One line for the stop summary and SIGUSR1.
    std::string summary() const;

private:
    struct impl;
    std::unique_ptr<impl> impl_;
    std::thread thread_;
};

}  // namespace tern::server
