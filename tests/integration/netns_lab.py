"""A throwaway L2 lab in network namespaces, for the HA tests and the failover benchmark.

What it is for: putting several "hosts" (a client, two relay nodes, ...) on one Ethernet
segment without touching the machine's own network. One "switch" namespace holds a Linux
bridge `br0`; each host namespace holds a veth `eth0` whose peer `p-<host>` is a port of that
bridge. Addresses come from 198.18.0.0/24 only (RFC 2544 benchmarking space); nothing in
the lab routes anywhere else.

    with Lab() as lab:                      # hosts client .10, a .11, b .12; VIP .100
        lab.run("a", "ip addr")
        p = lab.popen("b", ["keepalived", ...])
        lab.cut("a"); lab.restore("a")      # link down/up on the switch side
        lab.block_vrrp("a")                 # drop IP protocol 112 to and from a (split brain)
        lab.has_address("a", VIP); lab.arp_entry("client", VIP)

Faults are made on the switch side so that the host sees what it would see on a real
network: a cut link is a lost carrier on eth0; blocked VRRP is a silent loss (nftables
bridge-family rules in the switch namespace; Debian 12's `nftables`, no ebtables needed).

What it trusts: root, iproute2 and nft. What it does not: that the previous run cleaned up.
Namespace names are `ternlab-<pid>-<random>-<host>`; on entry, namespaces of that prefix
whose pid is gone are swept (their processes killed by id, then the namespace deleted).
Teardown kills every process still inside the lab's namespaces, then deletes them, even
when the test failed.
"""
import os
import re
import secrets
import signal
import subprocess
import time

import pytest

PREFIX = "ternlab-"
SUBNET = "198.18.0"
VIP = f"{SUBNET}.100"
DEFAULT_HOSTS = {"client": f"{SUBNET}.10", "a": f"{SUBNET}.11", "b": f"{SUBNET}.12"}


def _sh(argv, check=True, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: rc={r.returncode}\n{r.stdout}{r.stderr}")
    return r


def _netns_list():
    r = _sh(["ip", "netns", "list"], check=False)
    return [l.split()[0] for l in r.stdout.splitlines() if l.strip()]


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _kill_ns_processes(ns, timeout=3.0):
    """SIGTERM, then SIGKILL, every process whose network namespace is ns (by pid)."""
    def pids():
        r = _sh(["ip", "netns", "pids", ns], check=False)
        return [int(p) for p in r.stdout.split() if p.isdigit() and int(p) != os.getpid()]
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 1.0)):
        ps = pids()
        if not ps:
            return
        for p in ps:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and pids():
            time.sleep(0.02)


def _delete_ns(ns):
    _kill_ns_processes(ns)
    _sh(["ip", "netns", "del", ns], check=False)


def sweep_stale(prefix=PREFIX):
    """Remove lab namespaces left by crashed runs: those whose creator pid is gone."""
    removed = []
    for ns in _netns_list():
        m = re.match(re.escape(prefix) + r"(\d+)-", ns)
        if m and not _pid_alive(int(m.group(1))):
            _delete_ns(ns)
            removed.append(ns)
    return removed


def skip_without_netns():
    if os.geteuid() != 0:
        pytest.skip("the namespace lab needs root (ip netns, veth, bridge)")
    for tool in ("ip", "nft"):
        if _sh(["which", tool], check=False).returncode != 0:
            pytest.skip(f"the namespace lab needs `{tool}` (tools/setup.sh installs it)")


class Lab:
    """hosts: name -> address in 198.18.0.0/24 (each host gets eth0 with addr/24)."""

    def __init__(self, hosts=None, prefix=PREFIX):
        self.hosts = dict(hosts or DEFAULT_HOSTS)
        for h, a in self.hosts.items():
            assert a.startswith("198.18.") or a.startswith("198.19."), f"{h}: {a} is not in 198.18.0.0/15"
        self.tag = f"{prefix}{os.getpid()}-{secrets.token_hex(3)}"
        self.switch = f"{self.tag}-sw"
        self.ns = {h: f"{self.tag}-{h}" for h in self.hosts}
        self.procs = []
        self._vrrp_blocked = set()
        self._up = False

    # ---- lifecycle
    def __enter__(self):
        sweep_stale()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def port(self, host):
        """The bridge-side veth of host, inside the switch namespace (<= 15 chars)."""
        return ("p-" + host)[:15]

    def _create(self):
        sw = self.switch
        _sh(["ip", "netns", "add", sw])
        self._up = True
        _sh(["ip", "-n", sw, "link", "set", "lo", "up"])
        # No STP, no forwarding delay: a port forwards the moment it comes up.
        _sh(["ip", "-n", sw, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0"])
        _sh(["ip", "-n", sw, "link", "set", "br0", "up"])
        # The VRRP blocking table; rules are added per host by block_vrrp().
        _sh(["ip", "netns", "exec", sw, "nft", "add table bridge lab"])
        _sh(["ip", "netns", "exec", sw, "nft",
             "add chain bridge lab vrrp { type filter hook forward priority 0; policy accept; }"])
        for h, addr in self.hosts.items():
            ns = self.ns[h]
            _sh(["ip", "netns", "add", ns])
            _sh(["ip", "-n", sw, "link", "add", self.port(h), "type", "veth", "peer", "name", "eth0", "netns", ns])
            _sh(["ip", "-n", sw, "link", "set", self.port(h), "master", "br0", "up"])
            _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            _sh(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0"])
            _sh(["ip", "-n", ns, "link", "set", "eth0", "up"])
            # A gratuitous ARP must move an existing neighbour entry at once: locktime 0
            # (default 1 s would ignore a GARP that follows another within a second), and
            # arp_accept so that a GARP also creates an entry.
            for k, v in (("net.ipv4.neigh.eth0.locktime", "0"), ("net.ipv4.conf.eth0.arp_accept", "1"),
                         ("net.ipv4.conf.all.arp_accept", "1"),
                         ("net.ipv4.ip_local_port_range", "10000 65000")):
                _sh(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{k}={v}"], check=False)

    def close(self):
        """Kill what runs in the lab, delete every namespace. Safe to call twice."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.terminate()
                    p.wait(3)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs = []
        if not self._up:
            return
        for ns in list(self.ns.values()) + [self.switch]:
            _delete_ns(ns)
        self._up = False

    # ---- running things on a host
    def exec_prefix(self, host):
        """argv prefix that runs a command inside host's namespace."""
        return ["ip", "netns", "exec", self.ns[host]]

    def run(self, host, cmd, check=True, timeout=30):
        """Run cmd (a string for sh -c, or an argv list) in host; CompletedProcess (text)."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return _sh(self.exec_prefix(host) + argv, check=check, timeout=timeout)

    def popen(self, host, argv, **kw):
        """Start argv in host; the lab kills it at teardown if the test did not."""
        p = subprocess.Popen(self.exec_prefix(host) + list(argv), **kw)
        self.procs.append(p)
        return p

    # ---- faults
    def cut(self, host):
        """Take the switch side of host's link down: host's eth0 loses carrier."""
        _sh(["ip", "-n", self.switch, "link", "set", self.port(host), "down"])

    def restore(self, host):
        _sh(["ip", "-n", self.switch, "link", "set", self.port(host), "up"])

    def _nft(self, cmd):
        return _sh(["ip", "netns", "exec", self.switch, "nft"] + cmd.split())

    def block_vrrp(self, host):
        """Drop IP protocol 112 (VRRP) to and from host at the switch; all else passes."""
        if host in self._vrrp_blocked:
            return
        p = self.port(host)
        self._nft(f"add rule bridge lab vrrp iifname {p} ip protocol 112 counter drop comment in-{host}")
        self._nft(f"add rule bridge lab vrrp oifname {p} ip protocol 112 counter drop comment out-{host}")
        self._vrrp_blocked.add(host)

    def unblock_vrrp(self, host):
        if host not in self._vrrp_blocked:
            return
        out = _sh(["ip", "netns", "exec", self.switch, "nft", "-a", "list", "chain", "bridge", "lab", "vrrp"]).stdout
        for line in out.splitlines():
            m = re.search(r'comment "(?:in|out)-' + re.escape(host) + r'".*# handle (\d+)', line)
            if m:
                self._nft(f"delete rule bridge lab vrrp handle {m.group(1)}")
        self._vrrp_blocked.discard(host)

    def vrrp_drops(self):
        """Packets the VRRP block rules dropped so far (all hosts)."""
        out = _sh(["ip", "netns", "exec", self.switch, "nft", "list", "chain", "bridge", "lab", "vrrp"]).stdout
        return sum(int(x) for x in re.findall(r"counter packets (\d+)", out))

    # ---- observations
    def addr(self, host):
        return self.hosts[host]

    def mac(self, host, dev="eth0"):
        out = self.run(host, ["cat", f"/sys/class/net/{dev}/address"]).stdout
        return out.strip().lower()

    def has_address(self, host, ip, dev=None):
        argv = ["ip", "-o", "-4", "addr", "show"] + (["dev", dev] if dev else [])
        # check=True: a failed `ip` must not read as "does not hold it".
        out = self.run(host, argv).stdout
        return any(f" {ip}/" in l for l in out.splitlines())

    def holders(self, ip, hosts=None):
        """The hosts that hold ip right now."""
        return [h for h in (hosts or self.hosts) if self.has_address(h, ip)]

    def arp_entry(self, host, ip):
        """host's neighbour entry for ip: its MAC (lowercase), or None (none, or FAILED/INCOMPLETE)."""
        out = self.run(host, ["ip", "-4", "neigh", "show", ip, "dev", "eth0"], check=False).stdout
        m = re.search(r"lladdr ([0-9a-f:]{17})", out)
        return m.group(1).lower() if m else None

    def flush_arp(self, host, ip=None):
        self.run(host, ["ip", "neigh", "flush", "dev", "eth0"] + (["to", ip] if ip else []), check=False)

    def ping(self, src, dst, count=1, timeout=1):
        return self.run(src, ["ping", "-n", "-q", "-c", str(count), "-W", str(timeout), dst], check=False).returncode == 0


@pytest.fixture
def lab():
    skip_without_netns()
    with Lab() as l:
        yield l
