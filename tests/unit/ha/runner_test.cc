// The VRRP runner over a simulated wire: two (or three) runners with fake backends that
// deliver each other's adverts, one shared fake clock advanced 1 ms at a time, fake address
// control. Proves the glue: filter before the state machine, adverts encoded and sent to the
// right destinations, addresses added and removed with the state, GARP burst and refresh,
// health tracking (resign or lower), stop resigning with priority 0.
#include <gtest/gtest.h>

#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "ha/runner.hh"

namespace tern::ha {
namespace {

const ip_address vip = ip_address::v4(198, 18, 0, 100);

struct wire;

struct fake_io : packet_io {
    wire* w = nullptr;
    ip_address me;
    struct pkt {
        ip_address src, dst;
        uint8_t ttl;
        std::vector<uint8_t> bytes;
    };
    std::deque<pkt> inbox;
    std::vector<pkt> sent;
    std::vector<std::vector<ip_address>> garps;
    std::vector<int64_t> poll_timeouts;
    io_stats st;
    bool woken = false;
    bool link_up = true;
    bool deaf = false;  // hears nothing (a one-way fault)

    bool send_advert(std::span<const uint8_t> vrrp, const ip_address& src, const ip_address& dst) override;
    bool send_garp(std::span<const ip_address> a) override {
        garps.emplace_back(a.begin(), a.end());
        ++st.tx_garps;
        return true;
    }
    void poll(int64_t timeout_ms, rx_sink& sink) override {
        poll_timeouts.push_back(timeout_ms);
        while (!inbox.empty()) {
            pkt p = std::move(inbox.front());
            inbox.pop_front();
            rx_packet r{p.src, p.dst, p.ttl, p.bytes};
            sink.on_packet(r);
        }
    }
    void wake() override { woken = true; }
    const io_stats& stats() const override { return st; }
};

struct wire {
    std::vector<fake_io*> ends;
    void carry(fake_io& from, const fake_io::pkt& p) {
        if (!from.link_up) return;
        for (auto* e : ends) {
            if (e == &from || !e->link_up || e->deaf) continue;
            // Multicast reaches everyone; unicast only its destination.
            if (p.dst == vrrp_multicast_v4() || p.dst == e->me) e->inbox.push_back(p);
        }
    }
};

bool fake_io::send_advert(std::span<const uint8_t> vrrp, const ip_address& src, const ip_address& dst) {
    pkt p{src, dst, 255, {vrrp.begin(), vrrp.end()}};
    sent.push_back(p);
    ++st.tx_adverts;
    if (w) w->carry(*this, p);
    return true;
}

struct fake_addresses : address_control {
    bool held = false;
    int adds = 0, removes = 0;
    bool fail = false;
    std::string err;
    bool add(std::span<const virtual_address>) override {
        ++adds;
        if (fail) {
            err = "add 198.18.0.100/24 on eth0: Operation not permitted";
            return false;
        }
        held = true;
        return true;
    }
    bool remove(std::span<const virtual_address>) override {
        ++removes;
        held = false;
        return true;
    }
    const std::string& error() const override { return err; }
};

struct node {
    fake_io io;
    fake_addresses addr;
    std::string unhealthy;  // what the health function reports
    std::vector<std::string> logs;
    std::unique_ptr<runner> r;
};

struct lab {
    millis now = 1000;
    wire w;
    std::vector<std::unique_ptr<node>> nodes;

    node& add(uint8_t priority, uint8_t last_octet, uint16_t interval_cs = 1, bool preempt = true,
              uint8_t drop = 0, millis garp_refresh = 0) {
        auto n = std::make_unique<node>();
        runner_config c;
        c.vrrp.vrid = 51;
        c.vrrp.priority = priority;
        c.vrrp.advert_interval_cs = interval_cs;
        c.vrrp.preempt = preempt;
        c.vrrp.primary = ip_address::v4(198, 18, 0, last_octet);
        c.addresses = {{vip, 24}};
        c.own_addresses = {c.vrrp.primary};
        c.garp_burst = 3;
        c.garp_refresh_ms = garp_refresh;
        c.health_priority_drop = drop;
        n->io.w = &w;
        n->io.me = c.vrrp.primary;
        w.ends.push_back(&n->io);
        node* np = n.get();
        n->r = std::make_unique<runner>(
            c, n->io, n->addr, [this] { return now; },
            [np](millis) { return np->unhealthy; },
            [np](bool, const std::string& line) { np->logs.push_back(line); });
        nodes.push_back(std::move(n));
        return *nodes.back();
    }
    void start() {
        for (auto& n : nodes) n->r->start();
    }
    // Advances the clock 1 ms at a time, stepping every runner at each ms.
    void run_for(millis ms) {
        for (millis i = 0; i < ms; ++i) {
            ++now;
            for (auto& n : nodes) n->r->step();
        }
    }
    int masters() const {
        int m = 0;
        for (auto& n : nodes) m += n->r->state() == vrrp_state::master;
        return m;
    }
};

bool has_log(const node& n, const std::string& needle) {
    for (auto& l : n.logs)
        if (l.find(needle) != std::string::npos) return true;
    return false;
}

TEST(ha_runner, higher_priority_becomes_master_and_holds_the_address) {
    lab l;
    auto& a = l.add(200, 11);
    auto& b = l.add(100, 12);
    l.start();
    l.run_for(100);
    EXPECT_EQ(a.r->state(), vrrp_state::master);
    EXPECT_EQ(b.r->state(), vrrp_state::backup);
    EXPECT_TRUE(a.addr.held);
    EXPECT_FALSE(b.addr.held);
    EXPECT_EQ(l.masters(), 1);
    EXPECT_TRUE(has_log(a, "ha: VRID 51 BACKUP -> MASTER (reason master down timer expired"));
    // The master's adverts go to 224.0.0.18 with its primary address and pass the peer's
    // filter: the backup counts them as received, none dropped.
    ASSERT_FALSE(a.io.sent.empty());
    EXPECT_EQ(a.io.sent.back().dst, vrrp_multicast_v4());
    EXPECT_EQ(a.io.sent.back().src, ip_address::v4(198, 18, 0, 11));
    EXPECT_GE(b.r->status().adverts_received.load(), 6u);  // master from 32 ms, one per 10 ms
    EXPECT_EQ(b.r->status().adverts_dropped.load(), 0u);
    // Between adverts the runner sleeps in poll, bounded by the next deadline (10 ms).
    for (auto t : a.io.poll_timeouts) EXPECT_LE(t, 10);
}

TEST(ha_runner, start_removes_an_address_left_by_an_earlier_run) {
    lab l;
    auto& b = l.add(100, 12);
    b.addr.held = true;  // a ternd killed with -9 as master left it on the interface
    l.start();
    EXPECT_FALSE(b.addr.held);
    EXPECT_EQ(b.addr.removes, 1);
}

TEST(ha_runner, link_cut_moves_the_address_and_restore_preempts_back) {
    lab l;
    auto& a = l.add(200, 11);
    auto& b = l.add(100, 12);
    l.start();
    l.run_for(100);
    a.io.link_up = false;
    // Master-down for priority 100 at 10 ms: 3 * 10 + 6 = 36 ms after the last advert.
    l.run_for(50);
    EXPECT_EQ(b.r->state(), vrrp_state::master);
    EXPECT_TRUE(b.addr.held);
    a.io.link_up = true;
    l.run_for(30);
    EXPECT_EQ(a.r->state(), vrrp_state::master);
    EXPECT_EQ(b.r->state(), vrrp_state::backup);
    EXPECT_FALSE(b.addr.held);
    EXPECT_TRUE(has_log(b, "MASTER -> BACKUP (reason higher priority advert"));
}

TEST(ha_runner, no_preempt_keeps_the_current_master) {
    lab l;
    auto& a = l.add(200, 11, 1, /*preempt=*/false);
    auto& b = l.add(100, 12, 1, false);
    l.start();
    l.run_for(100);
    a.io.link_up = false;
    l.run_for(60);
    ASSERT_EQ(b.r->state(), vrrp_state::master);
    a.io.link_up = true;
    l.run_for(100);
    // a was master too during the cut (it heard nothing); on restore the higher priority
    // wins the master-vs-master comparison, as RFC 5798 6.4.3 says: preempt only governs a
    // backup. What must hold is exactly one master once adverts flow again.
    EXPECT_EQ(l.masters(), 1);
}

TEST(ha_runner, no_preempt_backup_does_not_take_over_from_a_lower_master) {
    lab l;
    auto& b = l.add(100, 12, 1, false);
    l.start();
    l.run_for(100);  // alone: becomes master
    ASSERT_EQ(b.r->state(), vrrp_state::master);
    auto& a = l.add(200, 11, 1, false);
    a.r->start();
    l.run_for(200);
    EXPECT_EQ(b.r->state(), vrrp_state::master);
    EXPECT_EQ(a.r->state(), vrrp_state::backup);
    EXPECT_FALSE(a.addr.held);
}

TEST(ha_runner, stop_resigns_with_priority_zero_and_the_backup_takes_over_after_the_skew) {
    lab l;
    auto& a = l.add(200, 11);
    auto& b = l.add(100, 12);
    l.start();
    l.run_for(100);
    a.r->stop();
    EXPECT_EQ(a.r->state(), vrrp_state::initialize);
    EXPECT_FALSE(a.addr.held);
    ASSERT_FALSE(a.io.sent.empty());
    // The last advert carries priority 0 (byte 2 of the VRRP header).
    EXPECT_EQ(a.io.sent.back().bytes[2], 0);
    // Skew for priority 100 at 10 ms: 6 ms. Not yet at 5 ms, master by 7 ms.
    l.nodes.erase(l.nodes.begin());
    l.w.ends.erase(l.w.ends.begin());
    l.run_for(5);
    EXPECT_EQ(b.r->state(), vrrp_state::backup);
    l.run_for(2);
    EXPECT_EQ(b.r->state(), vrrp_state::master);
    EXPECT_TRUE(b.addr.held);
}

TEST(ha_runner, request_stop_ends_run_and_resigns) {
    lab l;
    auto& a = l.add(255, 11);
    l.start();
    ASSERT_EQ(a.r->state(), vrrp_state::master);  // the owner starts as master
    a.r->request_stop();
    EXPECT_TRUE(a.io.woken);
    a.r->run();  // returns at once: the flag is already set
    EXPECT_EQ(a.r->state(), vrrp_state::initialize);
    EXPECT_EQ(a.io.sent.back().bytes[2], 0);
}

TEST(ha_runner, unhealthy_master_resigns_at_once_and_stays_out_until_healthy) {
    lab l;
    auto& a = l.add(200, 11);
    auto& b = l.add(100, 12);
    l.start();
    l.run_for(100);
    a.unhealthy = "shard 0: spool unwritable";
    l.run_for(10);  // health period = min(interval, 100 ms) = 10 ms
    EXPECT_EQ(a.r->state(), vrrp_state::backup);
    EXPECT_FALSE(a.addr.held);
    EXPECT_TRUE(has_log(a, "unhealthy: shard 0: spool unwritable: giving up mastership (priority 0)"));
    EXPECT_TRUE(has_log(a, "MASTER -> BACKUP (reason local priority dropped to 0"));
    l.run_for(10);  // b waits only its skew (6 ms) after the priority-0 advert
    EXPECT_EQ(b.r->state(), vrrp_state::master);
    // a at priority 0 never takes over, even when b goes away.
    b.io.link_up = false;
    l.run_for(200);
    EXPECT_EQ(a.r->state(), vrrp_state::backup);
    EXPECT_FALSE(a.r->status().healthy.load());
    b.io.link_up = true;
    a.unhealthy.clear();
    l.run_for(100);
    EXPECT_TRUE(has_log(a, "healthy again: priority 200"));
    EXPECT_EQ(a.r->state(), vrrp_state::master);  // preempts back at its own priority
    EXPECT_EQ(l.masters(), 1);
}

TEST(ha_runner, unhealthy_with_a_priority_drop_lets_a_better_backup_preempt) {
    lab l;
    auto& a = l.add(200, 11, 1, true, /*drop=*/150);
    auto& b = l.add(100, 12);
    l.start();
    l.run_for(100);
    a.unhealthy = "shard 1: no loop iteration for 1200 ms";
    l.run_for(100);
    EXPECT_TRUE(has_log(a, "priority 200 -> 50"));
    EXPECT_EQ(b.r->state(), vrrp_state::master);
    EXPECT_EQ(a.r->state(), vrrp_state::backup);
    EXPECT_EQ(a.r->status().priority.load(), 50);
}

TEST(ha_runner, unhealthy_at_start_never_becomes_master) {
    lab l;
    auto& a = l.add(255, 11);
    a.unhealthy = "shard 0: spool unwritable";
    l.start();
    l.run_for(500);
    EXPECT_EQ(a.r->state(), vrrp_state::backup);
    EXPECT_FALSE(a.addr.held);
}

TEST(ha_runner, forged_adverts_are_counted_and_change_nothing) {
    lab l;
    auto& a = l.add(100, 11);
    l.start();
    l.run_for(100);
    ASSERT_EQ(a.r->state(), vrrp_state::master);
    // A higher-priority advert, but with TTL 254: it must not demote us.
    advert f;
    f.vrid = 51;
    f.priority = 254;
    f.max_advert_interval_cs = 1;
    f.count = 1;
    f.addresses[0] = vip;
    const ip_address evil = ip_address::v4(198, 18, 0, 66);
    std::vector<uint8_t> buf(64);
    size_t n = encode(f, evil, vrrp_multicast_v4(), buf);
    buf.resize(n);
    auto forge = [&](uint8_t ttl, std::vector<uint8_t> bytes) {
        a.io.inbox.push_back({evil, vrrp_multicast_v4(), ttl, std::move(bytes)});
        l.run_for(1);
    };
    forge(254, buf);
    auto bad_sum = buf;
    bad_sum[6] ^= 0x55;
    forge(255, bad_sum);
    auto wrong_vrid = buf;
    wrong_vrid[1] = 52;  // also breaks the checksum; both are drop reasons
    forge(255, wrong_vrid);
    forge(255, std::vector<uint8_t>(buf.begin(), buf.begin() + 5));  // short
    EXPECT_EQ(a.r->state(), vrrp_state::master);
    EXPECT_EQ(a.r->status().adverts_dropped.load(), 4u);
    EXPECT_EQ(a.r->instance().counters().dropped_by_reason[size_t(drop_reason::bad_ttl)], 1u);
    EXPECT_EQ(a.r->instance().counters().dropped_by_reason[size_t(drop_reason::short_packet)], 1u);
    // The same advert, well formed, does demote: the filter, not luck, kept us master.
    forge(255, buf);
    EXPECT_EQ(a.r->state(), vrrp_state::backup);
}

TEST(ha_runner, garp_burst_on_takeover_and_periodic_refresh_while_master) {
    lab l;
    auto& a = l.add(200, 11, 1, true, 0, /*garp_refresh=*/1000);
    l.start();
    l.run_for(50);
    ASSERT_EQ(a.r->state(), vrrp_state::master);
    EXPECT_EQ(a.io.garps.size(), 3u);  // the burst
    EXPECT_EQ(a.io.garps[0], std::vector<ip_address>{vip});
    l.run_for(2100);
    EXPECT_EQ(a.io.garps.size(), 5u);  // two refreshes
    a.r->stop();
    l.run_for(2000);
    EXPECT_EQ(a.io.garps.size(), 5u);  // none once it has resigned
}

TEST(ha_runner, unicast_peers_each_get_the_advert) {
    lab l;
    runner_config c;
    c.vrrp.vrid = 51;
    c.vrrp.priority = 255;
    c.vrrp.advert_interval_cs = 1;
    c.vrrp.primary = ip_address::v4(198, 18, 0, 11);
    c.addresses = {{vip, 24}};
    c.unicast_peers = {ip_address::v4(198, 18, 0, 12), ip_address::v4(198, 18, 0, 13)};
    fake_io io;
    fake_addresses addr;
    millis now = 0;
    runner r(c, io, addr, [&] { return now; }, nullptr, [](bool, const std::string&) {});
    r.start();
    ASSERT_EQ(io.sent.size(), 2u);
    EXPECT_EQ(io.sent[0].dst, ip_address::v4(198, 18, 0, 12));
    EXPECT_EQ(io.sent[1].dst, ip_address::v4(198, 18, 0, 13));
    // Each carries the checksum for its own destination: it passes the filter there.
    advert out;
    std::vector<ip_address> own{ip_address::v4(198, 18, 0, 12)};
    std::vector<ip_address> vips{vip};
    local_view us{51, own, vips};
    EXPECT_EQ(filter(255, io.sent[1].src, io.sent[1].dst, io.sent[1].bytes, us, out), drop_reason::accept);
}

TEST(ha_runner, a_link_fault_gives_up_mastership_even_with_a_priority_drop) {
    lab l;
    auto& a = l.add(200, 11, 1, true, /*drop=*/50);
    auto& b = l.add(100, 12);
    std::string link;
    a.r->set_link_check([&] { return link; });
    l.start();
    l.run_for(100);
    ASSERT_EQ(a.r->state(), vrrp_state::master);
    link = "eth0: no carrier";
    l.run_for(20);
    EXPECT_EQ(a.r->state(), vrrp_state::backup);  // priority 0, not 150
    EXPECT_FALSE(a.addr.held);
    EXPECT_TRUE(has_log(a, "unhealthy: eth0: no carrier: giving up mastership (priority 0)"));
    EXPECT_EQ(b.r->state(), vrrp_state::master);
    link.clear();
    l.run_for(100);
    EXPECT_EQ(a.r->state(), vrrp_state::master);  // preempts back once the link is back
}

TEST(ha_runner, a_healed_split_brain_reannounces_the_addresses_once_a_second_at_most) {
    lab l;
    auto& a = l.add(200, 11, 1, true, 0, /*garp_refresh=*/0);
    auto& b = l.add(100, 12, 1, true, 0, 0);
    a.io.deaf = b.io.deaf = true;  // split brain: each hears nothing from the other
    l.start();
    l.run_for(100);
    ASSERT_EQ(l.masters(), 2);
    size_t garps = a.io.garps.size();
    // Healing, a first: a hears b's adverts for 30 ms (three of them) before b hears a.
    a.io.deaf = false;
    l.run_for(30);
    EXPECT_EQ(a.io.garps.size(), garps + 3);  // one burst (garp_burst 3), not one per advert
    EXPECT_TRUE(has_log(a, "another master with a lower priority"));
    b.io.deaf = false;
    l.run_for(50);
    EXPECT_EQ(l.masters(), 1);
    EXPECT_EQ(a.r->state(), vrrp_state::master);
}

TEST(ha_runner, addresses_are_renewed_while_master_and_not_after) {
    lab l;
    runner_config c;
    c.vrrp.vrid = 51;
    c.vrrp.priority = 255;
    c.vrrp.advert_interval_cs = 100;
    c.vrrp.primary = ip_address::v4(198, 18, 0, 11);
    c.addresses = {{vip, 24}};
    c.address_renew_ms = 1000;
    fake_io io;
    fake_addresses addr;
    millis now = 0;
    runner r(c, io, addr, [&] { return now; }, nullptr, [](bool, const std::string&) {});
    r.start();
    ASSERT_EQ(addr.adds, 1);
    for (now = 1; now <= 3500; ++now) r.step();
    EXPECT_EQ(addr.adds, 4);  // at 1 s, 2 s and 3 s
    // The poll never sleeps past the next renewal.
    for (auto t : io.poll_timeouts) EXPECT_LE(t, 1000);
    r.stop();
    for (; now <= 6000; ++now) r.step();
    EXPECT_EQ(addr.adds, 4);
}

TEST(ha_runner, an_address_that_cannot_be_added_is_logged_and_counted) {
    lab l;
    auto& a = l.add(255, 11);
    a.addr.fail = true;
    l.start();
    EXPECT_EQ(a.r->status().address_errors.load(), 1u);
    EXPECT_TRUE(has_log(a, "Operation not permitted"));
}

}  // namespace
}  // namespace tern::ha
