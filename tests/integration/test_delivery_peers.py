"""Delivery to real peers from Debian: a private postfix 3.7 as the TLS 1.3 smarthost and
a private dovecot 2.3 LMTP server as a [[route]]'s mailbox next hop.

The scripted servers in test_delivery.py prove the protocol rules; these prove that ternd
interoperates with the software it will meet: postfix's smtpd (OpenSSL) negotiating
TLS 1.3 with ternd's wolfSSL client and verifying nothing on its side, postfix refusing
below TLS 1.3 when limited to 1.2, and dovecot's LMTP answering per recipient at RCPT and
after DATA. Each peer runs as its own instance: its own configuration, queue or base
directory and log under a temp directory, loopback only, on a free port; nothing of the
system's postfix or dovecot is used or started. Both need root (their masters drop
privileges per service), as CI runs them; tools/setup.sh installs them."""
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port
from test_delivery import pki, queue_cfg, send, tls_hop, wait_for  # noqa: F401 (pki is a fixture)

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"
DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
LMTP = "/usr/lib/dovecot/lmtp"  # dovecot-lmtpd: the service binary dovecot's master runs

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a private postfix or dovecot master needs root")


def wait_port(port, proc=None, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def private_dir(prefix):
    """Under /tmp, not pytest's tmp_path: the peers' unprivileged processes (postfix,
    nobody, dovecot) must traverse it, and pytest's directories are 0700."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o755)
    return d


# --- postfix -------------------------------------------------------------------------------

class Postfix:
    """A private postfix: config_directory, queue_directory and data_directory of its own,
    no chroot, smtpd on 127.0.0.1:<port> only (the stock smtp/inet on port 25 is commented
    out), logging to a file through postlogd. It delivers what it accepts for example.com
    to maildirs under its directory with virtual(8), as nobody: the test reads the file
    postfix wrote, with the Received: header postfix added."""

    def __init__(self, pki, tls_protocols=">=TLSv1.2"):
        self.dir = private_dir("tern-postfix-")
        self.port = free_port()
        etc, queue, data, mail = (self.dir / n for n in ("etc", "queue", "data", "mail"))
        for d in (etc, queue, data, mail):
            d.mkdir()
        pf = pwd.getpwnam("postfix")
        os.chown(data, pf.pw_uid, pf.pw_gid)
        os.chown(mail, 65534, 65534)
        # smtpd reads the key as root before it drops privileges; copies keep the pki
        # fixture's directory private.
        shutil.copy(pki / "server.pem", etc / "server.pem")
        shutil.copy(pki / "server.key", etc / "server.key")
        os.chmod(etc / "server.key", 0o600)
        shutil.copy("/usr/share/postfix/master.cf.dist", etc / "master.cf")
        self.maillog = self.dir / "maillog"
        (etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = smarthost.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
relay_domains =
relayhost =
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
virtual_mailbox_domains = example.com
virtual_mailbox_base = {mail}
virtual_mailbox_maps = inline:{{ alice@example.com=alice/ }}
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
smtpd_tls_cert_file = {etc}/server.pem
smtpd_tls_key_file = {etc}/server.key
smtpd_tls_security_level = may
smtpd_tls_protocols = {tls_protocols}
smtpd_tls_mandatory_protocols = {tls_protocols}
smtpd_tls_loglevel = 1
smtpd_tls_received_header = yes
smtp_tls_security_level = none
maillog_file = {self.maillog}
maillog_file_prefixes = {self.dir}
""")
        self.etc, self.mail = etc, mail
        conf = ["-c", str(etc)]
        subprocess.run([POSTCONF, *conf, "-M#", "smtp/inet"], check=True, capture_output=True)
        subprocess.run([POSTCONF, *conf, "-M", f"127.0.0.1:{self.port}/inet=127.0.0.1:{self.port} inet n - n - - smtpd"],
                       check=True, capture_output=True)
        subprocess.run([POSTCONF, *conf, "-F", "*/*/chroot = n"], check=True, capture_output=True)
        # `check` creates the queue's subdirectories with postfix's owners.
        subprocess.run([POSTFIX, *conf, "check"], capture_output=True)
        r = subprocess.run([POSTFIX, *conf, "start"], capture_output=True, text=True)
        if r.returncode != 0 or not wait_port(self.port):
            self.stop()
            raise RuntimeError(f"postfix did not start: {r.stdout}{r.stderr}\n{self.log()}")

    def log(self):
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def wait_log(self, text, timeout=10):
        return wait_for(lambda: text in self.log(), timeout=timeout)

    def delivered(self):
        return [p.read_bytes() for p in sorted((self.mail / "alice" / "new").glob("*"))]

    def queued(self):
        q = self.dir / "queue"
        return [p for d in ("incoming", "active", "deferred", "hold", "maildrop") for p in (q / d).rglob("*") if p.is_file()]

    def stop(self):
        pidfile = self.dir / "queue" / "pid" / "master.pid"
        subprocess.run([POSTFIX, "-c", str(self.etc), "stop"], capture_output=True)
        try:
            pid = int(pidfile.read_text().split()[0])
            wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10)
        except (OSError, ValueError, IndexError):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


needs_postfix = pytest.mark.skipif(not os.path.exists(POSTFIX), reason="postfix not installed (tools/setup.sh installs it)")


@pytest.fixture
def postfix_factory(pki):
    made = []

    def make(**kw):
        p = Postfix(pki, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


def session_lines(log, marker="[127.0.0.1]"):
    """postfix smtpd's lines about connections from 127.0.0.1 (ternd's)."""
    return [l for l in log.splitlines() if "postfix/smtpd[" in l and marker in l]


@needs_root
@needs_postfix
def test_postfix_smarthost_over_verified_tls13(ternd_factory, postfix_factory, pki):
    pf = postfix_factory()
    t = ternd_factory(extra=tls_hop(pf.port, pki) + queue_cfg(retry='["1h"]')).start()
    send(t.port, ["alice@example.com"], subject="postfix-tls13")
    assert wait_for(lambda: pf.delivered(), timeout=15), (t.log(), pf.log())
    msg = pf.delivered()[0]
    assert b"Message-ID: <postfix-tls13@origin.test>" in msg
    # postfix's own record of the session, in the header it added and in its log.
    received = msg.split(b"\n\n", 1)[0].decode(errors="replace")
    assert "(using TLSv1.3 with cipher " in received, received
    assert pf.wait_log("Anonymous TLS connection established from "), pf.log()
    tls = [l for l in session_lines(pf.log()) if "TLS connection established" in l]
    assert tls and ": TLSv1.3 with cipher " in tls[0], pf.log()
    assert t.wait_log(f"Verified TLS connection established to 127.0.0.1[127.0.0.1]:{pf.port}: TLSv1.3 with cipher"), t.log()
    assert t.wait_log("status=sent (250 2.0.0 Ok: queued as "), t.log()
    # The queue id postfix gave is the one ternd logged: the same transaction.
    qid = t.log().split("Ok: queued as ", 1)[1].split(")", 1)[0].strip()
    assert pf.wait_log(f"{qid}: to=<alice@example.com>, relay=virtual") and "status=sent (delivered to maildir)" in pf.log()
    assert wait_for(lambda: t.spool_list() == [])


@needs_root
@needs_postfix
def test_postfix_limited_to_tls12_gets_nothing(ternd_factory, postfix_factory, pki):
    """tls_min_version = "1.3" (the default) against a postfix that speaks at most 1.2:
    the handshake fails, ternd defers, and postfix never sees a MAIL FROM."""
    pf = postfix_factory(tls_protocols="<=TLSv1.2")
    t = ternd_factory(extra=tls_hop(pf.port, pki) + queue_cfg(retry='["1h"]')).start()
    send(t.port, ["alice@example.com"], subject="postfix-tls12")
    assert t.wait_log("status=deferred", timeout=15), t.log()
    assert "TLS handshake with" in t.log()
    # smtpd's disconnect line counts the commands of the session: EHLO and a STARTTLS
    # that failed, nothing else. (The fixture's port probe is a session with no commands.)
    disc = lambda: [l for l in session_lines(pf.log()) if "disconnect from " in l and " ehlo=" in l]
    assert wait_for(disc), pf.log()
    disc = disc()
    for l in disc:
        assert "mail=" not in l and "rcpt=" not in l and "data=" not in l, l
        assert "starttls=0/1" in l, l
    assert "TLS connection established" not in pf.log()
    assert pf.delivered() == [] and pf.queued() == []
    assert len(t.spool_list()) == 1


# --- dovecot LMTP --------------------------------------------------------------------------

class Dovecot:
    """A private dovecot: its own config file, base_dir, state_dir, log and mail under a
    temp directory; only the lmtp protocol, with one TCP listener on 127.0.0.1:<port>.
    Users come from a passwd-file (full addresses, uid/gid nobody, maildir homes); a
    user's extra `quota_rule` field sets a quota (the quota plugin, count backend)."""

    def __init__(self, users, extra=""):
        self.dir = private_dir("tern-dovecot-")
        self.port = free_port()
        mail = self.dir / "mail"
        mail.mkdir()
        os.chown(mail, 65534, 65534)
        self.mail = mail
        lines = []
        for user, fields in users.items():
            lines.append(f"{user}::65534:65534::{mail}/{user.split('@')[0]}::{fields}")
        (self.dir / "users").write_text("\n".join(lines) + "\n")
        self.logpath = self.dir / "dovecot.log"
        self.conf = self.dir / "dovecot.conf"
        self.conf.write_text(f"""\
base_dir = {self.dir}/run
state_dir = {self.dir}/state
instance_name = tern-test-{self.port}
log_path = {self.logpath}
protocols = lmtp
listen = 127.0.0.1
ssl = no
default_internal_user = dovecot
default_internal_group = dovecot
default_login_user = dovenull
first_valid_uid = 1
mail_location = maildir:~/Maildir
mail_plugins = quota
plugin {{
  quota = count:User quota
  quota_vsizes = yes
}}
passdb {{
  driver = passwd-file
  args = {self.dir}/users
}}
userdb {{
  driver = passwd-file
  args = {self.dir}/users
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.port}
  }}
}}
{extra}""")
        self.out = open(self.dir / "stdout", "wb")
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.conf)], stdout=self.out, stderr=self.out)
        if not wait_port(self.port, self.proc):
            self.stop()
            raise RuntimeError(f"dovecot did not start:\n{self.log()}")

    def log(self):
        return self.logpath.read_text(errors="replace") if self.logpath.exists() else ""

    def maildir(self, user):
        return [p.read_bytes() for p in sorted((self.mail / user / "Maildir" / "new").glob("*"))]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        shutil.rmtree(self.dir, ignore_errors=True)


needs_dovecot = pytest.mark.skipif(not (os.path.exists(DOVECOT) and os.path.exists(LMTP)),
                                   reason="dovecot-core and dovecot-lmtpd not installed (tools/setup.sh installs them)")


@pytest.fixture
def dovecot_factory():
    made = []

    def make(users, **kw):
        d = Dovecot(users, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()


def lmtp_route(port):
    return ('[[route]]\ndomains = ["mbox.test"]\nhost = "127.0.0.1"\nport = %d\ntls = "none"\n'
            'protocol = "lmtp"\n' % port)


@needs_root
@needs_dovecot
def test_dovecot_lmtp_delivers_and_refuses_an_unknown_user(ternd_factory, dovecot_factory):
    dv = dovecot_factory({"alice@mbox.test": "", "bob@mbox.test": ""})
    t = ternd_factory(extra=lmtp_route(dv.port) + queue_cfg(retry='["1h"]')).start()
    # The sender is in mbox.test: once bounces are generated (src/server/delivery.cc: not
    # yet, the failure is only logged) the DSN takes the same route, and the queue still
    # empties.
    send(t.port, ["alice@mbox.test", "nobody@mbox.test"], subject="lmtp-two", sender="bob@mbox.test")
    assert wait_for(lambda: dv.maildir("alice"), timeout=15), (t.log(), dv.log())
    assert b"Message-ID: <lmtp-two@origin.test>" in dv.maildir("alice")[0]
    assert not (dv.mail / "nobody").exists()
    # dovecot refuses the unknown user at RCPT: 550 5.1.1 ... User doesn't exist.
    line = wait_for(lambda: next((l for l in t.log().splitlines() if "to=<nobody@mbox.test>" in l), None))
    assert line, t.log()
    assert "status=bounced (host 127.0.0.1[127.0.0.1]" in line, line
    assert "550 5.1.1 <nobody@mbox.test> User doesn't exist: nobody@mbox.test" in line, line
    assert "(in reply to RCPT TO command)" in line, line
    line = next(l for l in t.log().splitlines() if "to=<alice@mbox.test>" in l)
    assert "status=sent (250 2.0.0 <alice@mbox.test> " in line and " Saved)" in line, line
    assert "saved mail to INBOX" in dv.log()
    assert wait_for(lambda: t.spool_list() == [])


@needs_root
@needs_dovecot
def test_dovecot_lmtp_replies_per_recipient_after_data(ternd_factory, dovecot_factory):
    """LMTP's point: one reply per accepted recipient after the final dot. bob is over
    his quota (one message), so dovecot accepts his RCPT and refuses him after DATA while
    alice's copy is saved; the unknown user in between is refused at RCPT, so the replies
    after DATA are for alice and bob only, in that order."""
    dv = dovecot_factory({"alice@mbox.test": "", "bob@mbox.test": "userdb_quota_rule=*:messages=1"})
    t = ternd_factory(extra=lmtp_route(dv.port) + queue_cfg(retry='["1h"]')).start()
    send(t.port, ["bob@mbox.test"], subject="lmtp-fill")
    assert wait_for(lambda: dv.maildir("bob"), timeout=15), (t.log(), dv.log())
    # alice sends to herself and the two others (the sender in mbox.test: see above).
    send(t.port, ["alice@mbox.test", "nobody@mbox.test", "bob@mbox.test"], subject="lmtp-three", sender="alice@mbox.test")
    assert wait_for(lambda: dv.maildir("alice"), timeout=15), (t.log(), dv.log())
    assert any(b"<lmtp-three@origin.test>" in m for m in dv.maildir("alice"))
    assert len(dv.maildir("bob")) == 1 and b"<lmtp-fill@origin.test>" in dv.maildir("bob")[0]

    def results(rcpt):
        return [l for l in t.log().splitlines() if f"to=<{rcpt}>" in l and "status=" in l]

    assert wait_for(lambda: results("alice@mbox.test") and results("nobody@mbox.test")
                    and len(results("bob@mbox.test")) == 2, timeout=10), t.log()
    alice, nobody, bob = results("alice@mbox.test")[0], results("nobody@mbox.test")[0], results("bob@mbox.test")[1]
    assert "status=sent (250 2.0.0 <alice@mbox.test> " in alice, alice
    assert "status=bounced" in nobody and "(in reply to RCPT TO command)" in nobody, nobody
    assert "status=bounced" in bob and "(in reply to end of DATA command)" in bob, bob
    assert "552 5.2.2 <bob@mbox.test> Quota exceeded" in bob, bob
    assert wait_for(lambda: t.spool_list() == [])


@needs_root
@needs_dovecot
def test_dovecot_lmtp_temporary_failure_after_data_retries_that_recipient_only(ternd_factory, dovecot_factory):
    """With quota_full_tempfail, dovecot answers a full mailbox with 452 after DATA: bob
    is deferred while alice's copy is saved. Once bob has room, the retry carries bob
    alone; alice must not get a second copy."""
    dv = dovecot_factory({"alice@mbox.test": "", "bob@mbox.test": "userdb_quota_rule=*:messages=1"},
                         extra="quota_full_tempfail = yes\n")
    t = ternd_factory(extra=lmtp_route(dv.port) + queue_cfg(retry='["1s"]')).start()
    send(t.port, ["bob@mbox.test"], subject="lmtp-fill", sender="alice@mbox.test")
    assert wait_for(lambda: dv.maildir("bob"), timeout=15), (t.log(), dv.log())
    send(t.port, ["alice@mbox.test", "bob@mbox.test"], subject="lmtp-later", sender="alice@mbox.test")
    assert wait_for(lambda: "to=<bob@mbox.test>" in t.log() and "status=deferred" in t.log(), timeout=15), t.log()
    line = next(l for l in t.log().splitlines() if "to=<bob@mbox.test>" in l and "status=deferred" in l)
    assert "452 4.2.2 <bob@mbox.test> Quota exceeded" in line and "(in reply to end of DATA command)" in line, line
    assert wait_for(lambda: t.log().count("status=deferred") >= 2, timeout=10), t.log()  # retried, still full
    assert len(dv.maildir("alice")) == 1
    # Make room: dovecot's count quota follows the maildir when it rescans it.
    for p in (dv.mail / "bob" / "Maildir" / "new").glob("*"):
        p.unlink()
    assert wait_for(lambda: any(b"<lmtp-later@origin.test>" in m for m in dv.maildir("bob")), timeout=15), (t.log(), dv.log())
    assert wait_for(lambda: t.spool_list() == [])
    assert len(dv.maildir("alice")) == 1, "alice got the message again on bob's retry"
    sent = [l for l in t.log().splitlines() if "status=sent" in l]
    assert sum("to=<alice@mbox.test>" in l for l in sent) == 1 and sum("to=<bob@mbox.test>" in l for l in sent) == 2, sent
