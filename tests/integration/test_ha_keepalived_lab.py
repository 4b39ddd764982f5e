"""The HA lab's own tests, with keepalived (Debian's, vrrp_version 3) on both nodes.

They prove the pieces the ternd HA tests stand on before ternd has HA: the namespace lab
(netns_lab.py: link cuts, VRRP blocking, teardown), the 1 ms probe (tools/tern-probe: it
tells a refused connect from a timeout, and its outages match what was done to the link),
and the keepalived helpers (ha_lab.py) that the interop tests reuse. Root only; they skip
without it.
"""
import subprocess
import time

import pytest

from netns_lab import Lab, PREFIX, _netns_list, lab, skip_without_netns, sweep_stale  # noqa: F401
from ha_lab import (PORT, VIP, Sampler, keepalived_node, master_down_bound, start_probe,
                    vip_listener, wait_for, wait_single_holder)

NODES = ["a", "b"]


def test_lab_teardown_and_sweep():
    skip_without_netns()
    with Lab() as l:
        names = set(l.ns.values()) | {l.switch}
        assert names <= set(_netns_list())
        assert l.ping("client", l.addr("a")) and l.ping("a", l.addr("b"))
        p = l.popen("b", ["sleep", "600"])
        # A cut link stops traffic; a restore brings it back.
        l.cut("a")
        assert not l.ping("client", l.addr("a"))
        l.restore("a")
        assert wait_for(lambda: l.ping("client", l.addr("a")), 5)
    assert not names & set(_netns_list()), "teardown left namespaces"
    assert p.poll() is not None, "teardown left a process running in the lab"
    # A crashed run's namespaces (a pid above pid_max: never alive) are swept.
    stale = f"{PREFIX}4194999-dead00-x"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in sweep_stale()
        assert stale not in _netns_list()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)


def test_teardown_after_failure():
    skip_without_netns()
    names = set()
    with pytest.raises(ZeroDivisionError):
        with Lab() as l:
            names = set(l.ns.values()) | {l.switch}
            1 / 0
    assert names and not names & set(_netns_list())


def test_probe_tells_refused_from_timeout(lab):
    """Listener up: all ok, ticks ~1 ms. Listener gone: refused (RST). Link cut: timeout,
    and the outage the probe reports is the cut's length within a few ms."""
    target = f"{lab.addr('a')}:{PORT}"
    lst = vip_listener(lab, "a", vip=lab.addr("a"))
    pr = start_probe(lab, target=target)
    time.sleep(0.5)
    lab.cut("a")
    t0 = time.monotonic()
    time.sleep(0.3)
    lab.restore("a")
    cut_ms = (time.monotonic() - t0) * 1e3
    time.sleep(0.3)
    lst.terminate()
    lst.wait()
    time.sleep(0.2)
    r = pr.finish()
    assert r["tick_spacing_ms"]["p50"] < 1.2, r["tick_spacing_ms"]
    assert r["timeout"] > 200 and r["refused"] > 100, r
    cut = [o for o in r["outages"] if "timeout" in o["failures"]]
    assert len(cut) == 1, r["outages"]
    assert abs(cut[0]["length_ms"] - cut_ms) < 15, (cut[0], cut_ms)
    assert r["outages"][-1].get("unfinished") and "refused" in r["outages"][-1]["failures"]


@pytest.mark.parametrize("interval", ["10ms", "100ms"])
def test_keepalived_cut_and_preempt_back(lab, tmp_path, interval):
    a = keepalived_node(lab, "a", 150, interval, tmp_path)
    b = keepalived_node(lab, "b", 100, interval, tmp_path)
    assert wait_single_holder(lab, NODES, "a") == "a"
    assert wait_for(lambda: lab.arp_entry("client", VIP) == lab.mac("a") or
                    (lab.ping("client", VIP) and lab.arp_entry("client", VIP) == lab.mac("a")), 5)
    pr = start_probe(lab)
    time.sleep(0.2)
    lab.cut("a")
    assert wait_single_holder(lab, ["b"], "b")
    # The client follows b's gratuitous ARP without having to re-resolve.
    assert wait_for(lambda: lab.arp_entry("client", VIP) == lab.mac("b"), 3)
    time.sleep(0.3)
    r = pr.finish()
    bound_ms = master_down_bound(interval, 100) * 1e3
    # Within the protocol bound plus the lab's slack (a shared 2-core box).
    assert 0.5 * bound_ms < r["longest_outage_ms"] < bound_ms + 60, (bound_ms, r["longest_outage"])
    assert b.state() == "MASTER" and a.state() == "FAULT"
    # Restore: a preempts back, the VIP and the client's ARP follow.
    pr = start_probe(lab)
    lab.restore("a")
    assert wait_single_holder(lab, NODES, "a", timeout=5) == "a"
    assert wait_for(lambda: lab.arp_entry("client", VIP) == lab.mac("a"), 3)
    time.sleep(0.3)
    r = pr.finish()
    assert r["longest_outage_ms"] < bound_ms + 60, r["longest_outage"]
    assert ("MASTER", "BACKUP") in b.transitions()


def test_keepalived_nopreempt_stays(lab, tmp_path):
    a = keepalived_node(lab, "a", 150, "10ms", tmp_path, preempt=False)
    b = keepalived_node(lab, "b", 100, "10ms", tmp_path, preempt=False)
    # nopreempt: whoever is master keeps it, even against a higher priority.
    assert wait_single_holder(lab, NODES) is not None
    first = lab.holders(VIP, NODES)[0]
    other = "b" if first == "a" else "a"
    lab.cut(first)
    assert wait_single_holder(lab, [other], other)
    lab.restore(first)
    time.sleep(1.0)
    assert lab.holders(VIP, NODES) == [other]


def test_keepalived_graceful_stop(lab, tmp_path):
    a = keepalived_node(lab, "a", 150, "100ms", tmp_path)
    b = keepalived_node(lab, "b", 100, "100ms", tmp_path)
    assert wait_single_holder(lab, NODES, "a") == "a"
    pr = start_probe(lab)
    time.sleep(0.2)
    a.stop()
    assert wait_single_holder(lab, ["b"], "b")
    time.sleep(0.3)
    r = pr.finish()
    # Priority 0: b takes over after the skew time alone (100 ms x 156/256 = 61 ms), far
    # less than the 3 x interval of a silent master.
    assert r["longest_outage_ms"] < 3 * 100, r["longest_outage"]


def test_keepalived_split_brain_heals(lab, tmp_path):
    a = keepalived_node(lab, "a", 150, "10ms", tmp_path, garp_refresh=1)
    b = keepalived_node(lab, "b", 100, "10ms", tmp_path, garp_refresh=1)
    assert wait_single_holder(lab, NODES, "a") == "a"
    lab.block_vrrp("a")
    assert wait_for(lambda: lab.holders(VIP, NODES) == NODES, 3), "no split brain"
    assert lab.vrrp_drops() > 0
    assert wait_for(lambda: lab.arp_entry("client", VIP) == lab.mac("b"), 3)
    lab.unblock_vrrp("a")
    assert wait_single_holder(lab, NODES, "a", timeout=3) == "a"
    # The master's periodic GARP brings the client back.
    assert wait_for(lambda: lab.arp_entry("client", VIP) == lab.mac("a"), 3)
    s = Sampler(lab, NODES, step=0.02)
    time.sleep(1.0)
    samples = s.stop()
    assert all(h == ("a",) for _, h in samples), samples


def test_forged_adverts_keepalived_master(lab, tmp_path):
    """The advert forger (ha_lab.vrrp_frame) is right: keepalived drops the malformed ones
    and obeys the well-formed one. Only a master runs here: keepalived 2.2.7 as a BACKUP
    logs "Receive advertisement timeout" right after each TTL-254 or bad-checksum advert
    and goes MASTER for a moment (seen at 10 and 100 ms adverts, whatever the forged
    priority; acassen/keepalived#2433 reports the same after invalid-password adverts).
    test_ha.py's forged-advert test catches that fault, so it fails with keepalived inside
    fake_ternd_ha.py; ternd must not have it."""
    from ha_lab import send_frames, vrrp_frame
    a = keepalived_node(lab, "a", 150, "10ms", tmp_path)
    assert wait_single_holder(lab, NODES, "a") == "a"
    before = a.transitions()
    mac, ip = lab.mac("client"), lab.addr("client")
    for f in (vrrp_frame(mac, ip, priority=254, ttl=254), vrrp_frame(mac, ip, priority=254, bad_checksum=True),
              vrrp_frame(mac, ip, vrid=52, priority=254), vrrp_frame(mac, ip, priority=254, truncate=6)):
        send_frames(lab, "client", [f], count=50, gap=0.003)
        assert a.transitions() == before and lab.holders(VIP, NODES) == ["a"]
    log = a.log()
    assert "invalid TTL" in log and "Invalid VRRPv3 checksum" in log
    send_frames(lab, "client", [vrrp_frame(mac, ip, priority=254)], count=10, gap=0.005)
    assert wait_for(lambda: ("MASTER", "BACKUP") in a.transitions()[len(before):], 2)
    assert "higher priority 254" in a.log()
    assert wait_single_holder(lab, NODES, "a", timeout=3) == "a"
