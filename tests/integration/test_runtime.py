"""The runtime against the real ternd: the shard inbox (SIGUSR1 stats requests), start-up
refusals that name their key, and stop with sessions in every state."""
import resource
import smtplib
import socket
import subprocess
import time

from conftest import TERND, recv_reply


def test_sigusr1_asks_every_shard_for_its_counters_through_its_inbox(ternd_factory):
    t = ternd_factory(shards=2).start()
    with smtplib.SMTP("127.0.0.1", t.port, timeout=10) as s:
        s.sendmail("a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nbody\r\n")
    t.proc.send_signal(10)  # SIGUSR1
    assert t.wait_log("shard 0: stats: "), t.log()[-2000:]
    assert t.wait_log("shard 1: stats: "), t.log()[-2000:]
    line = [l for l in t.log().splitlines() if ": stats: " in l]
    assert any("messages=1 " in l for l in line), line
    # The daemon goes on serving after the request.
    with smtplib.SMTP("127.0.0.1", t.port, timeout=10) as s:
        assert s.noop()[0] == 250


def test_check_config_refuses_more_connections_than_file_descriptors(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 4 * 65536:
        import pytest
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is above what 4 shards x 65536 connections need")
    cfg = tmp_path / "t.toml"
    cfg.write_text('shards = 4\n[spool]\ndir = "%s"\n[[listen]]\naddress = "127.0.0.1:0"\n'
                   '[limits]\nconnections = 65536\n' % (tmp_path / "spool"))
    r = subprocess.run([TERND, "--check-config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 1
    assert f"{cfg}:7: limits.connections: 4 shard(s) x 65536 connections need" in r.stderr, r.stderr


def test_values_the_kernel_cannot_take_are_refused_by_the_config_check(tmp_path):
    for body, key in [("[limits]\nconnections = 65537\n", "limits.connections"),
                      ("[tuning]\nrecv_buffers = 32768\nrecv_buffer_size = 1048576\n", "tuning.recv_buffers"),
                      ("[tuning]\nring_entries = 100\n", "tuning.ring_entries"),
                      ("[tuning]\naccept_resume = 2000\n", "tuning.accept_resume"),
                      ("[limits]\ninput_buffer = 4096\nline_length = 8192\n", "limits.input_buffer")]:
        cfg = tmp_path / "t.toml"
        cfg.write_text('shards = 1\n[spool]\ndir = "%s"\n[[listen]]\naddress = "127.0.0.1:0"\n' % (tmp_path / "s")
                       + body)
        r = subprocess.run([TERND, "--check-config", str(cfg)], capture_output=True, text=True)
        assert r.returncode == 1, (body, r.stdout)
        assert r.stderr.startswith(f"{cfg}:") and f": {key}: " in r.stderr, (body, r.stderr)


def test_too_few_file_descriptors_at_start_is_one_clear_error_and_a_clean_exit(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text('shards = 2\n[spool]\ndir = "%s"\n[[listen]]\naddress = "127.0.0.1:0"\n'
                   '[limits]\nconnections = 4000\n' % (tmp_path / "spool"))

    def low_nofile():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    r = subprocess.run([TERND, "--config", str(cfg)], capture_output=True, text=True, timeout=20,
                       preexec_fn=low_nofile)
    assert r.returncode == 1, r.stderr  # an exit status, not a signal
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert f"{cfg}:7: limits.connections:" in lines[0] and "RLIMIT_NOFILE" in lines[0], r.stderr


def test_stop_with_sessions_in_every_state(ternd_factory):
    """SIGTERM while one client idles after EHLO, one is in DATA, one sent only part of a
    PROXY-less command line: every one gets 421 or is closed, and ternd exits 0 in time."""
    t = ternd_factory(limits={"shutdown_timeout": 2}).start()
    socks = []
    for lines in ([b"EHLO a\r\n"], [b"EHLO b\r\n", b"MAIL FROM:<a@b.c>\r\n", b"RCPT TO:<d@e.f>\r\n", b"DATA\r\n"],
                  [b"EHLO c\r\n", b"NOO"]):
        s = socket.create_connection(("127.0.0.1", t.port), timeout=10)
        recv_reply(s)
        for l in lines:
            s.sendall(l)
            if l.endswith(b"\n"):
                recv_reply(s)
        socks.append(s)
    socks[1].sendall(b"Subject: half\r\n\r\nhalf a message")
    t0 = time.time()
    assert t.stop() == 0
    assert time.time() - t0 < 15
    for s in socks:
        s.settimeout(5)
        data = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        assert b"421" in data or data == b"", data
        s.close()
