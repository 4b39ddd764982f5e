"""SMTP policy against the real ternd: relay routing (postfix allow_untrusted_routing = no),
PROXY health checks and relay permission, PROXY v1 line limits, HELO in Received:,
SMTPUTF8, the recipient limit, bare LF command lines, the junk command limit, and
--check-config on listeners and DNS names. Byte-exact where the reply is ours."""
import smtplib
import socket
import struct
import subprocess

import pytest

from conftest import TERND, free_port, recv_reply, read_until_closed

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
ROUTED = [
    "user%host.evil@relay.example",
    "user@host.evil@relay.example",
    '"user@host.evil"@relay.example',
    "user!host.evil!x@relay.example",
    "@a.evil,@b.evil:user@relay.example",
    "user%host.evil@deep.sub.relay.example",
]


def complete(buf):
    """The buffer ends with the last line of a reply ("250 x", not "250-x")."""
    if not buf.endswith(b"\r\n"):
        return False
    last = buf[:-2].rsplit(b"\r\n", 1)[-1]
    return len(last) >= 4 and last[:3].isdigit() and last[3:4] == b" "


def dialogue(sock, data, until=None):
    """Send data, read until a whole reply arrived (or the buffer ends with `until`)."""
    sock.sendall(data)
    buf = b""
    sock.settimeout(10)
    while not (buf.endswith(until) if until else complete(buf)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def connect(port, prefix=b""):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if prefix:
        s.sendall(prefix)
    assert recv_reply(s) == b"220 relay.test ESMTP tern\r\n"
    return s


def v2(cmd, fam, body):
    return SIG + bytes([0x20 | cmd, fam]) + struct.pack("!H", len(body)) + body


# --- 1. relay routing --------------------------------------------------------------------

def test_routed_recipients_are_refused_for_outsiders(ternd_factory):
    # 127.0.0.1 is not in relay.networks here: the client is an outsider.
    t = ternd_factory(networks=["198.18.0.0/15"], domains=["relay.example", ".sub.relay.example"],
                      limits={"errors": 100}).start()
    with connect(t.port) as s:
        dialogue(s, b"EHLO outsider.test\r\n")
        assert dialogue(s, b"MAIL FROM:<a@b.test>\r\n") == b"250 2.1.0 Ok\r\n"
        for r in ROUTED:
            out = dialogue(s, f"RCPT TO:<{r}>\r\n".encode())
            assert out == f"554 5.7.1 <{r}>: Relay access denied\r\n".encode(), out
        # Plain recipients in the relay domains still pass, and the message is queued.
        assert dialogue(s, b"RCPT TO:<user@relay.example>\r\n") == b"250 2.1.5 Ok\r\n"
        assert dialogue(s, b"DATA\r\n").startswith(b"354 ")
        assert b"250 2.0.0 Ok: queued as" in dialogue(s, b"Subject: x\r\n\r\nx\r\n.\r\n")
    [m] = t.spool_list()
    assert [r["address"] for r in t.spool_dump(m["id"])["recipients"]] == ["user@relay.example"]


def test_clients_in_relay_networks_keep_routing(ternd_factory):
    t = ternd_factory(domains=["relay.example"]).start()  # 127.0.0.0/8 is trusted
    with connect(t.port) as s:
        dialogue(s, b"EHLO inside.test\r\nMAIL FROM:<a@b.test>\r\n", until=b"250 2.1.0 Ok\r\n")
        for r in ROUTED:
            assert dialogue(s, f"RCPT TO:<{r}>\r\n".encode()) == b"250 2.1.5 Ok\r\n", r
        assert dialogue(s, b"DATA\r\n").startswith(b"354 ")
        assert b"250 2.0.0 Ok: queued as" in dialogue(s, b"Subject: routed\r\n\r\nx\r\n.\r\n")
    [m] = t.spool_list()
    # The source route is removed (RFC 5321 C), the local-part routing is kept.
    assert [r["address"] for r in t.spool_dump(m["id"])["recipients"]] == \
        [r.split(":", 1)[1] if r.startswith("@") else r for r in ROUTED]


# --- 2. PROXY health checks -------------------------------------------------------------

HEALTH_CHECKS = {
    "v2 LOCAL": v2(0, 0x00, b""),
    "v2 PROXY UNSPEC": v2(1, 0x00, b""),
    "v2 PROXY AF_UNIX": v2(1, 0x31, b"/run/src.sock".ljust(108, b"\0") + b"/run/dst.sock".ljust(108, b"\0")),
    "v1 UNKNOWN": b"PROXY UNKNOWN\r\n",
}


def proxy_relay(ternd_factory, local_relay):
    port = free_port()
    listen = {"address": f"127.0.0.1:{port}", "proxy_protocol": True, "trusted_proxies": ["127.0.0.1"]}
    if local_relay is not None:
        listen["local_relay"] = local_relay
    # The proxy's own address (127.0.0.1) is inside relay.networks: exactly the setup in
    # which a health check used to inherit relay permission.
    t = ternd_factory(listens=[listen], networks=["127.0.0.0/8"], domains=["relay.example"])
    t.port = port
    return t.start()


@pytest.mark.parametrize("kind", list(HEALTH_CHECKS))
def test_proxy_health_check_may_talk_but_not_relay(ternd_factory, kind):
    t = proxy_relay(ternd_factory, None)
    with connect(t.port, HEALTH_CHECKS[kind]) as s:
        dialogue(s, b"EHLO haproxy-check\r\n")
        assert dialogue(s, b"MAIL FROM:<a@b.test>\r\n") == b"250 2.1.0 Ok\r\n"
        assert dialogue(s, b"RCPT TO:<x@elsewhere.test>\r\n") == \
            b"554 5.7.1 <x@elsewhere.test>: Relay access denied\r\n"
        assert dialogue(s, b"RCPT TO:<x@relay.example>\r\n") == b"250 2.1.5 Ok\r\n"
        assert dialogue(s, b"QUIT\r\n") == b"221 2.0.0 Bye\r\n"
    version = "1" if kind.startswith("v1") else "2"
    assert t.wait_log(f"disconnect from unknown[127.0.0.1] proxy_local_v{version} helo=<haproxy-check>"), t.log()[-2000:]


def test_proxy_health_check_relays_with_local_relay(ternd_factory):
    t = proxy_relay(ternd_factory, True)
    for kind, hdr in HEALTH_CHECKS.items():
        with connect(t.port, hdr) as s:
            dialogue(s, b"EHLO haproxy-check\r\nMAIL FROM:<a@b.test>\r\n", until=b"250 2.1.0 Ok\r\n")
            assert dialogue(s, b"RCPT TO:<x@elsewhere.test>\r\n") == b"250 2.1.5 Ok\r\n", kind


def test_proxied_client_is_judged_by_its_own_address(ternd_factory):
    t = proxy_relay(ternd_factory, None)
    with connect(t.port, b"PROXY TCP4 198.18.0.1 127.0.0.1 5000 25\r\n") as s:
        dialogue(s, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n", until=b"250 2.1.0 Ok\r\n")
        assert dialogue(s, b"RCPT TO:<x@elsewhere.test>\r\n") == b"554 5.7.1 <x@elsewhere.test>: Relay access denied\r\n"
    with connect(t.port, b"PROXY TCP4 127.0.0.77 127.0.0.1 5000 25\r\n") as s:
        dialogue(s, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n", until=b"250 2.1.0 Ok\r\n")
        assert dialogue(s, b"RCPT TO:<x@elsewhere.test>\r\n") == b"250 2.1.5 Ok\r\n"


# --- 3. PROXY v1 line limits ------------------------------------------------------------

def test_proxy_v1_107_bytes_ok_108_and_trailing_space_refused(ternd_factory):
    t = proxy_relay(ternd_factory, None)
    ok = b"PROXY UNKNOWN " + b"a" * (107 - 16) + b"\r\n"
    assert len(ok) == 107
    with connect(t.port, ok) as s:
        assert dialogue(s, b"QUIT\r\n") == b"221 2.0.0 Bye\r\n"
    for bad in [b"PROXY UNKNOWN " + b"a" * (108 - 16) + b"\r\n",
                b"PROXY TCP4 198.18.0.1 127.0.0.1 5000 25 \r\n",
                b"PROXY UNKNOWN \r\n"]:
        with socket.create_connection(("127.0.0.1", t.port), timeout=10) as s:
            s.sendall(bad)
            assert read_until_closed(s) == b"", bad  # no banner, closed
    assert t.wait_log("PROXY v1: header longer than 107 bytes"), t.log()[-2000:]
    assert t.wait_log("PROXY v1: space before CRLF"), t.log()[-2000:]


# --- 4. HELO in Received: ---------------------------------------------------------------

def test_helo_cannot_forge_received(ternd):
    forged = "x ([6.6.6.6]) by mx.trusted.example; Mon, 1 Jan 2024"
    with smtplib.SMTP("127.0.0.1", ternd.port, local_hostname=forged) as c:
        c.sendmail("a@example.org", ["b@example.net"], b"Subject: forged\r\n\r\nx\r\n")
    [m] = ternd.spool_list()
    d = ternd.spool_dump(m["id"])
    assert d["helo"] == forged  # the envelope keeps what was said (logs sanitise it)
    first = d["content"].split("\r\n", 1)[0]
    assert first == "Received: from [127.0.0.1] (helo=x???6.6.6.6???by?mx.trusted.example??Mon??1?Jan?2024)"
    assert d["content"].split("\r\n")[1].startswith("\tby relay.test (tern) with ESMTP id ")


# --- 5. SMTPUTF8 ------------------------------------------------------------------------

def test_non_ascii_address_needs_smtputf8(ternd):
    with connect(ternd.port) as s:
        dialogue(s, b"EHLO c\r\n")
        assert dialogue(s, "MAIL FROM:<dörte@example.org>\r\n".encode()) == \
            b"553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n"
        assert dialogue(s, b"MAIL FROM:<a@example.org>\r\n") == b"250 2.1.0 Ok\r\n"
        assert dialogue(s, "RCPT TO:<用户@例子.test>\r\n".encode()) == \
            b"553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n"


def test_smtputf8_message_keeps_utf8_in_received(ternd):
    with smtplib.SMTP("127.0.0.1", ternd.port, local_hostname="utf8.test") as c:
        c.sendmail("dörte@example.org", ["用户@例子.test"], "Subject: ü\r\n\r\nx\r\n".encode(),
                   mail_options=["SMTPUTF8"])
    [m] = ternd.spool_list()
    d = ternd.spool_dump(m["id"])
    content = d["content"].encode("utf-8")  # tern-spool --json passes valid UTF-8 through as UTF-8
    assert content.startswith(b"Received: from [127.0.0.1] (helo=utf8.test)\r\n\tby relay.test (tern) with UTF8SMTP id ")
    assert "\r\n\tfor <用户@例子.test>; ".encode() in content
    assert d["smtputf8"] is True


# --- 6. recipient limit -----------------------------------------------------------------

def test_1030_pipelined_recipients_keep_the_transaction(ternd):
    """limits.recipients = 1000 and limits.errors = 20 (defaults): the 30 extra RCPTs get
    452 4.5.3 and are not errors, so the client is not disconnected."""
    with connect(ternd.port) as s:
        dialogue(s, b"EHLO many.test\r\n")
        cmds = b"MAIL FROM:<a@example.org>\r\n" + b"".join(
            b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(1030)) + b"DATA\r\n"
        out = dialogue(s, cmds, until=b"354 End data with <CR><LF>.<CR><LF>\r\n")
        lines = out.split(b"\r\n")[:-1]
        assert lines[0] == b"250 2.1.0 Ok"
        assert lines[1:1001] == [b"250 2.1.5 Ok"] * 1000
        assert lines[1001:1031] == [b"452 4.5.3 Error: too many recipients"] * 30
        assert lines[1031].startswith(b"354 ")
        assert b"250 2.0.0 Ok: queued as" in dialogue(s, b"Subject: many\r\n\r\nx\r\n.\r\n")
    [m] = ternd.spool_list()
    assert len(ternd.spool_dump(m["id"])["recipients"]) == 1000


# --- 7. bare LF -------------------------------------------------------------------------

def test_bare_lf_command_is_refused_and_closed(ternd):
    with connect(ternd.port) as s:
        s.sendall(b"EHLO legacy.test\n")
        assert read_until_closed(s) == b"550 5.5.2 Error: bare <LF> received\r\n"


def test_allow_bare_lf_listener_accepts_legacy_clients(ternd_factory):
    port = free_port()
    t = ternd_factory(listens=[{"address": f"127.0.0.1:{port}", "allow_bare_lf": True}])
    t.port = port
    t.start()
    with connect(port) as s:
        out = dialogue(s, b"HELO legacy.test\nMAIL FROM:<a@example.org>\nRCPT TO:<b@example.net>\nDATA\n",
                       until=b"354 End data with <CR><LF>.<CR><LF>\r\n")
        assert out == (b"250 relay.test\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
                       b"354 End data with <CR><LF>.<CR><LF>\r\n")
        # The DATA smuggling defence is unchanged: "\n.\n" does not end the message.
        s.sendall(b"Subject: x\r\n\r\nx\n.\nMAIL FROM:<evil@example.org>\n")
        assert dialogue(s, b"\r\n.\r\n") == b"550 5.5.2 Error: bare <CR> or <LF> in message data (RFC 5321 2.3.8)\r\n"
        assert dialogue(s, b"QUIT\n") == b"221 2.0.0 Bye\r\n"
    assert t.spool_list() == []


# --- 8. junk commands -------------------------------------------------------------------

def test_pipelined_noop_forever_is_cut_off(ternd):
    with connect(ternd.port) as s:
        try:
            s.sendall(b"NOOP\r\n" * 150)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = read_until_closed(s)
    assert out == b"250 2.0.0 Ok\r\n" * 100 + b"421 4.7.0 relay.test Error: too many junk commands\r\n"


def test_junk_limit_is_configurable_and_mixed(ternd_factory):
    t = ternd_factory(limits={"junk_commands": 3}).start()
    with connect(t.port) as s:
        s.sendall(b"RSET\r\nVRFY x\r\nHELP\r\nNOOP\r\n")
        out = read_until_closed(s)
    assert out.endswith(b"421 4.7.0 relay.test Error: too many junk commands\r\n")
    assert out.count(b"\r\n") == 4


# --- 9. --check-config ------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ('[[listen]]\naddress = "127.0.0.1:25"\n[[listen]]\naddress = "127.0.0.1:25"\n',
     ':4: listen.address: "127.0.0.1:25" overlaps the listener "127.0.0.1:25" at line 1 (same port, same or wildcard address)'),
    ('[[listen]]\naddress = "0.0.0.0:25"\n[[listen]]\naddress = "127.0.0.1:25"\n',
     ':4: listen.address: "127.0.0.1:25" overlaps the listener "0.0.0.0:25" at line 1 (same port, same or wildcard address)'),
    ('hostname = "mx_1.example.net"\n[[listen]]\naddress = "127.0.0.1:25"\n',
     ":1: hostname: \"mx_1.example.net\" is not a valid DNS host name (labels of letters, digits and '-', 1 to 63 bytes, 253 in all)"),
    ('[[listen]]\naddress = "127.0.0.1:25"\n[relay]\ndomains = ["-bad.example"]\n',
     ':4: relay.domains: "-bad.example" is not a valid DNS domain name (".example.org" for subdomains)'),
])
def test_check_config_refuses_overlaps_and_bad_names(tmp_path, text, want):
    f = tmp_path / "t.toml"
    f.write_text(text)
    r = subprocess.run([TERND, "--check-config", str(f)], capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip() == f"{f}{want}"


def test_check_config_accepts_distinct_listeners(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('hostname = "mx-1.example.net"\n[[listen]]\naddress = "0.0.0.0:25"\n[[listen]]\n'
                 'address = "[::]:25"\n[[listen]]\naddress = "127.0.0.1:587"\nallow_bare_lf = true\n'
                 '[limits]\njunk_commands = 50\nrecipient_overshoot = 10\n')
    r = subprocess.run([TERND, "--check-config", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
