"""Delivery: ternd relays what it accepted to its next hop, a real peer from Debian
(postfix's smtp-sink) or a scripted server where a peer must misbehave on purpose.
Retries, fail-over between smarthosts, per-recipient results, state across restarts,
TLS policy without STARTTLS, and spool reclamation."""
import glob
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from conftest import free_port, wait_for

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"


class Sink:
    """postfix's smtp-sink on a loopback port, dumping every transaction to a file."""

    def __init__(self, tmp, port=None, extra=()):
        self.port = port or free_port()
        # smtp-sink drops to "nobody": its dump directory must be reachable for that user
        # (pytest's tmp_path is not), so it gets one of its own under /tmp.
        self.dir = Path(tempfile.mkdtemp(prefix="tern-sink-"))
        os.chmod(self.dir, 0o777)
        self.proc = subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", "-d", str(self.dir) + "/%H%M%S.", *extra, f"127.0.0.1:{self.port}", "100"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 5
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("smtp-sink did not start")

    def messages(self):
        out = []
        for f in sorted(glob.glob(str(self.dir / "*"))):
            with open(f, "rb") as fh:
                out.append(fh.read())
        return out

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def sinks(tmp_path):
    made = []

    def make(**kw):
        s = Sink(tmp_path, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def smarthost(port, **kw):
    lines = ["[[smarthost]]", 'host = "127.0.0.1"', f"port = {port}", f'tls = "{kw.pop("tls", "none")}"']
    for k, v in kw.items():
        lines.append(f"{k} = {v if isinstance(v, int) else chr(34) + v + chr(34)}")
    return "\n".join(lines) + "\n"


def queue_cfg(retry='["1s"]', **kw):
    lines = ["[queue]", f"retry = {retry}", "jitter = 0"]
    lines += [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in kw.items()]
    return "\n".join(lines) + "\n"


def send(port, rcpts, subject="test", body="hello\r\n", sender="sender@origin.test"):
    m = EmailMessage()
    m["From"] = sender
    m["To"] = ", ".join(rcpts)
    m["Subject"] = subject
    m["Message-ID"] = f"<{subject}@origin.test>"
    m.set_content(body)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.send_message(m, from_addr=sender, to_addrs=rcpts)




class ScriptedHop:
    """A next hop that answers by script, for peers that must misbehave on purpose.
    `answer(line, session)` returns the reply to a command line (None: the default, 250 ok);
    EHLO gets `ehlo`, DATA gets 354 and its content is read to the dot, then `data_reply`;
    QUIT ends the session. Every line received goes to `lines`; each message's accepted
    RCPT lines go to `messages`."""

    def __init__(self, answer=None, ehlo=b"250-fake\r\n250 PIPELINING\r\n", greeting=b"220 fake ESMTP\r\n",
                 data_reply=b"250 2.0.0 queued\r\n"):
        self.port = free_port()
        self.answer, self.ehlo, self.greeting, self.data_reply = answer, ehlo, greeting, data_reply
        self.lines, self.messages = [], []
        self.srv = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            with c:
                c.sendall(self.greeting)
                f = c.makefile("rb")
                session = {"rcpts": []}
                while True:
                    line = f.readline()
                    if not line:
                        break
                    self.lines.append(line)
                    cmd = line.strip().upper()
                    if cmd.startswith(b"EHLO"):
                        c.sendall(self.ehlo)
                    elif cmd == b"DATA":
                        c.sendall(b"354 go\r\n")
                        while f.readline() not in (b".\r\n", b""):
                            pass
                        self.messages.append(session["rcpts"])
                        session["rcpts"] = []
                        c.sendall(self.data_reply)
                    elif cmd == b"QUIT":
                        c.sendall(b"221 bye\r\n")
                        break
                    else:
                        r = self.answer(line, session) if self.answer else None
                        if r is None and cmd.startswith(b"RCPT"):
                            session["rcpts"].append(line.strip())
                        c.sendall(r or b"250 ok\r\n")

    def close(self):
        self.srv.close()


def test_relays_to_the_smarthost_and_empties_the_queue(ternd_factory, sinks):
    sink = sinks()
    t = ternd_factory(extra=smarthost(sink.port) + queue_cfg()).start()
    for i in range(5):
        send(t.port, [f"user{i}@example.com", f"other{i}@example.net"], subject=f"relay-{i}")
    assert wait_for(lambda: len(sink.messages()) == 5), t.log()
    assert wait_for(lambda: t.spool_list() == []), t.spool_list()
    got = b"".join(sink.messages())
    for i in range(5):
        assert f"relay-{i}@origin.test".encode() in got
        assert f"user{i}@example.com".encode() in got
    log = t.log()
    assert log.count("status=sent (250") == 10, log
    assert log.count(": removed") == 5
    # postfix's format: to, relay, delay, delays, dsn, status
    line = next(l for l in log.splitlines() if "status=sent" in l)
    assert f"relay=127.0.0.1[127.0.0.1]:{sink.port}, delay=" in line and ", delays=" in line and ", dsn=2.0.0," in line


def test_deferred_while_the_smarthost_is_down_then_delivered(ternd_factory, sinks):
    port = free_port()
    t = ternd_factory(extra=smarthost(port) + queue_cfg()).start()
    send(t.port, ["a@example.com"], subject="later")
    assert t.wait_log("status=deferred (connect to 127.0.0.1[127.0.0.1]")
    q = wait_for(lambda: [m for m in t.spool_list() if m["attempts"] >= 1])
    assert q and q[0]["recipient_state"][0]["state"] == "deferred", t.spool_list()
    assert q[0]["recipient_state"][0]["dsn"] == "4.4.1"
    sink = sinks(port=port)
    assert wait_for(lambda: len(sink.messages()) == 1, timeout=20), t.log()
    assert wait_for(lambda: t.spool_list() == [])


def test_second_smarthost_takes_the_mail_at_once(ternd_factory, sinks):
    dead = free_port()
    sink = sinks()
    # A retry interval of an hour: only an immediate fail-over can deliver in time.
    extra = smarthost(dead, priority=0) + smarthost(sink.port, priority=10) + queue_cfg(retry='["1h"]')
    t = ternd_factory(extra=extra).start()
    send(t.port, ["a@example.com"], subject="failover")
    assert wait_for(lambda: len(sink.messages()) == 1, timeout=5), t.log()
    # The sink keeps the message before it answers 250; ternd logs after the answer.
    assert t.wait_log("status=sent"), t.log()


def test_permanent_refusal_fails_the_recipient_and_ends_the_message(ternd_factory, sinks):
    sink = sinks(extra=("-f", "RCPT"))
    t = ternd_factory(extra=smarthost(sink.port) + queue_cfg()).start()
    send(t.port, ["nobody@example.com"], subject="refused")
    assert t.wait_log("status=bounced (host 127.0.0.1[127.0.0.1]:", timeout=10), t.log()
    assert "(in reply to RCPT TO command)" in t.log()
    assert wait_for(lambda: t.spool_list() == [])
    assert sink.messages() == [] or all(b"refused@origin.test" not in m for m in sink.messages())


def test_temporary_refusal_is_retried(ternd_factory, sinks):
    sink = sinks(extra=("-r", "RCPT"))
    t = ternd_factory(extra=smarthost(sink.port) + queue_cfg(retry='["1s"]')).start()
    send(t.port, ["busy@example.com"], subject="busy")
    assert wait_for(lambda: t.log().count("status=deferred (host 127.0.0.1") >= 2, timeout=10), t.log()
    q = wait_for(lambda: [m for m in t.spool_list() if m["attempts"] >= 2])
    assert len(q) == 1 and q[0]["attempts"] >= 2


def test_state_survives_a_restart(ternd_factory, sinks):
    port = free_port()
    extra = smarthost(port) + queue_cfg(retry='["1h"]')
    t = ternd_factory(extra=extra).start()
    send(t.port, ["a@example.com", "b@example.com"], subject="restart")
    assert wait_for(lambda: t.spool_list() and t.spool_list()[0]["attempts"] == 1)
    next_at = t.spool_list()[0]["next_attempt"]
    assert t.stop() == 0
    t.start()
    q = t.spool_list()
    assert len(q) == 1 and q[0]["attempts"] == 1 and q[0]["next_attempt"] == next_at
    time.sleep(1)
    assert "status=deferred" not in t.log().split(" started in ")[-1], "no attempt before the next retry time"


def test_only_pending_recipients_are_sent_again(ternd_factory, tmp_path):
    """A scripted next hop that accepts one recipient and defers the other: the retry goes
    to the deferred one only (per-recipient state)."""
    hop = ScriptedHop(lambda line, _: b"450 4.2.1 mailbox busy\r\n"
                      if b"later@" in line and not hop.messages else None,
                      ehlo=b"250-fake\r\n250 8BITMIME\r\n")
    try:
        t = ternd_factory(extra=smarthost(hop.port) + queue_cfg(retry='["1s"]')).start()
        send(t.port, ["now@example.com", "later@example.com"], subject="partial")
        seen = hop.messages
        assert wait_for(lambda: len(seen) == 2, timeout=15), (seen, t.log())
        assert len(seen[0]) == 1 and b"now@" in seen[0][0]
        assert len(seen[1]) == 1 and b"later@" in seen[1][0], seen
        assert wait_for(lambda: t.spool_list() == [])
    finally:
        hop.close()


def test_tls_required_but_not_offered_sends_nothing_in_clear(ternd_factory):
    """tls = "encrypt" to a next hop without STARTTLS: the mail is deferred and no MAIL,
    RCPT or DATA ever reaches the wire."""
    hop = ScriptedHop(greeting=b"220 plain only\r\n", ehlo=b"250-plain\r\n250 PIPELINING\r\n")
    try:
        t = ternd_factory(extra=smarthost(hop.port, tls="encrypt") + queue_cfg(retry='["1h"]')).start()
        send(t.port, ["a@example.com"], subject="secret")
        assert t.wait_log("status=deferred", timeout=10), t.log()
        assert "TLS is required, but was not offered" in t.log()
        words = [l.split()[0].upper() for l in hop.lines if l.strip()]
        assert not {b"MAIL", b"RCPT", b"DATA", b"AUTH"} & set(words), hop.lines
        assert len(t.spool_list()) == 1
    finally:
        hop.close()


def test_no_route_keeps_mail_queued(ternd_factory):
    t = ternd_factory(extra='[[route]]\ndomains = ["inside.test"]\nhost = "127.0.0.1"\nport = 9\ntls = "none"\n'
                      + queue_cfg(retry='["1h"]')).start()
    send(t.port, ["a@outside.test"], subject="noroute")
    assert t.wait_log("status=deferred (no route to the recipient's domain"), t.log()
    assert t.wait_log("dsn=4.3.5")
    assert len(t.spool_list()) == 1


def test_segments_are_reclaimed_as_mail_is_delivered(ternd_factory, sinks):
    sink = sinks()
    t = ternd_factory(extra=smarthost(sink.port) + queue_cfg(),
                      limits={"message_size": 1048576}).start()
    # 1 MiB segments: 400 messages of ~8 KiB roll over a few times.
    t.config.write_text(t.config.read_text().replace("[spool]\n", "[spool]\nsegment_size = 1048576\n"))
    t.stop()
    t.start()
    body = "x" * 8000 + "\r\n"
    with smtplib.SMTP("127.0.0.1", t.port, timeout=10) as s:
        for i in range(400):
            s.sendmail("s@origin.test", [f"r{i}@example.com"], f"Subject: r{i}\r\n\r\n{body}")
    assert wait_for(lambda: len(sink.messages()) == 400, timeout=60), t.log()[-3000:]
    assert wait_for(lambda: t.spool_list() == [])
    segs = lambda: glob.glob(os.path.join(t.spool, "segments", "*.seg"))
    assert wait_for(lambda: len(segs()) <= 2, timeout=10), (segs(), t.log()[-2000:])
    assert "removed: every message in it is done" in t.log()
    assert t.spool_check().returncode == 0


# --- TLS to the next hop -------------------------------------------------------------------

import ssl


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA, a certificate for smarthost.test (and 127.0.0.1), and one from a CA that
    nobody trusts, made with the openssl CLI."""
    d = tmp_path_factory.mktemp("pki")

    def run(*a):
        subprocess.run(a, cwd=d, check=True, capture_output=True)

    for ca in ("ca", "rogue"):
        run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN=tern test {ca}")
    for name, ca in (("server", "ca"), ("rogue-server", "rogue")):
        run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", "/CN=smarthost.test")
        (d / f"{name}.ext").write_text("subjectAltName=DNS:smarthost.test,IP:127.0.0.1\n")
        run("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    # An expired certificate from the trusted CA (openssl ca sets any validity period).
    (d / "ca.cnf").write_text(
        f"[ca]\ndefault_ca = tca\n[tca]\ndatabase = {d}/index.txt\nserial = {d}/serial\n"
        f"new_certs_dir = {d}\ndefault_md = sha256\npolicy = pol\nunique_subject = no\n"
        "[pol]\ncommonName = supplied\n[ext]\nsubjectAltName = DNS:smarthost.test,IP:127.0.0.1\n")
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "expired-server.key", "-out", "expired-server.csr", "-subj", "/CN=smarthost.test")
    run("openssl", "ca", "-batch", "-notext", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key",
        "-in", "expired-server.csr", "-out", "expired-server.pem", "-extensions", "ext",
        "-startdate", "20200101000000Z", "-enddate", "20210101000000Z")
    return d


class StarttlsServer:
    """A scripted next hop that offers STARTTLS (Python's ssl), records what it is told
    and accepts every message. `inject` is sent in clear right after the 220 to STARTTLS;
    max_version limits the TLS versions it speaks."""

    def __init__(self, cert, key, inject=b"", max_version=None, offer_starttls=True, auth=None):
        self.port = free_port()
        self.cleartext, self.messages, self.auth_seen = [], [], []
        self.auth = auth  # None: no AUTH offered; else the expected "\0user\0password"
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        if max_version:
            self.ctx.maximum_version = max_version
        self.inject, self.offer = inject, offer_starttls
        self.srv = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            try:
                self.session(c)
            except (OSError, ssl.SSLError):
                pass
            finally:
                c.close()

    def session(self, c):
        c.sendall(b"220 smarthost.test ESMTP\r\n")
        f = c.makefile("rb")
        tls = False
        rcpts = []
        while True:
            line = f.readline()
            if not line:
                return
            if not tls:
                self.cleartext.append(line)
            cmd = line.strip().upper()
            if cmd.startswith(b"EHLO"):
                caps = b"250-smarthost.test\r\n250-PIPELINING\r\n"
                if self.offer and not tls:
                    caps += b"250-STARTTLS\r\n"
                if self.auth is not None and tls:
                    caps += b"250-AUTH PLAIN LOGIN\r\n"
                c.sendall(caps + b"250 8BITMIME\r\n")
            elif cmd.startswith(b"AUTH"):
                import base64
                self.auth_seen.append((tls, line))
                parts = line.split()
                ok = len(parts) == 3 and base64.b64decode(parts[2]) == self.auth
                c.sendall(b"235 2.7.0 ok\r\n" if ok else b"535 5.7.8 bad credentials\r\n")
            elif cmd == b"STARTTLS":
                c.sendall(b"220 2.0.0 go ahead\r\n" + self.inject)
                c = self.ctx.wrap_socket(c, server_side=True)
                f = c.makefile("rb")
                tls = True
            elif cmd.startswith(b"MAIL"):
                c.sendall(b"250 2.1.0 ok\r\n")
            elif cmd.startswith(b"RCPT"):
                rcpts.append(line)
                c.sendall(b"250 2.1.5 ok\r\n")
            elif cmd == b"DATA":
                c.sendall(b"354 go\r\n")
                data = b""
                while True:
                    l = f.readline()
                    if l in (b".\r\n", b""):
                        break
                    data += l
                self.messages.append((tls, c.version() if tls else None, rcpts, data))
                rcpts = []
                c.sendall(b"250 2.0.0 queued\r\n")
            elif cmd == b"QUIT":
                c.sendall(b"221 bye\r\n")
                return
            else:
                c.sendall(b"250 ok\r\n")

    def close(self):
        self.srv.close()


def tls_hop(port, pki, ca="ca.pem", name="smarthost.test", policy="verify", minv="1.3"):
    return ("[[smarthost]]\nhost = \"127.0.0.1\"\nport = %d\ntls = \"%s\"\ntls_min_version = \"%s\"\n"
            "ca_file = \"%s\"\n" % (port, policy, minv, pki / ca)) + \
           (f'verify_name = "{name}"\n' if policy == "verify" else "")


def clear_commands(srv):
    return {l.split()[0].upper() for l in srv.cleartext if l.strip()}


def test_tls13_verified_delivery(ternd_factory, pki):
    srv = StarttlsServer(pki / "server.pem", pki / "server.key")
    try:
        t = ternd_factory(extra=tls_hop(srv.port, pki) + queue_cfg(retry='["1h"]')).start()
        send(t.port, ["a@example.com"], subject="tls13")
        assert wait_for(lambda: srv.messages, timeout=10), t.log()
        tls, version, rcpts, data = srv.messages[0]
        assert tls and version == "TLSv1.3"
        assert b"tls13@origin.test" in data
        assert clear_commands(srv) <= {b"EHLO", b"STARTTLS"}, srv.cleartext
        assert t.wait_log(f"Verified TLS connection established to 127.0.0.1[127.0.0.1]:{srv.port}: TLSv1.3 with cipher")
        assert wait_for(lambda: t.spool_list() == [])
    finally:
        srv.close()


@pytest.mark.parametrize("case", ["wrong-name", "unknown-ca", "expired", "tls12-only"])
def test_tls_failures_defer_and_send_nothing(ternd_factory, pki, case):
    if case == "expired":
        srv = StarttlsServer(pki / "expired-server.pem", pki / "expired-server.key")
        hop = tls_hop(srv.port, pki)
    elif case == "unknown-ca":
        srv = StarttlsServer(pki / "rogue-server.pem", pki / "rogue-server.key")
        hop = tls_hop(srv.port, pki)
    elif case == "wrong-name":
        srv = StarttlsServer(pki / "server.pem", pki / "server.key")
        hop = tls_hop(srv.port, pki, name="other.test")
    else:
        srv = StarttlsServer(pki / "server.pem", pki / "server.key", max_version=ssl.TLSVersion.TLSv1_2)
        hop = tls_hop(srv.port, pki)
    try:
        t = ternd_factory(extra=hop + queue_cfg(retry='["1h"]')).start()
        send(t.port, ["a@example.com"], subject=case)
        assert t.wait_log("status=deferred", timeout=10), t.log()
        assert srv.messages == []
        assert clear_commands(srv) <= {b"EHLO", b"STARTTLS"}, srv.cleartext
        assert "TLS handshake with" in t.log()
        if case == "wrong-name":
            assert "hostname" in t.log()
        if case == "expired":
            assert "expired" in t.log(), t.log()
        assert len(t.spool_list()) == 1
    finally:
        srv.close()


def test_encrypt_policy_accepts_an_unverified_certificate(ternd_factory, pki):
    srv = StarttlsServer(pki / "rogue-server.pem", pki / "rogue-server.key")
    try:
        t = ternd_factory(extra=tls_hop(srv.port, pki, policy="encrypt") + queue_cfg(retry='["1h"]')).start()
        send(t.port, ["a@example.com"], subject="enc")
        assert wait_for(lambda: srv.messages, timeout=10), t.log()
        assert srv.messages[0][0] is True
        assert t.wait_log("Untrusted TLS connection established")
    finally:
        srv.close()


def test_starttls_response_injection_is_discarded(ternd_factory, pki):
    """Bytes sent in clear after the 220 to STARTTLS (CVE-2011-0411 class) must not be
    read as an answer: the handshake starts after the 220, the injected line is dropped."""
    srv = StarttlsServer(pki / "server.pem", pki / "server.key", inject=b"250 2.0.0 injected\r\n")
    try:
        t = ternd_factory(extra=tls_hop(srv.port, pki) + queue_cfg(retry='["1h"]')).start()
        send(t.port, ["a@example.com"], subject="inject")
        # Either the injected bytes break the handshake (deferred) or they are discarded and
        # the mail goes over TLS; never is anything sent in clear after the 220.
        assert wait_for(lambda: srv.messages or "status=deferred" in t.log(), timeout=10), t.log()
        assert clear_commands(srv) <= {b"EHLO", b"STARTTLS"}, srv.cleartext
        for tls, *_ in srv.messages:
            assert tls
    finally:
        srv.close()


# --- bounces (RFC 3464 delivery status notifications) --------------------------------------

def route(domain, port):
    return f'[[route]]\ndomains = ["{domain}"]\nhost = "127.0.0.1"\nport = {port}\ntls = "none"\n'


def raw_send(port, sender, rcpts, data, mail_params="", rcpt_params=""):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.test")
        code, _ = s.docmd(f"MAIL FROM:<{sender}>{mail_params}")
        assert code == 250
        for r in rcpts:
            code, _ = s.docmd(f"RCPT TO:<{r}>{rcpt_params}")
            assert code == 250
        code, _ = s.data(data)
        assert code == 250


def test_5xx_bounces_to_the_sender_with_a_multipart_report(ternd_factory, sinks):
    refuse = sinks(extra=("-f", "RCPT"))
    home = sinks()
    t = ternd_factory(extra=smarthost(refuse.port) + route("origin.test", home.port) + queue_cfg()).start()
    send(t.port, ["gone@example.com"], subject="bounceme", sender="sender@origin.test")
    assert wait_for(lambda: home.messages(), timeout=10), t.log()
    dsn = home.messages()[0]
    assert b"X-Mail-Args: <>" in dsn, dsn[:300]          # null reverse-path
    assert b"X-Rcpt-Args: <sender@origin.test>" in dsn
    assert b"Content-Type: multipart/report; report-type=delivery-status" in dsn
    assert b"Final-Recipient: rfc822; gone@example.com" in dsn
    assert b"Action: failed" in dsn
    assert b"Diagnostic-Code: smtp; 5" in dsn
    assert b"bounceme@origin.test" in dsn                  # the original comes back
    assert "sender non-delivery notification:" in t.log()
    assert wait_for(lambda: t.spool_list() == []), "the original and its bounce are both done"


def test_only_failed_recipients_are_in_the_bounce_and_never_for_null_sender(ternd_factory, sinks):
    """A scripted next hop refuses one recipient of two: the bounce names that one only.
    A message with a null sender that fails makes no bounce at all."""
    home = sinks()
    hop = ScriptedHop(lambda line, _: b"550 5.1.1 <bad@example.com>: Recipient address rejected\r\n"
                      if line.upper().startswith(b"RCPT") and b"BAD@" in line.upper() else None,
                      data_reply=b"250 2.0.0 ok\r\n")
    port = hop.port
    try:
        t = ternd_factory(extra=smarthost(port) + route("origin.test", home.port) + queue_cfg()).start()
        send(t.port, ["good@example.com", "bad@example.com"], subject="partial-bounce", sender="s@origin.test")
        assert wait_for(lambda: home.messages(), timeout=10), t.log()
        dsn = home.messages()[0]
        assert b"Final-Recipient: rfc822; bad@example.com" in dsn
        assert b"Final-Recipient: rfc822; good@example.com" not in dsn
        assert b"Recipient address rejected" in dsn
        # Null sender: refused, logged, no bounce.
        raw_send(t.port, "", ["bad@example.com"], b"Subject: nullsender\r\n\r\nx\r\n")
        assert t.wait_log("status=bounced", timeout=10)
        time.sleep(1)
        assert len(home.messages()) == 1, "no bounce for a null sender"
        # NOTIFY=NEVER: no bounce either.
        raw_send(t.port, "s@origin.test", ["bad@example.com"], b"Subject: never\r\n\r\nx\r\n",
                 rcpt_params=" NOTIFY=NEVER")
        time.sleep(1.5)
        assert len(home.messages()) == 1, "NOTIFY=NEVER asks for no bounce"
        assert wait_for(lambda: t.spool_list() == [])
    finally:
        hop.close()


def test_deferrals_within_the_lifetime_do_not_bounce(ternd_factory, sinks):
    """Deferred again and again within queue.max_lifetime: no bounce yet. (Expiry itself,
    4.4.7 after the lifetime, is tested on the queue manager with an injected clock:
    Manager.ExpiryFailsWhatIsLeftWith447; the config's shortest lifetime is 60 s.)"""
    home = sinks()
    dead = free_port()
    t = ternd_factory(extra=smarthost(dead) + route("origin.test", home.port) +
                      queue_cfg(retry='["1s"]', max_lifetime="60s")).start()
    send(t.port, ["a@example.com"], subject="expire", sender="s@origin.test")
    assert wait_for(lambda: t.log().count("status=deferred") >= 3, timeout=10), t.log()
    assert home.messages() == [] and "status=bounced" not in t.log()


def test_success_notification_when_asked_and_the_next_hop_has_no_dsn(ternd_factory, sinks):
    relay = sinks(extra=("-N",))  # -N: smtp-sink does not announce DSN
    home = sinks()
    t = ternd_factory(extra=smarthost(relay.port) + route("origin.test", home.port) + queue_cfg()).start()
    raw_send(t.port, "s@origin.test", ["ok@example.com"], b"Subject: notify-success\r\n\r\nx\r\n",
             mail_params=" RET=HDRS ENVID=tern+2Dtest", rcpt_params=" NOTIFY=SUCCESS ORCPT=rfc822;ok@example.com")
    assert wait_for(lambda: home.messages(), timeout=10), t.log()
    dsn = home.messages()[0]
    assert b"Action: relayed" in dsn
    assert b"Original-Envelope-Id: tern+2Dtest" in dsn
    assert b"Original-Recipient: rfc822; ok@example.com" in dsn
    assert b"text/rfc822-headers" in dsn


def test_fewer_shards_after_a_restart_adopt_the_queue(ternd_factory, sinks):
    """Mail queued by two shards, then ternd restarted with one: the segments of shard 1
    are adopted by shard 0 and everything is delivered; nothing is orphaned."""
    port = free_port()
    t = ternd_factory(shards=2, extra=smarthost(port) + queue_cfg(retry='["1s"]')).start()
    for i in range(20):
        send(t.port, [f"r{i}@example.com"], subject=f"adopt-{i}")
    assert wait_for(lambda: len(t.spool_list()) == 20)
    # SO_REUSEPORT spread the 20 connections over both shards: some mail is in shard 1's segment.
    segs = {t.spool_dump(m["id"])["segment"].rsplit("-", 1)[1] for m in t.spool_list()}
    assert segs == {"0.seg", "1.seg"}, segs
    assert t.stop() == 0
    t.config.write_text(t.config.read_text().replace("shards = 2", "shards = 1"))
    sink = sinks(port=port)
    t.start()
    assert wait_for(lambda: len(sink.messages()) == 20, timeout=20), t.log()[-3000:]
    assert wait_for(lambda: t.spool_list() == [])
    got = b"".join(sink.messages())
    assert all(f"adopt-{i}@origin.test".encode() in got for i in range(20))


def test_auth_plain_only_inside_tls(ternd_factory, pki, tmp_path):
    srv = StarttlsServer(pki / "server.pem", pki / "server.key", auth=b"\0relayuser\0s3cret")
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    try:
        hop = tls_hop(srv.port, pki) + f'auth_user = "relayuser"\nauth_password_file = "{pw}"\n'
        t = ternd_factory(extra=hop + queue_cfg(retry='["1h"]')).start()
        send(t.port, ["a@example.com"], subject="auth")
        assert wait_for(lambda: srv.messages, timeout=10), t.log()
        assert srv.auth_seen and all(tls for tls, _ in srv.auth_seen), srv.auth_seen
        assert srv.auth_seen[0][1].split()[1].upper() == b"PLAIN"
        assert clear_commands(srv) <= {b"EHLO", b"STARTTLS"}
    finally:
        srv.close()


def test_smtputf8_message_to_a_host_without_it_bounces_clearly(ternd_factory, sink_factory, sinks):
    """A message that needs SMTPUTF8 (a UTF-8 recipient) to a next hop that does not offer
    it is bounced with 5.6.7 and a clear reason, never sent downgraded."""
    nou = sink_factory("--no-smtputf8")
    home = sink_factory()  # offers SMTPUTF8: the bounce itself carries the UTF-8 address
    t = ternd_factory(extra=smarthost(nou.port) + route("origin.test", home.port) + queue_cfg()).start()
    with smtplib.SMTP("127.0.0.1", t.port, timeout=10) as s:
        s.command_encoding = "utf-8"
        s.ehlo("client.test")
        assert s.docmd("MAIL FROM:<s@origin.test> SMTPUTF8")[0] == 250
        assert s.docmd("RCPT TO:<jürgen@example.com>")[0] == 250
        assert s.data("Subject: utf8\r\n\r\nx\r\n".encode())[0] == 250
    assert t.wait_log("status=bounced", timeout=10), t.log()
    line = next(l for l in t.log().splitlines() if "status=bounced" in l)
    assert "dsn=5.6.7" in line and "SMTPUTF8" in line, line
    dsn_id = t.log().split("sender non-delivery notification: ")[1].split()[0]
    assert t.wait_log(f"{dsn_id}: to=<s@origin.test>, relay=127.0.0.1[127.0.0.1]:{home.port}", timeout=10), t.log()
    assert "status=sent" in next(l for l in t.log().splitlines() if f"{dsn_id}: to=" in l)


def test_source_address_is_used_for_outbound_connections(ternd_factory, sinks):
    sink = sinks()
    t = ternd_factory(extra=smarthost(sink.port, source_address="127.0.0.2") + queue_cfg()).start()
    send(t.port, ["a@example.com"], subject="source")
    assert wait_for(lambda: sink.messages(), timeout=10), t.log()
    assert b"X-Client-Addr: 127.0.0.2" in sink.messages()[0]


def test_delay_warning_is_sent_once(ternd_factory, sinks):
    """queue.delay_warning: a sender whose mail is still queued after that long gets one
    delay DSN (Action: delayed, Will-Retry-Until), not one per retry."""
    home = sinks()
    dead = free_port()
    t = ternd_factory(extra=smarthost(dead) + route("origin.test", home.port) +
                      queue_cfg(retry='["1s"]', delay_warning="1s")).start()
    send(t.port, ["slow@example.com"], subject="delayed", sender="s@origin.test")
    assert wait_for(lambda: home.messages(), timeout=15), t.log()
    dsn = home.messages()[0]
    assert b"Action: delayed" in dsn and b"Will-Retry-Until:" in dsn
    assert b"Final-Recipient: rfc822; slow@example.com" in dsn
    assert wait_for(lambda: t.log().count("status=deferred") >= 4, timeout=15)
    assert len(home.messages()) == 1, "one warning, not one per retry"
    assert t.log().count("sender delay notification:") == 1
