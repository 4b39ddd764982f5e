"""Delivery to next hops given by name: a real ternd, a real DNS server (Debian's dnsmasq,
started here on a free loopback port, as tests/unit/dns/resolver_test.cc does) and real
next hops (tern-sink listening on 127.0.0.x: the whole of 127/8 is loopback, so each name
can point at its own address while every sink of a test shares one port).

Hermetic: dnsmasq serves only the local zone `test.` given on its command line (no
resolv.conf, no hosts file, no upstream); ternd's `[dns] servers` points at it and
`use_hosts = false` unless the hosts file is what is tested. SERVFAIL comes from a
sub-zone dnsmasq forwards to a UDP responder run here; a timeout from a sub-zone forwarded
to a bound UDP socket nobody reads.

`queue.retry = ["1h"]` where a test proves that something happened *without* a retry."""
import shutil
import smtplib
import socket
import subprocess
import threading
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from conftest import free_port, wait_for

DNSMASQ = next((p for p in ("/usr/sbin/dnsmasq", "/usr/bin/dnsmasq", "/sbin/dnsmasq")
                if shutil.which(p)), None)

pytestmark = pytest.mark.skipif(DNSMASQ is None, reason="dnsmasq is not installed (Debian package "
                                "dnsmasq-base; tools/setup.sh installs it)")

# The zone. Each name points at its own loopback address; a test puts sinks on some of
# them (all on the test's one port) and leaves the others without a listener ("down":
# a connection there is refused at once).
ZONE = [
    # 1. a smarthost by name
    "--host-record=smart.test,127.0.0.2",
    # 2. three MX hosts, given out of order; mx.test itself has no A record
    "--mx-host=mx.test,mx2.test,20", "--mx-host=mx.test,mx3.test,30", "--mx-host=mx.test,mx1.test,10",
    "--host-record=mx1.test,127.0.0.2", "--host-record=mx2.test,127.0.0.3", "--host-record=mx3.test,127.0.0.4",
    # 3. no MX: the domain's own address is its implicit MX
    "--host-record=implicit.test,127.0.0.3",
    # 5. priorities and weights
    "--host-record=first.test,127.0.0.6", "--host-record=second.test,127.0.0.3",
    # a name with two addresses, the first (A) without a listener
    "--host-record=dual.test,127.0.0.6,::1", "--host-record=v6.test,::1",
    # 6. the LMTP mailbox server of a route
    "--host-record=lmtp.test,127.0.0.5",
]


def dns_query(port, name, qtype=1, timeout=0.2):
    """One raw DNS query on UDP; the answer's bytes, or None (readiness probe)."""
    q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\x00" + qtype.to_bytes(2, "big") + b"\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(q, ("127.0.0.1", port))
        try:
            return s.recv(512)
        except socket.timeout:
            return None


class Dnsmasq:
    """dnsmasq on 127.0.0.1 at a free port with ZONE, plus a SERVFAIL upstream for
    sf.test and a silent one for slow.test."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.quit = False
        self.upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.upstream.bind(("127.0.0.1", 0))
        self.upstream.settimeout(0.1)
        self.dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.dead.bind(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self.servfail, daemon=True)
        self.thread.start()
        self.proc = None
        self.logpath = tmp / "dnsmasq.log"

    def servfail(self):
        # Every query answered with its own bytes, QR set and RCODE 2: dnsmasq passes it on.
        while not self.quit:
            try:
                q, peer = self.upstream.recvfrom(1500)
            except socket.timeout:
                continue
            except OSError:
                return
            if len(q) < 12:
                continue
            a = bytearray(q)
            a[2] |= 0x80
            a[3] = (a[3] & 0xF0) | 2
            self.upstream.sendto(bytes(a), peer)

    def start(self):
        # A free port: bind port 0, close, hand it over. Another process may take it in
        # between; dnsmasq then exits and another port is tried.
        for _ in range(5):
            self.port = free_port()
            up, dead = self.upstream.getsockname()[1], self.dead.getsockname()[1]
            args = [DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                    "--no-poll", f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
                    "--pid-file=", "--cache-size=0", "--log-queries", "--log-facility=-", "--local=/test/",
                    "--local-ttl=300", *ZONE,
                    f"--server=/sf.test/127.0.0.1#{up}", f"--server=/slow.test/127.0.0.1#{dead}"]
            self.logf = open(self.logpath, "ab")
            self.proc = subprocess.Popen(args, stdout=self.logf, stderr=self.logf)
            deadline = time.time() + 5
            while time.time() < deadline and self.proc.poll() is None:
                if dns_query(self.port, "smart.test"):
                    return self
                time.sleep(0.05)
            self.stop_proc()
        raise RuntimeError("dnsmasq did not start:\n" + self.log())

    def log(self):
        return self.logpath.read_text(errors="replace") if self.logpath.exists() else ""

    def stop_proc(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.logf.close()

    def stop(self):
        self.stop_proc()
        self.quit = True
        self.thread.join(2)
        self.upstream.close()
        self.dead.close()


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory):
    d = Dnsmasq(tmp_path_factory.mktemp("dnsmasq")).start()
    yield d
    d.stop()


def written(t):
    """The queue once the first attempt's status record is in the spool: a round's records
    ride on the next group commit (at most 20 ms later), after its log line."""
    return wait_for(lambda: [m for m in t.spool_list() if m["attempts"] >= 1]) or t.spool_list()


def test_dnsmasq_serves_the_zone(dnsmasq):
    """The fixture itself: an A answer for a zone name, NXDOMAIN for another (RCODE 3),
    SERVFAIL passed on from the sub-zone's upstream (RCODE 2)."""
    a = dns_query(dnsmasq.port, "smart.test")
    assert a and a[3] & 0x0F == 0 and a[6:8] == b"\x00\x01" and a.endswith(bytes([127, 0, 0, 2]))
    assert dns_query(dnsmasq.port, "nx.test")[3] & 0x0F == 3
    assert dns_query(dnsmasq.port, "relay.sf.test", timeout=2)[3] & 0x0F == 2


# --- helpers -------------------------------------------------------------------------------

def common_port(addrs):
    """A TCP port free on every one of these loopback addresses (sinks share it)."""
    for _ in range(50):
        port = free_port(addrs[0])
        socks = []
        try:
            for a in addrs:
                s = socket.socket(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((a, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no common free port")


ALL = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6", "::1"]


def toml(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml(x) for x in v) + "]"
    return '"' + v + '"'


def hop(host, port, table="smarthost", **kw):
    kw.setdefault("tls", "none")
    lines = [f"[[{table}]]", f"host = {toml(host)}", f"port = {port}"]
    lines += [f"{k} = {toml(v)}" for k, v in kw.items()]
    return "\n".join(lines) + "\n"


def queue_cfg(retry="1h"):
    return f'[queue]\nretry = ["{retry}"]\njitter = 0\n'


def dns_cfg(d, use_hosts=False, timeout=None, tries=None):
    s = f'[dns]\nservers = ["127.0.0.1:{d.port}"]\nuse_hosts = {toml(use_hosts)}\n'
    if timeout:
        s += f'timeout = "{timeout}"\n'
    if tries:
        s += f"tries = {tries}\n"
    return s


def send(port, rcpts, subject, sender="sender@origin.test"):
    m = EmailMessage()
    m["From"] = sender
    m["To"] = ", ".join(rcpts)
    m["Subject"] = subject
    m["Message-ID"] = f"<{subject}@origin.test>"
    m.set_content("hello\r\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.send_message(m, from_addr=sender, to_addrs=rcpts)



def saving_sink(sink_factory, addr, port, *args):
    """A tern-sink on addr:port saving what it accepts into its own directory."""
    s = sink_factory(*args, listen=f"{addr}:{port}", start=False)
    s.save_dir = s.tmp / "out"
    s.save_dir.mkdir()
    s.args += ["--save", str(s.save_dir)]
    return s.start()


def saved(sink):
    """(envelope header, content) of each message the sink saved."""
    out = []
    for p in sorted(sink.save_dir.glob("*.eml")):
        head, _, content = p.read_bytes().partition(b"\n\n")
        out.append((head.decode(), content))
    return out


def asked_for(d, name):
    """How many A queries for name dnsmasq has logged (it caches nothing: --cache-size=0)."""
    return d.log().count(f"query[A] {name} from ")


def log_lines(t, text):
    return [l for l in t.log().splitlines() if text in l]


def deferred_line(t, timeout=10):
    assert t.wait_log("status=deferred", timeout=timeout), t.log()
    return log_lines(t, "status=deferred")[0]


# --- 1. a smarthost by name ------------------------------------------------------------------

def test_smarthost_by_name_receives_the_mail(ternd_factory, sink_factory, dnsmasq):
    port = common_port(ALL)
    sink = saving_sink(sink_factory, "127.0.0.2", port)
    t = ternd_factory(extra=hop("smart.test", port) + queue_cfg() + dns_cfg(dnsmasq)).start()
    send(t.port, ["a@example.com"], "byname")
    assert wait_for(lambda: len(saved(sink)) == 1), t.log()
    head, content = saved(sink)[0]
    assert "X-Sink-Rcpt-To: <a@example.com>" in head and b"byname@origin.test" in content
    assert wait_for(lambda: t.spool_list() == [])
    # postfix's relay=name[address]:port: the name asked and the address it resolved to.
    assert t.wait_log(f"relay=smart.test[127.0.0.2]:{port}, "), t.log()
    assert "smart.test" in dnsmasq.log()  # the answer came from our server


# --- 2. MX -------------------------------------------------------------------------------------

def mx_sinks(sink_factory, port, addrs):
    return {a: saving_sink(sink_factory, a, port) for a in addrs}


def test_mx_most_preferred_host_receives_the_mail(ternd_factory, sink_factory, dnsmasq):
    port = common_port(ALL)
    sinks = mx_sinks(sink_factory, port, ["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    t = ternd_factory(extra=hop("mx.test", port, mx=True) + queue_cfg() + dns_cfg(dnsmasq)).start()
    send(t.port, ["a@example.com", "b@example.com"], "mxbest")
    assert wait_for(lambda: len(saved(sinks["127.0.0.2"])) == 1), t.log()
    assert wait_for(lambda: t.spool_list() == [])
    assert saved(sinks["127.0.0.3"]) == [] and saved(sinks["127.0.0.4"]) == []
    sent = log_lines(t, "status=sent")
    assert len(sent) == 2 and all(f"relay=mx1.test[127.0.0.2]:{port}," in l for l in sent), t.log()


def test_mx_next_host_takes_the_mail_at_once_when_the_best_is_down(ternd_factory, sink_factory, dnsmasq):
    port = common_port(ALL)
    # mx1.test (127.0.0.2, preference 10) has no listener: connections are refused.
    sinks = mx_sinks(sink_factory, port, ["127.0.0.3", "127.0.0.4"])
    t = ternd_factory(extra=hop("mx.test", port, mx=True) + queue_cfg("1h") + dns_cfg(dnsmasq)).start()
    send(t.port, ["a@example.com"], "mxnext")
    # RFC 5321 5.1: try the MX hosts in order of preference; a retry interval of an hour means
    # only trying mx2 within this attempt can deliver in time.
    assert wait_for(lambda: len(saved(sinks["127.0.0.3"])) == 1, timeout=5), t.log()
    assert saved(sinks["127.0.0.4"]) == []
    assert t.wait_log(f"relay=mx2.test[127.0.0.3]:{port},"), t.log()


def test_mx_every_host_down_is_deferred_4_4_1_and_kept(ternd_factory, dnsmasq):
    """No MX host listening: one deferral per attempt naming an MX host and the reason, the
    message kept, and (retry 1 h) no second attempt. True before and after the gap above
    is closed."""
    port = common_port(ALL)
    t = ternd_factory(extra=hop("mx.test", port, mx=True) + queue_cfg("1h") + dns_cfg(dnsmasq)).start()
    send(t.port, ["a@example.com"], "mxdown")
    line = deferred_line(t)
    assert "dsn=4.4.1" in line and "Connection refused" in line, line
    assert any(f"mx{i}.test[127.0.0.{i + 1}]:{port}" in line for i in (1, 2, 3)), line
    q = written(t)
    assert len(q) == 1 and q[0]["attempts"] == 1 and q[0]["recipient_state"][0]["dsn"] == "4.4.1", q
    time.sleep(1)
    assert len(log_lines(t, "status=deferred")) == 1, t.log()


def test_smarthost_name_with_only_an_ipv6_address(ternd_factory, sink_factory, dnsmasq):
    """AAAA only (A is NODATA): delivered over IPv6 (also shows the set-up of the next test
    works when the address is the first one)."""
    port = common_port(ALL)
    sink = saving_sink(sink_factory, "[::1]", port)
    t = ternd_factory(extra=hop("v6.test", port) + queue_cfg() + dns_cfg(dnsmasq)).start()
    send(t.port, ["a@example.com"], "v6")
    assert wait_for(lambda: len(saved(sink)) == 1), t.log()
    assert t.wait_log(f"relay=v6.test[::1]:{port}, "), t.log()


def test_name_with_two_addresses_the_second_takes_the_mail_when_the_first_is_down(ternd_factory, sink_factory, dnsmasq):
    port = common_port(ALL)
    # dual.test: A 127.0.0.6 (nothing listens), AAAA ::1 (a sink). A comes first (dns.md).
    sink = saving_sink(sink_factory, "[::1]", port)
    t = ternd_factory(extra=hop("dual.test", port) + queue_cfg("1h") + dns_cfg(dnsmasq)).start()
    send(t.port, ["a@example.com"], "dual")
    assert wait_for(lambda: len(saved(sink)) == 1, timeout=5), t.log()
    assert t.wait_log(f"relay=dual.test[::1]:{port}, "), t.log()


# --- 3. no MX: implicit MX ---------------------------------------------------------------------

def test_mx_without_mx_records_uses_the_domains_own_address(ternd_factory, sink_factory, dnsmasq):
    port = common_port(ALL)
    sink = saving_sink(sink_factory, "127.0.0.3", port)
    t = ternd_factory(extra=hop("implicit.test", port, mx=True) + queue_cfg() + dns_cfg(dnsmasq)).start()
    send(t.port, ["a@example.com"], "implicit")
    assert wait_for(lambda: len(saved(sink)) == 1), t.log()
    assert t.wait_log(f"relay=implicit.test[127.0.0.3]:{port}, "), t.log()
    assert wait_for(lambda: t.spool_list() == [])


# --- 4. DNS failures -------------------------------------------------------------------------

def route(domains, host, port, **kw):
    return hop(host, port, table="route", domains=domains, **kw)


def test_nxdomain_for_a_routes_host_is_deferred_4_4_4_and_says_so(ternd_factory, dnsmasq):
    t = ternd_factory(extra=route(["example.org"], "nx.test", 25) + queue_cfg() + dns_cfg(dnsmasq)).start()
    send(t.port, ["a@example.org"], "nx")
    line = deferred_line(t)
    assert "to=<a@example.org>" in line and "dsn=4.4.4" in line, line
    assert "nx.test" in line and "name does not exist" in line, line
    q = written(t)
    assert len(q) == 1 and q[0]["recipient_state"][0]["state"] == "deferred"
    assert q[0]["recipient_state"][0]["dsn"] == "4.4.4"
    assert "status=bounced" not in t.log()  # a name in the config is never a bounce


def test_servfail_for_a_routes_host_is_deferred_4_4_3(ternd_factory, dnsmasq):
    t = ternd_factory(extra=route(["example.org"], "relay.sf.test", 25) + queue_cfg()
                      + dns_cfg(dnsmasq)).start()
    send(t.port, ["a@example.org"], "sf")
    line = deferred_line(t)
    assert "dsn=4.4.3" in line and "relay.sf.test" in line, line
    assert "SERVFAIL" in line.upper() or "server failure" in line.lower(), line
    assert written(t)[0]["recipient_state"][0]["dsn"] == "4.4.3"


def test_dns_timeout_for_a_routes_host_is_deferred_4_4_3(ternd_factory, dnsmasq):
    t = ternd_factory(extra=route(["example.org"], "relay.slow.test", 25) + queue_cfg()
                      + dns_cfg(dnsmasq, timeout="100ms", tries=1)).start()
    send(t.port, ["a@example.org"], "slow")
    line = deferred_line(t, timeout=15)
    assert "dsn=4.4.3" in line and "relay.slow.test" in line, line
    assert "name does not exist" not in line, line
    assert written(t)[0]["recipient_state"][0]["dsn"] == "4.4.3"


# --- 5. priorities and weights -----------------------------------------------------------------

def test_priority_10_down_priority_20_up_delivers_at_once(ternd_factory, sink_factory, dnsmasq):
    port = common_port(ALL)
    sink = saving_sink(sink_factory, "127.0.0.3", port)  # second.test; first.test (.6) is down
    extra = (hop("first.test", port, priority=10) + hop("second.test", port, priority=20)
             + queue_cfg("1h") + dns_cfg(dnsmasq))
    t = ternd_factory(extra=extra).start()
    asked = asked_for(dnsmasq, "first.test")
    send(t.port, ["a@example.com"], "prio")
    assert wait_for(lambda: len(saved(sink)) == 1, timeout=5), t.log()
    assert t.wait_log(f"relay=second.test[127.0.0.3]:{port}, "), t.log()
    assert "status=deferred" not in t.log()
    assert asked_for(dnsmasq, "first.test") > asked, "the priority-10 host was tried first"


def test_equal_priority_the_heavy_host_down_the_light_one_delivers_at_once(ternd_factory, sink_factory, dnsmasq):
    """Weights: the host with nearly all the weight is down; the other one of the same
    priority takes the mail in the same attempt."""
    port = common_port(ALL)
    sink = saving_sink(sink_factory, "127.0.0.3", port)
    extra = (hop("first.test", port, priority=5, weight=1000000) + hop("second.test", port, priority=5, weight=1)
             + queue_cfg("1h") + dns_cfg(dnsmasq))
    t = ternd_factory(extra=extra).start()
    asked = asked_for(dnsmasq, "first.test")
    for i in range(3):
        send(t.port, [f"a{i}@example.com"], f"weight{i}")
    assert wait_for(lambda: len(saved(sink)) == 3, timeout=5), t.log()
    assert "status=deferred" not in t.log()
    # Picked first with odds of 10^6 to 1 (a failed host is then skipped, not asked again).
    assert asked_for(dnsmasq, "first.test") > asked, "the heavy host was tried"


# --- 6. a route to an LMTP server by name --------------------------------------------------------

def test_lmtp_route_by_name_per_recipient_results(ternd_factory, sink_factory, dnsmasq):
    port = common_port(ALL)
    sink = saving_sink(sink_factory, "127.0.0.5", port, "--lmtp",
                       "--lmtp-rcpt", "gone@*=550 5.2.1 mailbox disabled")
    extra = route(["internal.test"], "lmtp.test", port, protocol="lmtp") + queue_cfg("1h") + dns_cfg(dnsmasq)
    t = ternd_factory(extra=extra).start()
    send(t.port, ["ok@internal.test", "gone@internal.test"], "lmtp")
    assert wait_for(lambda: len(saved(sink)) == 1), t.log()
    head, content = saved(sink)[0]
    assert "X-Sink-Rcpt-To: <ok@internal.test>" in head and "gone@" not in head, head
    assert t.wait_log("status=bounced"), t.log()
    assert t.wait_log("status=sent")
    bounced = log_lines(t, "status=bounced")
    sent = log_lines(t, "status=sent")
    assert len(bounced) == 1 and "to=<gone@internal.test>" in bounced[0] and "dsn=5.2.1" in bounced[0], bounced
    assert f"relay=lmtp.test[127.0.0.5]:{port}," in bounced[0] and "550 5.2.1 mailbox disabled" in bounced[0]
    assert len(sent) == 1 and "to=<ok@internal.test>" in sent[0], sent
    # The original is done, each recipient with its own result. (A bounce to the sender,
    # once DSNs are sent, would be a message of its own from <>.)
    def original(all):
        return [m for m in t.spool_list(all=all) if "ok@internal.test" in m["recipients"]]
    assert wait_for(lambda: original(False) == []), t.spool_list()
    (m,) = original(True)
    states = {r["address"]: (r["state"], r["dsn"]) for r in m["recipient_state"]}
    assert states["ok@internal.test"][0] == "delivered", states
    assert states["gone@internal.test"] == ("failed", "5.2.1"), states


# --- 7. the hosts file ---------------------------------------------------------------------------

def test_hosts_file_answers_localhost_when_use_hosts(ternd_factory, sink_factory, dnsmasq):
    if "localhost" not in Path("/etc/hosts").read_text():
        pytest.skip("/etc/hosts has no localhost line")
    port = common_port(ALL)
    sink = saving_sink(sink_factory, "127.0.0.1", port)
    asked = asked_for(dnsmasq, "localhost")
    t = ternd_factory(extra=hop("localhost", port) + queue_cfg() + dns_cfg(dnsmasq, use_hosts=True)).start()
    send(t.port, ["a@example.com"], "hosts")
    assert wait_for(lambda: len(saved(sink)) == 1), t.log()
    assert t.wait_log(f"relay=localhost[127.0.0.1]:{port}, "), t.log()
    assert asked_for(dnsmasq, "localhost") == asked, "the hosts file answered, not DNS"


def test_hosts_file_is_not_read_when_use_hosts_is_false(ternd_factory, sink_factory, dnsmasq):
    """The control of the test above: our DNS server does not know `localhost`, so
    without the hosts file the name does not resolve and nothing is delivered."""
    port = common_port(ALL)
    sink = saving_sink(sink_factory, "127.0.0.1", port)
    t = ternd_factory(extra=hop("localhost", port) + queue_cfg() + dns_cfg(dnsmasq, use_hosts=False)).start()
    send(t.port, ["a@example.com"], "nohosts")
    line = deferred_line(t)
    assert "localhost" in line and ("dsn=4.4.4" in line or "dsn=4.4.3" in line), line
    assert saved(sink) == []
