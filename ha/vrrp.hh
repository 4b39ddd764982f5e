#pragma once
// VRRPv3 state machine (RFC 5798 section 6.4 as corrected by RFC 9568) for one virtual router,
// as a pure component: time comes in as an argument (milliseconds from any monotonic origin)
// and every effect goes out through vrrp_output. It opens no socket and reads no clock, so the
// unit tests drive it deterministically; the backend thread owns the real timer and socket.
//
// Trusts: the adverts it is given have passed ha::filter (TTL, checksum, VRID, address list,
// not our own). Trusts the caller to call tick() at or soon after next_deadline().
// Does not trust: the advertised interval or priority beyond their wire ranges.
//
// Timing (RFC 5798 6.1 with RFC 9568's use of Master_Adver_Interval in the skew):
//   skew_ms        = ((256 - priority) * interval_ms) / 256, truncated to whole ms
//   master_down_ms = 3 * interval_ms + skew_ms
// with interval_ms = 10 * centiseconds. The RFC states the formula in centiseconds; evaluating
// it in ms keeps the sub-centisecond part that a 10 ms interval would otherwise lose (at
// 10 ms and priority 100 the skew is 6 ms, where centisecond arithmetic would give 0 and every
// backup would time out together).
//
// Preempt delay follows keepalived: a backup with preempt on that hears a lower-priority
// master keeps accepting its adverts until preempt_delay has passed since the first of them,
// then ignores them, so the master-down timer runs out and it takes over. A higher-priority
// advert cancels the pending delay.

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>

#include "ha/packet.hh"

namespace tern::ha {

using millis = int64_t;

enum class vrrp_state : uint8_t { initialize, backup, master };
std::string_view to_string(vrrp_state s);

enum class transition_reason : uint8_t {
    startup_owner,        // priority 255: address owner goes straight to master
    startup,              // start() into backup
    master_down,          // master-down timer ran out (no master, or we preempt)
    priority_zero_advert, // master resigned; we waited only the skew
    higher_priority,      // an advert with a higher priority demoted us
    higher_address,       // equal priority, the sender's primary address is higher
    priority_dropped,     // health tracking set our priority to 0: give up mastership
    shutdown,             // stop()
};
std::string_view to_string(transition_reason r);

// Effects the state machine asks for. The backend implements these; tests record them.
class vrrp_output {
public:
    virtual ~vrrp_output() = default;
    virtual void send_advert(uint8_t priority) = 0;
    virtual void add_addresses() = 0;
    virtual void remove_addresses() = 0;
    virtual void send_garp_burst() = 0;
    virtual void log_transition(vrrp_state from, vrrp_state to, transition_reason why) = 0;
    // As master we heard another master with a lower priority (a healed split brain, or a
    // peer back from a link cut). Clients may have followed its gratuitous ARPs: announce
    // the addresses again. The backend rate-limits; default: nothing.
    virtual void lower_priority_master_seen() {}
};

struct vrrp_config {
    uint8_t vrid = 1;
    // 1..255; 255 means we own the addresses. 0 is reserved for "resigning" on the wire.
    uint8_t priority = 100;
    // Centiseconds, 1..4095. Default 100 (1 s, RFC 5798). 1 cs = 10 ms is the fastest.
    uint16_t advert_interval_cs = 100;
    bool preempt = true;         // default true (RFC 5798 Preempt_Mode)
    millis preempt_delay_ms = 0; // default 0: preempt as soon as master-down runs out
    ip_address primary;          // our primary address, for the equal-priority tie-break
};

struct vrrp_counters {
    uint64_t transitions = 0;
    uint64_t became_master = 0;
    uint64_t adverts_sent = 0;
    uint64_t adverts_received = 0;
    uint64_t adverts_dropped = 0;
    uint64_t priority_zero_sent = 0;
    uint64_t priority_zero_received = 0;
    std::array<uint64_t, size_t(drop_reason::count_)> dropped_by_reason{};
};

// RFC 5798 6.1 timings in ms (see the header comment for rounding).
millis skew_ms(uint8_t priority, uint16_t interval_cs);
millis master_down_ms(uint8_t priority, uint16_t interval_cs);

class vrrp_instance {
public:
    // The output must outlive the instance. config.advert_interval_cs is clamped to 1..4095
    // and priority 0 is raised to 1; validation with a clear message belongs to config parsing.
    vrrp_instance(const vrrp_config& config, vrrp_output& out);

    void start(millis now);
    void stop(millis now);
    // An advert that passed ha::filter, with the IP source address it came from.
    void advert_received(millis now, const advert& a, const ip_address& src);
    // Counts an advert that ha::filter refused; the state does not change.
    void advert_dropped(drop_reason why);
    // Fires due timers. Calling it early or twice is harmless.
    void tick(millis now);
    // Health tracking: change the priority we advertise and compare with. 0 gives up
    // mastership at once with a priority-0 advert and keeps us from taking over until the
    // priority is raised again. Raising a backup to 255 does not make it master at once: the
    // address-owner shortcut applies at start() only, as in RFC 5798 6.4.1.
    void set_priority(millis now, uint8_t priority);

    vrrp_state state() const { return state_; }
    uint8_t priority() const { return priority_; }
    // When tick() must next be called, or nullopt when no timer runs.
    std::optional<millis> next_deadline() const { return deadline_; }
    // The interval learnt from the current master (centiseconds), used in our master-down.
    uint16_t master_advert_interval_cs() const { return master_adver_interval_cs_; }
    const vrrp_counters& counters() const { return counters_; }

private:
    void become_master(millis now, transition_reason why);
    void become_backup(millis now, transition_reason why);
    void transition(vrrp_state to, transition_reason why);
    void send(uint8_t priority);
    void arm_master_down(millis now);

    vrrp_config config_;
    vrrp_output& out_;
    vrrp_state state_ = vrrp_state::initialize;
    uint8_t priority_;
    uint16_t master_adver_interval_cs_;
    std::optional<millis> deadline_;
    // keepalived-style preempt delay: when we first heard a lower-priority master.
    std::optional<millis> preempt_since_;
    // The running deadline is the skew after a priority-0 advert (for the transition's reason).
    bool resigned_ = false;
    vrrp_counters counters_;
};

}  // namespace tern::ha
