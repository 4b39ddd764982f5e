// VRRPv3 state machine with an injected clock and a recording output: one test (or more) per
// bullet of the state-machine list. Time is whatever the test says it is.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "ha/vrrp.hh"

namespace tern::ha {
namespace {

struct recording_output : vrrp_output {
    std::vector<std::string> calls;
    std::vector<int> priorities;
    std::vector<transition_reason> reasons;
    void send_advert(uint8_t p) override {
        calls.push_back("advert " + std::to_string(p));
        priorities.push_back(p);
    }
    void add_addresses() override { calls.push_back("add"); }
    void remove_addresses() override { calls.push_back("remove"); }
    void send_garp_burst() override { calls.push_back("garp"); }
    void log_transition(vrrp_state from, vrrp_state to, transition_reason why) override {
        calls.push_back(std::string(to_string(from)) + "->" + std::string(to_string(to)));
        reasons.push_back(why);
    }
    void lower_priority_master_seen() override { calls.push_back("lower master"); }
};

const ip_address low_ip = ip_address::v4(198, 18, 0, 1);
const ip_address high_ip = ip_address::v4(198, 18, 0, 2);

vrrp_config cfg(uint8_t priority, uint16_t interval_cs = 100, bool preempt = true,
                millis delay = 0, ip_address primary = low_ip) {
    vrrp_config c;
    c.vrid = 51;
    c.priority = priority;
    c.advert_interval_cs = interval_cs;
    c.preempt = preempt;
    c.preempt_delay_ms = delay;
    c.primary = primary;
    return c;
}

advert adv(uint8_t priority, uint16_t interval_cs = 100) {
    advert a;
    a.vrid = 51;
    a.priority = priority;
    a.max_advert_interval_cs = interval_cs;
    a.count = 1;
    a.addresses[0] = ip_address::v4(198, 18, 0, 100);
    return a;
}

// --- timing figures (RFC 5798 6.1) -----------------------------------------------------------

TEST(ha_vrrp, master_down_interval_exact_figures_at_1s) {
    // skew = ((256 - p) * 1000 ms) / 256, truncated.
    EXPECT_EQ(skew_ms(100, 100), 609);  // 609.375
    EXPECT_EQ(master_down_ms(100, 100), 3609);
    EXPECT_EQ(skew_ms(200, 100), 218);  // 218.75
    EXPECT_EQ(master_down_ms(200, 100), 3218);
    EXPECT_EQ(skew_ms(254, 100), 7);  // 7.8125
    EXPECT_EQ(master_down_ms(254, 100), 3007);
    EXPECT_EQ(skew_ms(1, 100), 996);  // 996.09
    EXPECT_EQ(master_down_ms(1, 100), 3996);
    EXPECT_EQ(skew_ms(255, 100), 3);
}

TEST(ha_vrrp, master_down_interval_at_10ms) {
    EXPECT_EQ(skew_ms(100, 1), 6);  // 6.09: centisecond arithmetic would give 0
    EXPECT_EQ(master_down_ms(100, 1), 36);
    EXPECT_EQ(skew_ms(200, 1), 2);
    EXPECT_EQ(master_down_ms(200, 1), 32);
    EXPECT_EQ(master_down_ms(255, 1), 30);
    // Higher priority always times out no later than lower priority.
    for (int p = 1; p < 255; ++p) EXPECT_LE(master_down_ms(p + 1, 1), master_down_ms(p, 1));
}

TEST(ha_vrrp, backup_becomes_master_exactly_at_master_down) {
    recording_output out;
    vrrp_instance v(cfg(100), out);
    v.start(1000);
    EXPECT_EQ(v.state(), vrrp_state::backup);
    ASSERT_TRUE(v.next_deadline());
    EXPECT_EQ(*v.next_deadline(), 1000 + 3609);
    v.tick(1000 + 3608);
    EXPECT_EQ(v.state(), vrrp_state::backup);
    v.tick(1000 + 3609);
    EXPECT_EQ(v.state(), vrrp_state::master);
    EXPECT_EQ(out.calls, (std::vector<std::string>{"INIT->BACKUP", "advert 100", "add", "garp",
                                                   "BACKUP->MASTER"}));
    EXPECT_EQ(out.reasons.back(), transition_reason::master_down);
    EXPECT_EQ(*v.next_deadline(), 1000 + 3609 + 1000);
}

TEST(ha_vrrp, advert_interval_10ms_master_sends_every_10ms) {
    recording_output out;
    vrrp_instance v(cfg(255, 1), out);
    v.start(0);
    ASSERT_EQ(v.state(), vrrp_state::master);
    for (millis t = 10; t <= 100; t += 10) {
        EXPECT_EQ(*v.next_deadline(), t);
        v.tick(t);
    }
    EXPECT_EQ(v.counters().adverts_sent, 11u);  // one on becoming master, ten on the timer
}

TEST(ha_vrrp, advert_interval_10ms_backup_learns_interval_from_master) {
    recording_output out;
    vrrp_instance v(cfg(100, 100), out);  // configured 1 s, but the master says 10 ms
    v.start(0);
    v.advert_received(5, adv(200, 1), high_ip);
    EXPECT_EQ(v.master_advert_interval_cs(), 1);
    EXPECT_EQ(*v.next_deadline(), 5 + 36);
    v.tick(40);
    EXPECT_EQ(v.state(), vrrp_state::backup);
    v.tick(41);
    EXPECT_EQ(v.state(), vrrp_state::master);
}

TEST(ha_vrrp, adverts_from_master_keep_backup_down) {
    recording_output out;
    vrrp_instance v(cfg(100), out);
    v.start(0);
    for (millis t = 1000; t <= 20000; t += 1000) {
        v.advert_received(t, adv(150), high_ip);
        v.tick(t);
    }
    EXPECT_EQ(v.state(), vrrp_state::backup);
    EXPECT_EQ(*v.next_deadline(), 20000 + 3609);
    EXPECT_EQ(v.counters().adverts_received, 20u);
}

// --- priority 255 ----------------------------------------------------------------------------

TEST(ha_vrrp, priority_255_owner_goes_straight_to_master) {
    recording_output out;
    vrrp_instance v(cfg(255), out);
    v.start(0);
    EXPECT_EQ(v.state(), vrrp_state::master);
    EXPECT_EQ(out.calls,
              (std::vector<std::string>{"advert 255", "add", "garp", "INIT->MASTER"}));
    EXPECT_EQ(out.reasons.back(), transition_reason::startup_owner);
    EXPECT_EQ(*v.next_deadline(), 1000);
}

TEST(ha_vrrp, priority_254_waits_in_backup_at_startup) {
    recording_output out;
    vrrp_instance v(cfg(254), out);
    v.start(0);
    EXPECT_EQ(v.state(), vrrp_state::backup);
    EXPECT_EQ(*v.next_deadline(), 3007);
}

TEST(ha_vrrp, owner_preempts_a_lower_master_at_once) {
    recording_output out;
    vrrp_instance v(cfg(200), out);
    v.start(0);
    v.tick(3218);
    ASSERT_EQ(v.state(), vrrp_state::master);
    v.advert_received(3300, adv(255), high_ip);
    EXPECT_EQ(v.state(), vrrp_state::backup);
    EXPECT_EQ(out.calls.back(), "MASTER->BACKUP");
    EXPECT_EQ(out.calls[out.calls.size() - 2], "remove");
}

// --- preemption ------------------------------------------------------------------------------

TEST(ha_vrrp, preempt_on_backup_ignores_lower_master_and_takes_over) {
    recording_output out;
    vrrp_instance v(cfg(200, 100, true), out);
    v.start(0);
    v.advert_received(500, adv(100), high_ip);  // ignored: we are better
    EXPECT_EQ(*v.next_deadline(), 3218);
    v.advert_received(1500, adv(100), high_ip);
    v.tick(3218);
    EXPECT_EQ(v.state(), vrrp_state::master);
}

TEST(ha_vrrp, preempt_off_backup_defers_to_lower_master) {
    recording_output out;
    vrrp_instance v(cfg(200, 100, false), out);
    v.start(0);
    for (millis t = 500; t <= 30500; t += 1000) {
        v.advert_received(t, adv(100), high_ip);
        v.tick(t);
    }
    EXPECT_EQ(v.state(), vrrp_state::backup);
    EXPECT_EQ(*v.next_deadline(), 30500 + 3218);
    // When the lower master goes silent, preempt off still takes over on master-down.
    v.tick(30500 + 3218);
    EXPECT_EQ(v.state(), vrrp_state::master);
}

TEST(ha_vrrp, preempt_delay_defers_then_takes_over) {
    recording_output out;
    vrrp_instance v(cfg(200, 100, true, 5000), out);
    v.start(0);
    // Lower master adverts every second from t=500. The first starts the 5 s delay; adverts
    // before t=5500 are accepted, later ones ignored.
    millis t = 500;
    for (; t < 5500; t += 1000) {
        v.advert_received(t, adv(100), high_ip);
        v.tick(t);
        EXPECT_EQ(v.state(), vrrp_state::backup) << t;
        EXPECT_EQ(*v.next_deadline(), t + 3218) << t;
    }
    // t = 5500: delay over, advert ignored; deadline stays at 4500 + 3218.
    for (; t < 7718; t += 1000) {
        v.advert_received(t, adv(100), high_ip);
        v.tick(t);
        EXPECT_EQ(v.state(), vrrp_state::backup) << t;
        EXPECT_EQ(*v.next_deadline(), 4500 + 3218) << t;
    }
    v.tick(7718);
    EXPECT_EQ(v.state(), vrrp_state::master);
}

TEST(ha_vrrp, preempt_delay_restarts_after_a_higher_master) {
    recording_output out;
    vrrp_instance v(cfg(200, 100, true, 5000), out);
    v.start(0);
    v.advert_received(500, adv(100), high_ip);    // delay starts at 500
    v.advert_received(1500, adv(250), high_ip);   // a better master: delay cancelled
    v.advert_received(6000, adv(100), high_ip);   // delay starts again at 6000
    EXPECT_EQ(*v.next_deadline(), 6000 + 3218);   // accepted, not ignored
    v.advert_received(10999, adv(100), high_ip);
    EXPECT_EQ(*v.next_deadline(), 10999 + 3218);
    v.advert_received(11000, adv(100), high_ip);  // ignored now
    EXPECT_EQ(*v.next_deadline(), 10999 + 3218);
}

TEST(ha_vrrp, preempt_delay_does_not_delay_a_dead_master) {
    recording_output out;
    vrrp_instance v(cfg(200, 100, true, 60000), out);
    v.start(0);
    v.tick(3218);  // nobody there: master-down alone
    EXPECT_EQ(v.state(), vrrp_state::master);
}

// --- shutdown and priority 0 -----------------------------------------------------------------

TEST(ha_vrrp, shutdown_sends_priority_zero_and_removes_addresses) {
    recording_output out;
    vrrp_instance v(cfg(255), out);
    v.start(0);
    out.calls.clear();
    v.stop(500);
    EXPECT_EQ(v.state(), vrrp_state::initialize);
    EXPECT_EQ(out.calls, (std::vector<std::string>{"advert 0", "remove", "MASTER->INIT"}));
    EXPECT_FALSE(v.next_deadline());
    EXPECT_EQ(v.counters().priority_zero_sent, 1u);
}

TEST(ha_vrrp, priority_zero_advert_makes_backup_take_over_after_skew_alone) {
    recording_output out;
    vrrp_instance v(cfg(100), out);
    v.start(0);
    v.advert_received(1000, adv(200), high_ip);
    EXPECT_EQ(*v.next_deadline(), 1000 + 3609);
    v.advert_received(1500, adv(0), high_ip);
    EXPECT_EQ(*v.next_deadline(), 1500 + 609);  // skew only, not 3 intervals
    v.tick(1500 + 608);
    EXPECT_EQ(v.state(), vrrp_state::backup);
    v.tick(1500 + 609);
    EXPECT_EQ(v.state(), vrrp_state::master);
    EXPECT_EQ(out.reasons.back(), transition_reason::priority_zero_advert);  // the log says why
}

TEST(ha_vrrp, an_advert_after_priority_zero_restores_the_plain_master_down_reason) {
    recording_output out;
    vrrp_instance v(cfg(100), out);
    v.start(0);
    v.advert_received(1000, adv(0), high_ip);
    v.advert_received(1100, adv(200), high_ip);  // a new master appeared within the skew
    EXPECT_EQ(*v.next_deadline(), 1100 + 3609);
    v.tick(1100 + 3609);
    EXPECT_EQ(out.reasons.back(), transition_reason::master_down);
}

TEST(ha_vrrp, two_machines_hand_over_on_shutdown) {
    // Master A (priority 200) and backup B (100) wired back to back through the test.
    recording_output oa, ob;
    vrrp_instance a(cfg(200, 1, true, 0, high_ip), oa);
    vrrp_instance b(cfg(100, 1, true, 0, low_ip), ob);
    a.start(0);
    b.start(0);
    a.tick(32);
    ASSERT_EQ(a.state(), vrrp_state::master);
    b.advert_received(32, adv(200, 1), high_ip);
    a.stop(35);
    ASSERT_EQ(oa.priorities.back(), 0);
    b.advert_received(35, adv(0, 1), high_ip);
    EXPECT_EQ(*b.next_deadline(), 35 + 6);
    b.tick(41);
    EXPECT_EQ(b.state(), vrrp_state::master);
}

TEST(ha_vrrp, master_hearing_priority_zero_asserts_itself) {
    recording_output out;
    vrrp_instance v(cfg(255), out);
    v.start(0);
    v.advert_received(400, adv(0), high_ip);
    EXPECT_EQ(v.state(), vrrp_state::master);
    EXPECT_EQ(out.priorities.back(), 255);
    EXPECT_EQ(*v.next_deadline(), 1400);
}

// --- demotion and tie-break ------------------------------------------------------------------

TEST(ha_vrrp, higher_priority_advert_demotes_master) {
    recording_output out;
    vrrp_instance v(cfg(100), out);
    v.start(0);
    v.tick(3609);
    ASSERT_EQ(v.state(), vrrp_state::master);
    v.advert_received(4000, adv(101, 50), high_ip);
    EXPECT_EQ(v.state(), vrrp_state::backup);
    EXPECT_EQ(out.reasons.back(), transition_reason::higher_priority);
    // Master-down now uses the new master's interval: 3 * 500 + (156 * 500) / 256 = 1804.
    EXPECT_EQ(*v.next_deadline(), 4000 + 1804);
}

TEST(ha_vrrp, lower_priority_advert_does_not_demote_master) {
    recording_output out;
    vrrp_instance v(cfg(100), out);
    v.start(0);
    v.tick(3609);
    v.advert_received(4000, adv(99), high_ip);
    EXPECT_EQ(v.state(), vrrp_state::master);
}

TEST(ha_vrrp, equal_priority_higher_source_address_wins) {
    recording_output out;
    vrrp_instance v(cfg(100, 100, true, 0, low_ip), out);
    v.start(0);
    v.tick(3609);
    ASSERT_EQ(v.state(), vrrp_state::master);
    v.advert_received(4000, adv(100), high_ip);
    EXPECT_EQ(v.state(), vrrp_state::backup);
    EXPECT_EQ(out.reasons.back(), transition_reason::higher_address);
}

TEST(ha_vrrp, equal_priority_lower_source_address_loses) {
    recording_output out;
    vrrp_instance v(cfg(100, 100, true, 0, high_ip), out);
    v.start(0);
    v.tick(3609);
    v.advert_received(4000, adv(100), low_ip);
    EXPECT_EQ(v.state(), vrrp_state::master);
}

TEST(ha_vrrp, split_brain_heals_to_one_master) {
    recording_output oa, ob;
    vrrp_instance a(cfg(100, 1, true, 0, low_ip), oa);
    vrrp_instance b(cfg(100, 1, true, 0, high_ip), ob);
    a.start(0);
    b.start(0);
    a.tick(36);
    b.tick(36);
    ASSERT_EQ(a.state(), vrrp_state::master);
    ASSERT_EQ(b.state(), vrrp_state::master);
    // The link comes back: each hears the other's advert.
    a.advert_received(40, adv(100, 1), high_ip);
    b.advert_received(40, adv(100, 1), low_ip);
    EXPECT_EQ(a.state(), vrrp_state::backup);
    EXPECT_EQ(b.state(), vrrp_state::master);
}

// --- health tracking -------------------------------------------------------------------------

TEST(ha_vrrp, priority_zero_from_health_resigns_and_stays_down) {
    recording_output out;
    vrrp_instance v(cfg(255), out);
    v.start(0);
    out.calls.clear();
    v.set_priority(100, 0);
    EXPECT_EQ(v.state(), vrrp_state::backup);
    EXPECT_EQ(out.calls, (std::vector<std::string>{"advert 0", "remove", "MASTER->BACKUP"}));
    EXPECT_EQ(out.reasons.back(), transition_reason::priority_dropped);
    EXPECT_FALSE(v.next_deadline());
    v.tick(1000000);
    EXPECT_EQ(v.state(), vrrp_state::backup);
    // Healthy again: waits a master-down interval, then takes over.
    v.set_priority(2000000, 150);
    ASSERT_TRUE(v.next_deadline());
    EXPECT_EQ(*v.next_deadline(), 2000000 + master_down_ms(150, 100));
}

TEST(ha_vrrp, lowered_priority_is_advertised_at_once_and_lets_backup_preempt) {
    recording_output oa, ob;
    vrrp_instance a(cfg(200, 100, true, 0, high_ip), oa);
    vrrp_instance b(cfg(150, 100, true, 0, low_ip), ob);
    a.start(0);
    b.start(0);
    a.tick(3218);
    b.advert_received(3218, adv(200), high_ip);
    a.set_priority(3500, 100);
    EXPECT_EQ(oa.priorities.back(), 100);
    EXPECT_EQ(a.state(), vrrp_state::master);
    b.advert_received(3500, adv(100), high_ip);  // preempt on: ignored
    b.tick(3218 + master_down_ms(150, 100));
    EXPECT_EQ(b.state(), vrrp_state::master);
    a.advert_received(6500, adv(150), low_ip);
    EXPECT_EQ(a.state(), vrrp_state::backup);
}

// --- counters and idempotence ----------------------------------------------------------------

TEST(ha_vrrp, counters_and_drops) {
    recording_output out;
    vrrp_instance v(cfg(100), out);
    v.start(0);
    v.advert_dropped(drop_reason::bad_ttl);
    v.advert_dropped(drop_reason::bad_ttl);
    v.advert_dropped(drop_reason::own_packet);
    EXPECT_EQ(v.counters().adverts_dropped, 3u);
    EXPECT_EQ(v.counters().dropped_by_reason[size_t(drop_reason::bad_ttl)], 2u);
    EXPECT_EQ(v.counters().dropped_by_reason[size_t(drop_reason::own_packet)], 1u);
    v.tick(3609);
    v.stop(4000);
    EXPECT_EQ(v.counters().transitions, 3u);
    EXPECT_EQ(v.counters().became_master, 1u);
}

TEST(ha_vrrp, early_ticks_and_repeated_calls_change_nothing) {
    recording_output out;
    vrrp_instance v(cfg(100), out);
    v.tick(0);  // before start: no timer
    v.advert_received(0, adv(200), high_ip);
    EXPECT_EQ(v.state(), vrrp_state::initialize);
    v.start(0);
    v.start(10);
    EXPECT_EQ(v.counters().transitions, 1u);
    v.tick(100);
    v.tick(100);
    EXPECT_EQ(v.state(), vrrp_state::backup);
    v.stop(200);
    v.stop(300);
    EXPECT_EQ(v.counters().transitions, 2u);
    // Restart after stop works.
    v.start(400);
    EXPECT_EQ(v.state(), vrrp_state::backup);
}

}  // namespace
}  // namespace tern::ha

namespace tern::ha {
namespace {
TEST(ha_vrrp, master_hearing_a_lower_master_reasserts_at_once_and_reannounces) {
    recording_output out;
    vrrp_instance v(cfg(200), out);
    v.start(0);
    v.tick(3609);
    ASSERT_EQ(v.state(), vrrp_state::master);
    out.calls.clear();
    v.advert_received(3700, adv(100), high_ip);  // healed split brain: the other master is worse
    EXPECT_EQ(v.state(), vrrp_state::master);
    ASSERT_EQ(out.calls.size(), 2u);
    EXPECT_EQ(out.calls[0], "advert 200");  // it learns now, not at our next interval
    EXPECT_EQ(out.calls[1], "lower master");
    EXPECT_EQ(*v.next_deadline(), 3700 + 1000);
}
}  // namespace
}  // namespace tern::ha
