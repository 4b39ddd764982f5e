"""HA test helpers on the namespace lab (netns_lab.py): keepalived nodes, the VIP listener,
the 1 ms client probe, and state sampling. Shared by test_ha_keepalived_lab.py, test_ha.py
and bench/failover.py.

    with Lab() as lab:
        a = keepalived_node(lab, "a", priority=150, interval="10ms", tmp=tmp_path)
        b = keepalived_node(lab, "b", priority=100, interval="10ms", tmp=tmp_path)
        wait_for(lambda: lab.holders(VIP, ["a", "b"]) == ["a"])
        probe = start_probe(lab)
        lab.cut("a") ...
        report = probe.finish()          # tern-probe's JSON as a dict

A node is anything with .host, .start(), .stop() (graceful), .kill(), .log() and
.transitions() (a list of (from, to) state names, in order). KeepalivedNode here; TerndNode
in test_ha.py follows the same shape so the interop tests can mix them.
"""
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TERN_PROBE = str(ROOT / "tools/tern-probe")
VIP = "198.18.0.100"
VIP_CIDR = f"{VIP}/24"
VRID = 51
PORT = 2525


def interval_seconds(interval):
    """"10ms" / "1s" / "0.1" / 0.01 -> seconds (float)."""
    if isinstance(interval, (int, float)):
        return float(interval)
    s = str(interval).strip()
    if s.endswith("ms"):
        return float(s[:-2]) / 1e3
    if s.endswith("s"):
        return float(s[:-1])
    return float(s)


def master_down_bound(interval, backup_priority):
    """RFC 5798: Master_Down_Interval = 3 x interval + skew, skew = (256 - prio) x interval / 256."""
    i = interval_seconds(interval)
    return 3 * i + (256 - backup_priority) * i / 256


def wait_for(pred, timeout=15, step=0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


def wait_single_holder(lab, hosts, expect=None, timeout=10):
    """Wait until exactly one of hosts holds the VIP (expect: that one). The holder or None."""
    def ok():
        h = lab.holders(VIP, hosts)
        return len(h) == 1 and (expect is None or h[0] == expect) and h[0]
    return wait_for(ok, timeout) or None


# ---------------------------------------------------------------- keepalived
def keepalived_conf(host, priority, interval, vrid=VRID, vips=(VIP_CIDR,), preempt=True,
                    preempt_delay=0, unicast_src=None, unicast_peers=(), garp_repeat=5,
                    garp_refresh=0, interface="eth0"):
    i = interval_seconds(interval)
    lines = [
        "global_defs {",
        f"  router_id lab_{host}",
        "  vrrp_version 3",
        # No strict mode: it would add iptables rules and refuse unicast; these tests want
        # the plain protocol.
        "  vrrp_garp_master_delay 1",
        f"  vrrp_garp_master_repeat {garp_repeat}",
        "  vrrp_garp_interval 0.001",
        # Split brain heal: the master that hears a lower-priority advert GARPs again, so
        # clients that followed the other master's GARPs come back.
        f"  vrrp_garp_lower_prio_repeat {garp_repeat}",
        "  vrrp_garp_lower_prio_delay 0",
        # The lab's keepalived runs as root with no scripts; do not nag about it.
        "  script_user root",
        "  enable_script_security",
        "}",
        "vrrp_instance VI_%d {" % vrid,
        "  state BACKUP",
        f"  interface {interface}",
        f"  virtual_router_id {vrid}",
        f"  priority {priority}",
        f"  advert_int {i:g}",
        f"  garp_master_delay 1",
        f"  garp_master_repeat {garp_repeat}",
    ]
    if garp_refresh:
        lines.append(f"  garp_master_refresh {int(garp_refresh)}")
    if not preempt:
        lines.append("  nopreempt")
    elif preempt_delay:
        lines.append(f"  preempt_delay {preempt_delay:g}")
    if unicast_peers:
        if unicast_src:
            lines.append(f"  unicast_src_ip {unicast_src}")
        lines.append("  unicast_peer {")
        lines += [f"    {p}" for p in unicast_peers]
        lines.append("  }")
    lines.append("  virtual_ipaddress {")
    lines += [f"    {v} dev {interface}" for v in vips]
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


KA_STATE_RE = re.compile(r"\(VI_\d+\) Entering (\w+) STATE")


class KeepalivedNode:
    """One keepalived (VRRP only, foreground) in host's namespace, with its own pid files."""

    kind = "keepalived"

    def __init__(self, lab, host, tmp, priority, interval, **conf):
        self.lab, self.host = lab, host
        self.dir = Path(tmp) / f"keepalived-{host}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.priority, self.interval = priority, interval
        self.conf_path = self.dir / "keepalived.conf"
        self.conf_path.write_text(keepalived_conf(host, priority, interval, **conf))
        self.logpath = self.dir / "keepalived.log"
        self.proc = None

    def argv(self):
        d = self.dir
        return ["keepalived", "-n", "-l", "-D", "-P", "-G", "-f", str(self.conf_path),
                "-p", str(d / "keepalived.pid"), "-r", str(d / "vrrp.pid"),
                "-c", str(d / "checkers.pid"), "-b", str(d / "bfd.pid"),
                "-i", f"lab_{self.host}"]

    def start(self):
        self.logf = open(self.logpath, "ab")
        self.proc = self.lab.popen(self.host, self.argv(), stdout=self.logf, stderr=subprocess.STDOUT)
        # keepalived has no "ready" line; its VRRP child logs the instance's first state.
        if not wait_for(lambda: self.transitions() or self.proc.poll() is not None, 10):
            raise RuntimeError(f"keepalived on {self.host} did not start:\n{self.log()}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"keepalived on {self.host} exited {self.proc.returncode}:\n{self.log()}")
        return self

    def stop(self, timeout=10):
        """Graceful: keepalived sends a priority-0 advert and drops the VIP."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else 0

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self):
        return self.logpath.read_text(errors="replace") if self.logpath.exists() else ""

    def states(self):
        return KA_STATE_RE.findall(self.log())

    def transitions(self):
        """[(from, to)]: keepalived logs only the state entered; the first from is INIT."""
        st = ["INIT"] + self.states()
        return list(zip(st, st[1:]))

    def state(self):
        s = self.states()
        return s[-1] if s else "INIT"


def vip_listener(lab, host, port=PORT, vip=VIP):
    """What answers TCP on the VIP on a keepalived node: tern-probe listen (IP_FREEBIND)."""
    p = lab.popen(host, [TERN_PROBE, "listen", "--bind", f"{vip}:{port}"],
                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    line = p.stderr.readline().decode()
    if "listening on" not in line:
        raise RuntimeError(f"VIP listener on {host} did not start: {line!r}")
    return p


def keepalived_node(lab, host, priority, interval, tmp, listen_port=PORT, start=True, **conf):
    """A keepalived VRRP node on host (vrrp_version 3, state BACKUP, VIP 198.18.0.100/24,
    VRID 51 unless conf says otherwise) plus a TCP listener on VIP:listen_port (None: none).
    conf: keepalived_conf() keywords (preempt, preempt_delay, unicast_peers, vrid, ...)."""
    n = KeepalivedNode(lab, host, tmp, priority, interval, **conf)
    if listen_port:
        n.listener = vip_listener(lab, host, listen_port)
    return n.start() if start else n


# ---------------------------------------------------------------- the client probe
class ProbeRun:
    def __init__(self, proc):
        self.proc = proc

    def finish(self, timeout=10):
        """Stop the probe; its JSON report as a dict."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=timeout)
        return json.loads(out)


def start_probe(lab, host="client", target=None, interval_ms=1.0, timeout_ms=200.0, wait_ok=True):
    """tern-probe in host, connecting to VIP:PORT every interval_ms; returns once it is
    running (after its first success when wait_ok)."""
    target = target or f"{VIP}:{PORT}"
    p = lab.popen(host, [TERN_PROBE, "probe", "--target", target, "--interval-ms", str(interval_ms),
                         "--timeout-ms", str(timeout_ms)],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = p.stderr.readline().decode()
    if "ready" not in line:
        raise RuntimeError(f"tern-probe did not start: {line!r}")
    return ProbeRun(p)


class Sampler:
    """Samples who holds the VIP among hosts every `step` seconds in a thread; .stop() ->
    list of (t, holders tuple)."""

    def __init__(self, lab, hosts, step=0.01):
        import threading
        self.lab, self.hosts, self.step = lab, list(hosts), step
        self.samples = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), tuple(self.lab.holders(VIP, self.hosts))))
            time.sleep(self.step)

    def stop(self):
        self._stop.set()
        self._t.join()
        return self.samples


# ---------------------------------------------------------------- ternd nodes
def ha_section(interface="eth0", vrid=VRID, priority=100, advert_interval="10ms",
               virtual_addresses=(VIP_CIDR,), preempt=True, preempt_delay="0s", unicast_peers=(),
               backend="kernel", dpdk_args=None, use_vmac=False, garp_burst=5, garp_refresh="60s",
               health_priority_drop=0, heartbeat_timeout="1s", address_lifetime="5s", tag=""):
    """ternd's [ha] section (issue 7) as TOML text."""
    if dpdk_args is None:
        # --file-prefix keeps two EALs on one machine apart even if a run forgets --no-shconf.
        dpdk_args = ("--no-huge -m 64 --no-pci --no-shconf --no-telemetry -l 1 "
                     f"--file-prefix=ternlab{tag} --vdev net_af_packet0,iface={interface}")
    q = lambda xs: "[" + ", ".join(f'"{x}"' for x in xs) + "]"
    b = lambda v: "true" if v else "false"
    return "\n".join([
        "[ha]",
        f'interface = "{interface}"',
        f"vrid = {vrid}",
        f"priority = {priority}",
        f'advert_interval = "{advert_interval}"',
        f"virtual_addresses = {q(virtual_addresses)}",
        f"preempt = {b(preempt)}",
        f'preempt_delay = "{preempt_delay}"',
        f"unicast_peers = {q(unicast_peers)}",
        f'backend = "{backend}"',
        f'dpdk_args = "{dpdk_args}"',
        f"use_vmac = {b(use_vmac)}",
        f"garp_burst = {garp_burst}",
        f'garp_refresh = "{garp_refresh}"',
        f"health_priority_drop = {health_priority_drop}",
        f'heartbeat_timeout = "{heartbeat_timeout}"',
        f'address_lifetime = "{address_lifetime}"',
    ]) + "\n"


def ternd_has_ha(ternd=None):
    """(True, "") when this ternd accepts an [ha] section; else (False, why). Support is
    probed with the five basic keys, so that a ternd with HA that rejects one of the other
    keys these tests use is an error (raised), not a silent skip."""
    import tempfile
    from conftest import TERND
    ternd = ternd or TERND
    if not os.path.exists(ternd):
        return False, f"{ternd} is not built"

    def check(ha_text):
        with tempfile.TemporaryDirectory() as d:
            cfg = Path(d) / "ha.toml"
            cfg.write_text("\n".join([
                'hostname = "relay.test"', "shards = 1", "[spool]", f'dir = "{d}/spool"',
                "[[listen]]", f'address = "{VIP}:{PORT}"',
                "[relay]", 'networks = ["198.18.0.0/24"]', "domains = []"]) + "\n" + ha_text)
            r = subprocess.run([ternd, "--check-config", str(cfg)], capture_output=True, text=True)
        return r.returncode, r.stdout + r.stderr

    basic = "\n".join(["[ha]", 'interface = "eth0"', f"vrid = {VRID}", "priority = 100",
                       'advert_interval = "10ms"', f'virtual_addresses = ["{VIP_CIDR}"]']) + "\n"
    rc, out = check(basic)
    if rc != 0:
        if re.search(r"\bha\b.*unknown|unknown.*\bha\b", out):
            return False, "ternd has no [ha] support yet: " + out.strip().splitlines()[0]
        raise RuntimeError(f"ternd --check-config rejects a basic [ha] section:\n{out}")
    rc, out = check(ha_section())
    if rc != 0:
        raise RuntimeError(f"ternd --check-config rejects the [ha] section the HA tests use:\n{out}")
    return True, ""


HA_LOG_RE = re.compile(r"ha: VRID (\d+) (\w+) -> (\w+) \(reason ([^)]*)\)")


class TerndNode:
    """ternd with an [ha] section inside host's namespace, listening on VIP:PORT (it binds
    with IP_FREEBIND, so the backup listens too). Same shape as KeepalivedNode."""

    kind = "ternd"

    def __init__(self, lab, host, tmp, priority, interval, backend="kernel", shards=1,
                 spool=None, env=None, **ha):
        from conftest import Ternd
        self.lab, self.host = lab, host
        self.dir = Path(tmp) / f"ternd-{host}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.priority, self.interval = priority, interval
        extra = ha_section(priority=priority, advert_interval=interval, backend=backend,
                           tag=f"{os.getpid()}{host}", **ha)
        self.t = Ternd(self.dir, shards=shards, listens=[{"address": f"{VIP}:{PORT}"}],
                       networks=("198.18.0.0/24",), spool=spool, extra=extra,
                       argv_prefix=lab.exec_prefix(host),
                       env=None if env is None else {**os.environ, **env})
        self.proc = None

    def start(self, timeout=20):
        self.t.start(timeout)
        self.proc = self.t.proc
        self.lab.procs.append(self.proc)  # the lab kills it if a test forgets
        return self

    def stop(self, timeout=20):
        """SIGTERM: a master stops accepting, sends priority 0, then drains. The exit code."""
        return self.t.stop(timeout)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.t.kill9()

    def log(self):
        return self.t.log()

    def transitions(self):
        return [(f, t) for _, f, t, _ in HA_LOG_RE.findall(self.log())]

    def reasons(self):
        return [(f, t, r) for _, f, t, r in HA_LOG_RE.findall(self.log())]

    def state(self):
        tr = self.transitions()
        return tr[-1][1] if tr else "INIT"


def ternd_node(lab, host, priority, interval, tmp, backend="kernel", start=True, **kw):
    """A ternd HA node on host: TerndNode(...).start()."""
    n = TerndNode(lab, host, tmp, priority, interval, backend=backend, **kw)
    return n.start() if start else n


# ---------------------------------------------------------------- forged adverts
def inet_checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff


def vrrp_frame(src_mac, src_ip, vrid=VRID, priority=100, interval_cs=1, addrs=(VIP,), ttl=255,
               bad_checksum=False, truncate=None, dst_ip="224.0.0.18"):
    """An Ethernet frame carrying a VRRPv3 advert (RFC 5798 5.1), well formed unless told:
    ttl, bad_checksum (the VRRP checksum off by one), truncate (keep only that many bytes
    of the VRRP message, the IP header's length consistent with it)."""
    import socket as s_
    import struct
    hdr = struct.pack("!BBBBH", 0x31, vrid, priority, len(addrs), interval_cs & 0x0fff)
    body = hdr + b"\0\0" + b"".join(s_.inet_aton(a) for a in addrs)
    pseudo = s_.inet_aton(src_ip) + s_.inet_aton(dst_ip) + struct.pack("!BBH", 0, 112, len(body))
    c = inet_checksum(pseudo + body)
    if bad_checksum:
        c = (c + 1) & 0xffff
    body = body[:6] + struct.pack("!H", c) + body[8:]
    if truncate is not None:
        body = body[:truncate]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0xc0, 20 + len(body), 0, 0, ttl, 112, 0,
                     s_.inet_aton(src_ip), s_.inet_aton(dst_ip))
    ip = ip[:10] + struct.pack("!H", inet_checksum(ip)) + ip[12:]
    d = dst_ip.split(".")
    dst_mac = bytes([0x01, 0x00, 0x5e, int(d[1]) & 0x7f, int(d[2]), int(d[3])])
    return dst_mac + bytes.fromhex(src_mac.replace(":", "")) + b"\x08\x00" + ip + body


_SENDER = r"""
import socket, sys, time
frames = [bytes.fromhex(l) for l in sys.stdin.read().split()]
count, gap = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for i in range(count):
    for f in frames:
        s.send(f)
    time.sleep(gap)
"""


def send_frames(lab, host, frames, count=1, gap=0.005):
    """Send raw Ethernet frames from host's eth0 (AF_PACKET), each count times, gap apart."""
    import sys
    r = subprocess.run(lab.exec_prefix(host) + ["/usr/bin/python3", "-c", _SENDER, str(count), str(gap)],
                       input="\n".join(f.hex() for f in frames), capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"frame sender failed: {r.stderr}")


_SNIFFER = r"""
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind(("eth0", 0))
s.settimeout(0.05)
end = time.time() + float(sys.argv[1])
n = 0
while time.time() < end:
    try:
        f = s.recv(2048)
    except socket.timeout:
        continue
    if len(f) > 34 and f[23] == 112:
        print(socket.inet_ntoa(f[26:30]), socket.inet_ntoa(f[30:34]), f[22], flush=True)
"""


def sniff_vrrp(lab, host, seconds):
    """VRRP packets host's eth0 sees for seconds: a list of (src, dst, ttl)."""
    r = subprocess.run(lab.exec_prefix(host) + ["/usr/bin/python3", "-c", _SNIFFER, str(seconds)],
                       capture_output=True, text=True, timeout=seconds + 30)
    return [tuple(l.split()[:2]) + (int(l.split()[2]),) for l in r.stdout.splitlines() if l.strip()]
