"""ternd's VRRPv3 high availability (issue 7) on the namespace lab, for both backends.

Hosts: client 198.18.0.10, node a .11, node b .12, virtual address 198.18.0.100/24, VRID 51.
ternd listens on VIP:2525 (IP_FREEBIND), so whichever node holds the address answers the
client's probe (tools/tern-probe, a TCP connect every 1 ms). What these prove:
  - two ternd nodes: the higher priority holds the address; a cut link moves it within the
    protocol bound (3 x interval + skew); a restore preempts back, or not with preempt off;
    SIGTERM on the master hands over through a priority-0 advert (faster than master-down);
  - interop with keepalived both ways, and after convergence exactly one holder at every
    sample;
  - split brain (VRRP dropped at the switch) then heal: one master, the client's ARP follows;
  - forged adverts (TTL 254, bad checksum, wrong VRID, short) change nothing, while a valid
    forged higher-priority advert does (the forger is right, so the test can fail);
  - an unwritable spool (tern-plfs fail-writes) or a stuck shard (TERN_FAULT_STALL_DIR) on
    the master moves the address.
The whole module skips while ternd rejects an [ha] section, and turns on when it lands.
"""
import os
import smtplib  # noqa: F401  (used inside the client namespace through a subprocess)
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import TERND
from netns_lab import lab, skip_without_netns  # noqa: F401  (lab is a fixture)
from ha_lab import (PORT, VIP, Sampler, keepalived_node, master_down_bound, send_frames, sniff_vrrp,
                    start_probe, ternd_has_ha, ternd_node, vrrp_frame, wait_for, wait_single_holder)

_HAS_HA, _WHY = ternd_has_ha()
pytestmark = pytest.mark.skipif(not _HAS_HA, reason=_WHY)

NODES = ["a", "b"]
# Slack over the protocol bound for a shared 2-core box in a test (the benchmark, not this
# test, checks the 5 ms target).
SLACK_MS = 60

BACKENDS = ["kernel", "dpdk"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def nodes(lab, tmp_path):
    """Factory for HA nodes on the lab; stops them (ternd: SIGTERM, exit code checked)
    before the lab is torn down."""
    made = []

    def make(kind, host, priority, interval, **kw):
        if kind == "keepalived":
            n = keepalived_node(lab, host, priority, interval, tmp_path, **kw)
        else:
            n = ternd_node(lab, host, priority, interval, tmp_path, **kw)
        made.append(n)
        return n

    yield make
    bad = []
    for n in made:
        if n.proc and n.proc.poll() is None:
            rc = n.stop()
            if n.kind == "ternd" and rc != 0:
                bad.append(f"{n.host}: ternd exited {rc}:\n{n.log()[-3000:]}")
    assert not bad, "\n".join(bad)


def pair(nodes, backend, interval="10ms", prio_a=150, prio_b=100, **kw):
    a = nodes("ternd", "a", prio_a, interval, backend=backend, **kw)
    b = nodes("ternd", "b", prio_b, interval, backend=backend, **kw)
    return a, b


def client_follows(lab, host, timeout=3):
    return wait_for(lambda: lab.arp_entry("client", VIP) == lab.mac(host), timeout)


def prime_arp(lab):
    """The client resolves the VIP once (a ping), so GARPs have an entry to move."""
    return wait_for(lambda: lab.ping("client", VIP), 5)


# ------------------------------------------------------------------ two ternd nodes
def test_master_holds_cut_moves_restore_preempts(lab, nodes, backend):
    interval = "10ms"
    a, b = pair(nodes, backend, interval)
    assert wait_single_holder(lab, NODES, "a") == "a", (a.log()[-2000:], b.log()[-2000:])
    assert prime_arp(lab) and client_follows(lab, "a")
    assert a.state() == "MASTER" and b.state() == "BACKUP"
    pr = start_probe(lab)
    time.sleep(0.2)
    lab.cut("a")
    assert wait_single_holder(lab, ["b"], "b"), b.log()[-2000:]
    assert client_follows(lab, "b")
    time.sleep(0.3)
    r = pr.finish()
    bound = master_down_bound(interval, 100) * 1e3
    assert r["longest_outage_ms"] < bound + SLACK_MS, (bound, r["longest_outage"])
    assert any(t == ("BACKUP", "MASTER") for t in b.transitions())
    # Restore: a preempts back; the client follows a's GARPs.
    lab.restore("a")
    assert wait_single_holder(lab, NODES, "a", timeout=5) == "a"
    assert client_follows(lab, "a")
    assert b.state() == "BACKUP"


def test_preempt_off_stays(lab, nodes, backend):
    a, b = pair(nodes, backend, "10ms", preempt=False)
    first = wait_single_holder(lab, NODES)
    assert first
    other = "b" if first == "a" else "a"
    lab.cut(first)
    assert wait_single_holder(lab, [other], other)
    lab.restore(first)
    s = Sampler(lab, NODES, step=0.02)
    time.sleep(1.0)
    assert all(h == (other,) for _, h in s.stop())


def test_sigterm_hands_over_with_priority_zero(lab, nodes, backend):
    # 100 ms adverts: master-down is 361 ms for b, its skew alone 61 ms. A handover inside
    # 3 x interval can only come from the priority-0 advert.
    interval = "100ms"
    a, b = pair(nodes, backend, interval)
    assert wait_single_holder(lab, NODES, "a") == "a"
    assert prime_arp(lab) and client_follows(lab, "a")
    pr = start_probe(lab)
    time.sleep(0.3)
    t0 = time.monotonic()
    a.t.proc.send_signal(15)
    assert wait_single_holder(lab, ["b"], "b", timeout=5)
    took = (time.monotonic() - t0) * 1e3
    assert client_follows(lab, "b")
    time.sleep(0.3)
    r = pr.finish()
    assert a.t.proc.wait(20) == 0, a.log()[-3000:]
    assert took < 3 * 100, took
    assert r["longest_outage_ms"] < 3 * 100, r["longest_outage"]
    print(f"graceful handover ({backend}, {interval}): outage {r['longest_outage_ms']} ms")


def test_unicast_peers(lab, nodes, backend):
    """unicast_peers: adverts go to the peer only (the client sees none, TTL 255 on the
    wire between the nodes), and failover works as with multicast. The DPDK backend sends
    to the multicast group only: there the config check must refuse the key, naming it."""
    if backend == "dpdk":
        cfg = Path(tempfile.mkdtemp()) / "t.toml"
        cfg.write_text('[[listen]]\naddress = "198.18.0.100:2525"\n[ha]\ninterface = "eth0"\nvrid = 51\n'
                       'virtual_addresses = ["198.18.0.100/24"]\nbackend = "dpdk"\nunicast_peers = ["198.18.0.12"]\n')
        r = subprocess.run([TERND, "--check-config", str(cfg)], capture_output=True, text=True)
        assert r.returncode != 0 and f"{cfg}:8: ha.unicast_peers: not supported" in r.stderr, r.stderr
        return
    a = nodes("ternd", "a", 150, "10ms", backend=backend, unicast_peers=[lab.addr("b")])
    b = nodes("ternd", "b", 100, "10ms", backend=backend, unicast_peers=[lab.addr("a")])
    assert wait_single_holder(lab, NODES, "a") == "a"
    seen_b = sniff_vrrp(lab, "b", 0.5)
    assert seen_b and all(dst == lab.addr("b") and ttl == 255 for _, dst, ttl in seen_b), seen_b[:5]
    assert sniff_vrrp(lab, "client", 0.5) == []
    lab.cut("a")
    assert wait_single_holder(lab, ["b"], "b")
    lab.restore("a")
    assert wait_single_holder(lab, NODES, "a", timeout=5) == "a"


# ------------------------------------------------------------------ kill -9
def test_killed_master_does_not_keep_answering_for_the_address(lab, nodes, backend):
    """kill -9 on the master: nobody resigns, so b takes over after its master-down interval;
    the dead node's kernel would keep the address (and answer ARP for it with RSTs behind)
    but for its lifetime: it lapses within address_lifetime without a renewal. A restart
    as backup would remove it at once; here nothing restarts."""
    a, b = pair(nodes, backend, "10ms", address_lifetime="2s")
    assert wait_single_holder(lab, NODES, "a") == "a"
    assert "valid_lft 2sec" in lab.run("a", ["ip", "-4", "addr", "show", "dev", "eth0"]).stdout \
        or "valid_lft 1sec" in lab.run("a", ["ip", "-4", "addr", "show", "dev", "eth0"]).stdout
    time.sleep(2.5)  # renewed: still held after more than one lifetime
    assert lab.holders(VIP, NODES) == ["a"]
    a.kill()
    assert wait_for(lambda: lab.has_address("b", VIP), 2)
    t0 = time.monotonic()
    assert wait_for(lambda: not lab.has_address("a", VIP), 5), "the dead master still holds the address"
    assert time.monotonic() - t0 < 3.5
    assert lab.holders(VIP, NODES) == ["b"]


# ------------------------------------------------------------------ use_vmac
def test_use_vmac_keeps_the_clients_mac_across_a_failover(lab, nodes, backend):
    """use_vmac: the address sits on the macvlan vrrp.51 with the virtual MAC, so the
    client's neighbour entry is 00:00:5e:00:01:33 on either node, and a failover changes
    nothing on the client but the switch's port (learnt from the GARPs). On stop the
    macvlan is removed."""
    vmac = "00:00:5e:00:01:33"  # VRID 51
    a, b = pair(nodes, backend, "10ms", use_vmac=True)
    assert wait_single_holder(lab, NODES, "a") == "a"
    assert lab.has_address("a", VIP, dev="vrrp.51")
    assert lab.mac("a", dev="vrrp.51") == vmac
    assert prime_arp(lab)
    assert wait_for(lambda: lab.arp_entry("client", VIP) == vmac, 3), lab.arp_entry("client", VIP)
    pr = start_probe(lab)
    time.sleep(0.2)
    lab.cut("a")
    assert wait_single_holder(lab, ["b"], "b")
    assert lab.has_address("b", VIP, dev="vrrp.51")
    time.sleep(0.3)
    r = pr.finish()
    assert r["ok"] > 0 and r["longest_outage_ms"] < master_down_bound("10ms", 100) * 1e3 + SLACK_MS, r
    assert lab.arp_entry("client", VIP) == vmac
    lab.restore("a")
    assert wait_single_holder(lab, NODES, "a", timeout=5) == "a"
    b.stop()
    assert "vrrp.51" not in lab.run("b", ["ip", "-o", "link", "show"]).stdout


# ------------------------------------------------------------------ keepalived interop
@pytest.mark.parametrize("master_kind", ["ternd", "keepalived"])
def test_keepalived_interop(lab, nodes, backend, master_kind):
    backup_kind = "keepalived" if master_kind == "ternd" else "ternd"
    interval = "100ms"
    kw = lambda kind: {"backend": backend} if kind == "ternd" else {}
    m = nodes(master_kind, "a", 150, interval, **kw(master_kind))
    s = nodes(backup_kind, "b", 100, interval, **kw(backup_kind))
    assert wait_single_holder(lab, NODES, "a") == "a", (m.log()[-2000:], s.log()[-2000:])
    time.sleep(1.0)  # converged: now they must agree at every moment
    tm, ts = len(m.transitions()), len(s.transitions())
    samp = Sampler(lab, NODES, step=0.02)
    time.sleep(3.0)
    samples = samp.stop()
    assert len(samples) > 50
    assert all(h == ("a",) for _, h in samples), ([h for _, h in samples if h != ("a",)][:5], m.log()[-3000:], s.log()[-3000:])
    assert (len(m.transitions()), len(s.transitions())) == (tm, ts), (m.transitions(), s.transitions())
    # And they fail over to each other.
    lab.cut("a")
    assert wait_single_holder(lab, ["b"], "b")
    lab.restore("a")
    assert wait_single_holder(lab, NODES, "a", timeout=5) == "a"


# ------------------------------------------------------------------ split brain
def test_split_brain_heals(lab, nodes, backend):
    a, b = pair(nodes, backend, "100ms", garp_refresh="1s")
    assert wait_single_holder(lab, NODES, "a") == "a"
    assert prime_arp(lab)
    lab.block_vrrp("a")
    assert wait_for(lambda: lab.holders(VIP, NODES) == NODES, 5), "no split brain"
    assert lab.vrrp_drops() > 0
    lab.unblock_vrrp("a")
    assert wait_single_holder(lab, NODES, "a", timeout=3) == "a"
    # GARPs (on the heal, or the 1 s refresh at the latest) bring the client to a.
    assert client_follows(lab, "a", timeout=3)
    samp = Sampler(lab, NODES, step=0.02)
    time.sleep(1.0)
    assert all(h == ("a",) for _, h in samp.stop())


# ------------------------------------------------------------------ forged adverts
def test_forged_adverts_change_nothing(lab, nodes, backend):
    a, b = pair(nodes, backend, "10ms")
    assert wait_single_holder(lab, NODES, "a") == "a"
    time.sleep(0.3)
    before = (a.transitions(), b.transitions())
    mac, ip = lab.mac("client"), lab.addr("client")
    # Priority 254 beats a's 150: had any been accepted, a would have stepped down.
    forged = {
        "ttl254": vrrp_frame(mac, ip, priority=254, ttl=254),
        "bad_checksum": vrrp_frame(mac, ip, priority=254, bad_checksum=True),
        "wrong_vrid": vrrp_frame(mac, ip, vrid=52, priority=254),
        "short": vrrp_frame(mac, ip, priority=254, truncate=6),
        "wrong_addresses": vrrp_frame(mac, ip, priority=254, addrs=("198.18.0.101",)),
    }
    for name, f in forged.items():
        send_frames(lab, "client", [f], count=100, gap=0.003)
        assert (a.transitions(), b.transitions()) == before, name
        assert lab.holders(VIP, NODES) == ["a"], name
    # The control: the same advert, well formed, does demote the master.
    send_frames(lab, "client", [vrrp_frame(mac, ip, priority=254)], count=20, gap=0.005)
    assert wait_for(lambda: ("MASTER", "BACKUP") in a.transitions()[len(before[0]):], 2), a.log()[-2000:]
    # Silence again: a wins the election back.
    assert wait_single_holder(lab, NODES, "a", timeout=5) == "a"


# ------------------------------------------------------------------ health
def _send_mail(lab, n=1):
    """SMTP from the client to VIP:PORT; the reply codes of DATA ('' when it failed)."""
    script = (
        "import smtplib,sys\n"
        "out=[]\n"
        f"for i in range({n}):\n"
        "  try:\n"
        f"    s=smtplib.SMTP('{VIP}',{PORT},timeout=3)\n"
        "    s.sendmail('a@client.test',['b@example.test'],b'Subject: t\\r\\n\\r\\nbody\\r\\n')\n"
        "    out.append('250'); s.quit()\n"
        "  except Exception as e:\n"
        "    out.append(type(e).__name__)\n"
        "print(' '.join(out))\n")
    return lab.run("client", ["/usr/bin/python3", "-c", script], check=False, timeout=60).stdout.strip()


@pytest.mark.parametrize("drop", [0, 100])
def test_unwritable_spool_moves_the_address(lab, nodes, backend, tmp_path, drop):
    """drop 0: a resigns at once (priority 0); drop 100: 150 - 100 = 50 < b's 100, b preempts."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuse"))
    from plfs import Plfs, skip_without_fuse
    skip_without_fuse()
    fs = Plfs(tmp_path / "plfs-a").mount()
    try:
        a = nodes("ternd", "a", 150, "10ms", backend=backend, spool=fs.mnt / "spool",
                  health_priority_drop=drop)
        b = nodes("ternd", "b", 100, "10ms", backend=backend)
        assert wait_single_holder(lab, NODES, "a") == "a"
        assert prime_arp(lab)
        assert "250" in _send_mail(lab), "a healthy master accepts mail"
        fs.fail_writes(True)
        t0 = time.monotonic()
        # Mail makes the spool write (and fail) even if ternd's own check is slower.
        def mail_then_check():
            _send_mail(lab)
            return lab.holders(VIP, NODES) == ["b"]
        moved = wait_for(mail_then_check, 10, step=0.1)
        took = time.monotonic() - t0
        assert moved, (lab.holders(VIP, NODES), a.log()[-3000:])
        assert client_follows(lab, "b")
        print(f"unwritable spool ({backend}, drop {drop}): moved in {took * 1e3:.0f} ms")
        # Whether a node recovers once the disk does is not specified (issue 7): not tested.
        fs.fail_writes(False)
        a.stop()
    finally:
        fs.fail_writes(False)
        fs.unmount()


def test_stuck_shard_moves_the_address(lab, nodes, backend, tmp_path):
    stall = tmp_path / "stall-a"
    stall.mkdir()
    a = nodes("ternd", "a", 150, "10ms", backend=backend, shards=2, heartbeat_timeout="500ms",
              env={"TERN_FAULT_STALL_DIR": str(stall)})
    b = nodes("ternd", "b", 100, "10ms", backend=backend)
    assert wait_single_holder(lab, NODES, "a") == "a"
    assert prime_arp(lab)
    pr = start_probe(lab)
    time.sleep(0.2)
    (stall / "stall-shard-1").write_text("")
    t0 = time.monotonic()
    try:
        assert wait_single_holder(lab, ["b"], "b", timeout=5), a.log()[-3000:]
        took = (time.monotonic() - t0) * 1e3
        assert client_follows(lab, "b")
        # Within the heartbeat timeout plus the protocol's bound (and the lab's slack).
        assert took < 500 + master_down_bound("10ms", 100) * 1e3 + 200, took
    finally:
        (stall / "stall-shard-1").unlink()
    r = pr.finish()
    print(f"stuck shard ({backend}): moved in {took:.0f} ms, client outage {r['longest_outage_ms']} ms")
