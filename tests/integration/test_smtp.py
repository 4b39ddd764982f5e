"""The real ternd with real clients: Python smtplib, swaks, postfix's smtp-source."""
import re
import smtplib
import shutil
import socket
import threading
import subprocess
import time

import pytest

from conftest import TERND, TERN_LOAD, free_port, read_until_closed, recv_reply, smtp_dialogue


def test_smtplib_message_is_spooled_with_envelope_and_received(ternd):
    with smtplib.SMTP("127.0.0.1", ternd.port, local_hostname="client.test") as c:
        code, resp = c.ehlo()
        assert code == 250
        for ext in ("pipelining", "size", "8bitmime", "smtputf8", "enhancedstatuscodes", "chunking", "dsn"):
            assert c.has_extn(ext), ext
        assert c.esmtp_features["size"] == str(10 * 1024 * 1024)
        refused = c.sendmail("alice@example.org", ["bob@example.net", "carol@example.net"],
                             b"Subject: hello\r\n\r\nfirst line\r\n.starts with a dot\r\n",
                             rcpt_options=["NOTIFY=FAILURE"])
        assert refused == {}
    q = ternd.spool_list()
    assert len(q) == 1
    m = ternd.spool_dump(q[0]["id"])
    assert m["from"] == "alice@example.org"
    assert [r["address"] for r in m["recipients"]] == ["bob@example.net", "carol@example.net"]
    assert m["recipients"][0]["notify"] == "FAILURE"
    assert m["client"] == "127.0.0.1"
    assert m["helo"] == "client.test"
    assert m["content"].startswith("Received: from [127.0.0.1] (helo=client.test)\r\n\tby relay.test (tern) with ESMTP id ")
    assert m["content"].endswith("\r\n\r\nfirst line\r\n.starts with a dot\r\n")
    assert ternd.wait_log(f"{q[0]['id']}: client=unknown[127.0.0.1], helo=<client.test>, from=<alice@example.org>"), ternd.log()[-3000:]


def test_queue_id_in_250_matches_spool(ternd):
    with smtplib.SMTP("127.0.0.1", ternd.port) as c:
        c.ehlo()
        c.mail("a@example.org")
        c.rcpt("b@example.net")
        code, resp = c.data(b"Subject: x\r\n\r\ny\r\n")
    assert code == 250
    assert resp.startswith(b"2.0.0 Ok: queued as ")
    qid = resp.split()[-1].decode()
    assert [m["id"] for m in ternd.spool_list()] == [qid]


def test_swaks_with_pipelining_and_bdat(ternd):
    for extra in ([], ["--pipeline"]):
        r = subprocess.run(["swaks", "--server", f"127.0.0.1:{ternd.port}", "--from", "s@example.org",
                            "--to", "r@example.net", "--helo", "swaks.test"] + extra,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "250 2.0.0 Ok: queued as" in r.stdout
    assert len(ternd.spool_list()) == 2


def test_bdat_chunking_raw(ternd):
    out = smtp_dialogue(ternd.port, [b"EHLO raw.test\r\n", b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n",
                                     b"BDAT 14\r\nSubject: b\r\n\r\n", b"BDAT 6 LAST\r\nhello\n", b"QUIT\r\n"])
    # "hello\n" ends with a bare LF: refused after the last chunk, nothing queued.
    assert b"250 2.0.0 14 octets received\r\n" in out
    assert b"550 5.5.2" in out
    out = smtp_dialogue(ternd.port, [b"EHLO raw.test\r\n", b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n",
                                     b"BDAT 14\r\nSubject: b\r\n\r\nBDAT 7 LAST\r\nhello\r\n", b"QUIT\r\n"])
    assert b"250 2.0.0 Ok: queued as" in out
    q = ternd.spool_list()
    assert len(q) == 1
    assert ternd.spool_dump(q[0]["id"])["content"].endswith("Subject: b\r\n\r\nhello\r\n")


def test_smtp_source_many_sessions(ternd):
    r = subprocess.run(["smtp-source", "-s", "10", "-m", "200", "-l", "2048", "-f", "src@example.org",
                        "-t", "dst@example.net", f"127.0.0.1:{ternd.port}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    q = ternd.spool_list()
    assert len(q) == 200
    assert all(m["size"] > 2048 for m in q)


def test_tern_load_pipelined_with_proxy_v2(ternd_factory, tmp_path):
    port = free_port()
    t = ternd_factory(shards=2, listens=[{"address": f"127.0.0.1:{port}", "proxy_protocol": True,
                                           "trusted_proxies": ["127.0.0.0/8"]}],
                      networks=["198.18.0.0/15"]).start()
    r = subprocess.run([TERN_LOAD, "--port", str(port), "-s", "8", "-m", "400", "-n", "50", "-p", "--proxy", "v2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "accepted=400 rejected=0" in r.stdout
    q = t.spool_list()
    assert len(q) == 400
    assert all(m["client"].startswith("198.18.0.") for m in q)


def test_relay_denied_for_outsiders_but_relay_domains_accepted(ternd_factory):
    # Relay networks exclude loopback: only [relay] domains are accepted.
    t = ternd_factory(networks=["198.18.0.0/15"], domains=["example.com", ".sub.example.org"]).start()
    out = smtp_dialogue(t.port, [b"EHLO x\r\n", b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<u@elsewhere.test>\r\n",
                                 b"RCPT TO:<u@Example.Com>\r\n", b"RCPT TO:<u@a.sub.example.org>\r\n", b"QUIT\r\n"])
    assert b"554 5.7.1 <u@elsewhere.test>: Relay access denied\r\n" in out
    assert out.count(b"250 2.1.5 Ok") == 2


def test_smuggling_through_the_real_server(ternd):
    smuggle = (b"Subject: a\r\n\r\nhi\n.\nMAIL FROM:<admin@bank.test>\r\nRCPT TO:<v@victim.test>\r\nDATA\r\n"
               b"Subject: smuggled\r\n\r\nx\r\n.\r\n")
    out = smtp_dialogue(ternd.port, [b"EHLO x\r\n", b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n",
                                     smuggle, b"QUIT\r\n"])
    assert b"550 5.5.2 Error: bare <CR> or <LF>" in out
    assert b"queued as" not in out
    assert ternd.spool_list() == []


def test_pipelining_before_354_is_refused(ternd):
    out = smtp_dialogue(ternd.port, [b"EHLO x\r\n", b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n",
                                     b"DATA\r\nSubject: early\r\n\r\nbody\r\n.\r\n"])
    assert out.endswith(b"554 5.5.0 Error: SMTP protocol synchronization\r\n")
    assert ternd.spool_list() == []


def test_limits_line_size_errors(ternd_factory):
    t = ternd_factory(limits={"message_size": 4096, "errors": 3, "line_length": 600}).start()
    out = smtp_dialogue(t.port, [b"EHLO x\r\n", b"NOOP " + b"a" * 700 + b"\r\n", b"NOOP\r\n"])
    assert b"500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n" in out
    out = smtp_dialogue(t.port, [b"EHLO x\r\n", b"MAIL FROM:<a@b.test> SIZE=5000\r\n"])
    assert b"552 5.3.4" in out
    out = smtp_dialogue(t.port, [b"EHLO x\r\n", b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n",
                                 b"x" * 5000 + b"\r\n.\r\n"])
    assert out.endswith(b"552 5.3.4 Error: message file too big\r\n")
    out = smtp_dialogue(t.port, [b"BAD1\r\nBAD2\r\nBAD3\r\nNOOP\r\n"])
    assert out.endswith(b"421 4.7.0 relay.test Error: too many errors\r\n")
    assert t.spool_list() == []


def test_idle_timeout(ternd_factory):
    t = ternd_factory(limits={"idle_timeout": 1}).start()
    with socket.create_connection(("127.0.0.1", t.port), timeout=10) as s:
        assert recv_reply(s).startswith(b"220 ")
        data = read_until_closed(s)
    assert data == b"421 4.4.2 relay.test Error: timeout exceeded\r\n"


def test_session_slots_exhausted_answers_421_then_recovers(ternd_factory):
    t = ternd_factory(limits={"connections": 2}).start()
    held = [socket.create_connection(("127.0.0.1", t.port), timeout=5) for _ in range(2)]
    for s in held:
        assert recv_reply(s).startswith(b"220 ")
    with socket.create_connection(("127.0.0.1", t.port), timeout=5) as s:
        assert recv_reply(s) == b"421 4.3.2 Too many connections, try again later\r\n"
    held[0].sendall(b"QUIT\r\n")
    assert recv_reply(held[0]) == b"221 2.0.0 Bye\r\n"
    held[0].close()
    deadline = time.time() + 5
    ok = False
    while time.time() < deadline and not ok:
        with socket.create_connection(("127.0.0.1", t.port), timeout=5) as s:
            ok = recv_reply(s).startswith(b"220 ")
        time.sleep(0.05)
    assert ok, t.log()
    held[1].close()
    assert t.wait_log("all 2 session slots busy"), t.log()[-3000:]


def test_check_config_reports_file_line_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[listen]]\naddress = "127.0.0.1:25"\n[limits]\nrecipients = "many"\n')
    r = subprocess.run([TERND, "--check-config", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip() == f"{bad}:4: limits.recipients: expected an integer"
    good = tmp_path / "good.toml"
    good.write_text('[[listen]]\naddress = "127.0.0.1:25"\n')
    r = subprocess.run([TERND, "--check-config", str(good)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_shipped_example_config_is_valid():
    from conftest import ROOT
    r = subprocess.run([TERND, "--check-config", str(ROOT / "etc/tern.toml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_embedded_default_starts_and_serves(tmp_path):
    """No --config: 127.0.0.1:2525 and var/spool under the working directory. Skipped if
    something else already holds port 2525 on this machine."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ternd does: TIME_WAIT is fine
        try:
            probe.bind(("127.0.0.1", 2525))
        except OSError:
            pytest.skip("127.0.0.1:2525 is in use")
    # The default relays to tools/run-relay.sh's sink and reads its demo CA: any CA will do
    # here (nothing listens on 2526, the mail stays deferred).
    (tmp_path / "var/tls").mkdir(parents=True)
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", tmp_path / "var/tls/ca.pem")
    p = subprocess.Popen([TERND], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.time() + 10
        while " started in " not in line and time.time() < deadline:
            line = p.stderr.readline()
        assert " started in " in line and "127.0.0.1:2525" in line, line
        with smtplib.SMTP("127.0.0.1", 2525) as c:
            c.sendmail("a@example.org", ["b@example.net"], b"Subject: default\r\n\r\nx\r\n")
        assert list((tmp_path / "var/spool/segments").iterdir())
    finally:
        p.terminate()
        assert p.wait(20) == 0


def test_tiny_receive_ring_forces_enobufs_and_loses_nothing(ternd_factory):
    """Two 512-byte receive buffers for the shard: multishot recvs run out of buffers
    (-ENOBUFS) all the time and must be re-armed as flow control, not treated as errors."""
    t = ternd_factory(extra="[tuning]\nrecv_buffers = 2\nrecv_buffer_size = 512\n").start()
    r = subprocess.run([TERN_LOAD, "--port", str(t.port), "-s", "16", "-m", "400", "-n", "25", "-l", "20000", "-p"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "accepted=400 rejected=0" in r.stdout
    q = t.spool_list()
    assert len(q) == 400 and all(m["size"] > 20000 for m in q)
    assert t.stop() == 0
    m = re.search(r"shard 0: stopped: .* enobufs=(\d+)", t.log())
    assert m and int(m.group(1)) > 0, t.log()[-2000:]


def test_ipv6_listener_and_relay_network(ternd_factory):
    port = free_port("::1")
    t = ternd_factory(listens=[{"address": f"[::1]:{port}"}], networks=["::1"]).start()
    with smtplib.SMTP("::1", port, local_hostname="v6.test") as c:
        c.sendmail("a@example.org", ["b@example.net"], b"Subject: v6\r\n\r\nx\r\n")
    m = t.spool_dump(t.spool_list()[0]["id"])
    assert m["client"] == "::1"
    assert m["content"].startswith("Received: from [IPv6:::1] (helo=v6.test)\r\n"), m["content"][:80]
    # An IPv6 client outside the relay networks may only send to relay domains.
    t2 = ternd_factory(listens=[{"address": f"[::1]:{free_port('::1')}"}], networks=["2001:db8::/32"]).start()
    out = smtp_dialogue(int(t2.listens[0]["address"].rsplit(":", 1)[1]),
                        [b"EHLO x\r\n", b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@d.test>\r\n"], host="::1")
    assert b"554 5.7.1 <c@d.test>: Relay access denied" in out


def test_sigterm_closes_sessions_with_421_and_exits_cleanly(ternd_factory):
    t = ternd_factory().start()
    s = socket.create_connection(("127.0.0.1", t.port), timeout=5)
    assert recv_reply(s).startswith(b"220 ")
    s.sendall(b"EHLO x\r\n")
    recv_reply(s)
    t0 = time.time()
    assert t.stop() == 0
    assert time.time() - t0 < 4, "stop waited for the deadline instead of closing sessions"
    data = read_until_closed(s)
    s.close()
    assert data == b"421 4.3.2 relay.test Service shutting down\r\n"
    assert "ternd stopped:" in t.log()


def test_input_piling_up_during_a_commit_pauses_reading_and_loses_nothing(ternd_factory):
    """A pipelining client sends BDAT LAST and, without waiting for the 250, a 2 MiB chunk
    of the next message. While the first commit's fdatasync is pending the session cannot
    consume input: past 256 KiB the shard stops reading (cancels the recv) and resumes
    after the commit. Both messages must arrive intact."""
    t = ternd_factory().start()
    big = (b"y" * 1022 + b"\r\n") * 2048  # 2 MiB
    rounds = 6
    with socket.create_connection(("127.0.0.1", t.port), timeout=30) as s:
        assert recv_reply(s).startswith(b"220 ")
        s.sendall(b"EHLO pile.test\r\n")
        recv_reply(s)
        stream = b""
        for i in range(rounds):
            small = f"Subject: small {i}\r\n\r\nx\r\n".encode()
            stream += (b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
                       + b"BDAT %d LAST\r\n" % len(small) + small
                       + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
                       + b"BDAT %d LAST\r\n" % len(big) + big)
        stream += b"QUIT\r\n"
        sender = threading.Thread(target=s.sendall, args=(stream,))
        sender.start()
        data = read_until_closed(s, timeout=60)
        sender.join()
    assert data.count(b"250 2.0.0 Ok: queued as") == 2 * rounds, data[-500:]
    q = t.spool_list()
    assert len(q) == 2 * rounds
    assert sorted(m["size"] for m in q)[-rounds:] == [max(m["size"] for m in q)] * rounds
    assert t.stop() == 0
    m = re.search(r"shard 0: stopped: .* input_paused=(\d+)", t.log())
    assert m and int(m.group(1)) > 0, "reading was never paused: " + t.log()[-1500:]
