#include "ha/vrrp.hh"

#include <algorithm>

namespace tern::ha {

std::string_view to_string(vrrp_state s) {
    switch (s) {
    case vrrp_state::initialize: return "INIT";
    case vrrp_state::backup: return "BACKUP";
    case vrrp_state::master: return "MASTER";
    }
    return "?";
}

std::string_view to_string(transition_reason r) {
    switch (r) {
    case transition_reason::startup_owner: return "address owner (priority 255)";
    case transition_reason::startup: return "startup";
    case transition_reason::master_down: return "master down timer expired";
    case transition_reason::priority_zero_advert: return "master resigned (priority 0)";
    case transition_reason::higher_priority: return "higher priority advert";
    case transition_reason::higher_address: return "equal priority, higher primary address";
    case transition_reason::priority_dropped: return "local priority dropped to 0";
    case transition_reason::shutdown: return "shutdown";
    }
    return "?";
}

millis skew_ms(uint8_t priority, uint16_t interval_cs) {
    return ((256 - millis(priority)) * millis(interval_cs) * 10) / 256;
}

millis master_down_ms(uint8_t priority, uint16_t interval_cs) {
    return 3 * millis(interval_cs) * 10 + skew_ms(priority, interval_cs);
}

vrrp_instance::vrrp_instance(const vrrp_config& config, vrrp_output& out)
    : config_(config), out_(out) {
    config_.advert_interval_cs = std::clamp<uint16_t>(config_.advert_interval_cs, 1,
                                                      max_advert_interval_cs);
    if (config_.priority == 0) config_.priority = 1;
    priority_ = config_.priority;
    master_adver_interval_cs_ = config_.advert_interval_cs;
}

void vrrp_instance::transition(vrrp_state to, transition_reason why) {
    vrrp_state from = state_;
    state_ = to;
    ++counters_.transitions;
    if (to == vrrp_state::master) ++counters_.became_master;
    out_.log_transition(from, to, why);
}

void vrrp_instance::send(uint8_t priority) {
    ++counters_.adverts_sent;
    if (priority == 0) ++counters_.priority_zero_sent;
    out_.send_advert(priority);
}

void vrrp_instance::arm_master_down(millis now) {
    resigned_ = false;
    // A backup at priority 0 (health failure) must never take over: no timer at all.
    if (priority_ == 0) {
        deadline_.reset();
        return;
    }
    deadline_ = now + master_down_ms(priority_, master_adver_interval_cs_);
}

void vrrp_instance::become_master(millis now, transition_reason why) {
    // RFC 5798 6.4.1/6.4.2: send an advert, announce the addresses, arm the advert timer.
    send(priority_);
    out_.add_addresses();
    out_.send_garp_burst();
    deadline_ = now + millis(config_.advert_interval_cs) * 10;
    preempt_since_.reset();
    resigned_ = false;
    transition(vrrp_state::master, why);
}

void vrrp_instance::become_backup(millis now, transition_reason why) {
    if (state_ == vrrp_state::master) out_.remove_addresses();
    arm_master_down(now);
    preempt_since_.reset();
    transition(vrrp_state::backup, why);
}

void vrrp_instance::start(millis now) {
    if (state_ != vrrp_state::initialize) return;
    if (priority_ == 255) {
        become_master(now, transition_reason::startup_owner);
        return;
    }
    master_adver_interval_cs_ = config_.advert_interval_cs;
    become_backup(now, transition_reason::startup);
}

void vrrp_instance::stop(millis now) {
    (void)now;
    if (state_ == vrrp_state::initialize) return;
    if (state_ == vrrp_state::master) {
        // Resign with priority 0 so a backup takes over after its skew alone (RFC 5798 6.4.3).
        send(0);
        out_.remove_addresses();
    }
    deadline_.reset();
    preempt_since_.reset();
    transition(vrrp_state::initialize, transition_reason::shutdown);
}

void vrrp_instance::advert_dropped(drop_reason why) {
    ++counters_.adverts_dropped;
    size_t i = size_t(why);
    if (i < counters_.dropped_by_reason.size()) ++counters_.dropped_by_reason[i];
}

void vrrp_instance::advert_received(millis now, const advert& a, const ip_address& src) {
    ++counters_.adverts_received;
    if (a.priority == 0) ++counters_.priority_zero_received;
    // The filter drops interval 0; clamp anyway so a caller that skipped it cannot make
    // master-down 0.
    uint16_t interval = std::clamp<uint16_t>(a.max_advert_interval_cs, 1, max_advert_interval_cs);

    switch (state_) {
    case vrrp_state::initialize:
        return;

    case vrrp_state::backup: {
        if (a.priority == 0) {
            // The master resigned: wait only the skew so the best backup answers first.
            if (priority_ != 0) {
                deadline_ = now + skew_ms(priority_, master_adver_interval_cs_);
                resigned_ = true;
            }
            return;
        }
        bool lower = a.priority < priority_;
        bool accept = !config_.preempt || !lower;
        if (!accept && config_.preempt_delay_ms > 0) {
            // keepalived: keep deferring to a lower-priority master until the delay has run
            // from the first such advert.
            if (!preempt_since_) preempt_since_ = now;
            accept = now < *preempt_since_ + config_.preempt_delay_ms;
        }
        if (!lower) preempt_since_.reset();
        if (!accept) return;  // ignored: our master-down timer runs out and we preempt
        master_adver_interval_cs_ = interval;
        arm_master_down(now);
        return;
    }

    case vrrp_state::master: {
        if (a.priority == 0) {
            // Another master resigned; assert ourselves at once (RFC 5798 6.4.3).
            send(priority_);
            deadline_ = now + millis(config_.advert_interval_cs) * 10;
            return;
        }
        transition_reason why;
        if (a.priority > priority_) {
            why = transition_reason::higher_priority;
        } else if (a.priority == priority_ && compare(src, config_.primary) > 0) {
            why = transition_reason::higher_address;
        } else {
            // We win. Tell the other router now rather than at our next advert (keepalived
            // does the same), and win the clients back: they may hold its MAC for the address.
            send(priority_);
            deadline_ = now + millis(config_.advert_interval_cs) * 10;
            out_.lower_priority_master_seen();
            return;
        }
        master_adver_interval_cs_ = interval;
        become_backup(now, why);
        return;
    }
    }
}

void vrrp_instance::tick(millis now) {
    if (!deadline_ || now < *deadline_) return;
    switch (state_) {
    case vrrp_state::initialize:
        deadline_.reset();
        return;
    case vrrp_state::backup:
        become_master(now, resigned_ ? transition_reason::priority_zero_advert : transition_reason::master_down);
        return;
    case vrrp_state::master:
        send(priority_);
        deadline_ = now + millis(config_.advert_interval_cs) * 10;
        return;
    }
}

void vrrp_instance::set_priority(millis now, uint8_t priority) {
    if (priority == priority_) return;
    uint8_t old = priority_;
    priority_ = priority;
    switch (state_) {
    case vrrp_state::initialize:
        return;
    case vrrp_state::master:
        if (priority == 0) {
            send(0);
            become_backup(now, transition_reason::priority_dropped);
            return;
        }
        // Tell the backups now, so a better one can preempt without waiting an interval.
        send(priority_);
        deadline_ = now + millis(config_.advert_interval_cs) * 10;
        return;
    case vrrp_state::backup:
        // Leaving priority 0: start waiting for a master again.
        if (old == 0 || priority == 0) arm_master_down(now);
        return;
    }
}

}  // namespace tern::ha
