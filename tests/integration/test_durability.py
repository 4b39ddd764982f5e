"""Durability: a 250 means the message is on disk. kill -9 at random moments under load,
restart, and every acknowledged message is in the spool, intact; nothing half-written
counts as a message. And a full disk: 451 for the batch, refusal until space returns.

The kill times are random: a run prints seed=N (pytest shows it with a failure), and
TERN_SEED=N replays the same schedule."""
import json
import os
import random
import re
import socket
import subprocess
import threading
import time
import uuid

import pytest

from conftest import TERN_SPOOL, recv_reply


def seed():
    s = int(os.environ.get("TERN_SEED") or random.SystemRandom().randrange(1, 2**31))
    print(f"seed={s} (replay with TERN_SEED={s})")
    return s


def sender(port, acked, stop, errors):
    """Send messages one at a time; remember token -> queue id for each 250."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                if not recv_reply(s, quiet=0.05).startswith(b"220"):
                    time.sleep(0.05)
                    continue
                s.sendall(b"EHLO k9.test\r\n")
                recv_reply(s, quiet=0.05)
                while not stop.is_set():
                    token = uuid.uuid4().hex
                    s.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
                    r = b""
                    while r.count(b"\r\n") < 3:
                        c = s.recv(4096)
                        if not c:
                            raise ConnectionError
                        r += c
                    if b"354" not in r:
                        raise ConnectionError(r)
                    body = f"Subject: {token}\r\nX-Token: {token}\r\n\r\n" + ("line of text\r\n" * 40) + f"end {token}\r\n"
                    s.sendall(body.encode() + b".\r\n")
                    r = b""
                    while not r.endswith(b"\r\n"):
                        c = s.recv(4096)
                        if not c:
                            raise ConnectionError
                        r += c
                    if r.startswith(b"250 2.0.0 Ok: queued as "):
                        acked[token] = r.split()[-1].decode()
        except (OSError, ConnectionError):
            time.sleep(0.02)


def test_kill9_never_loses_an_acknowledged_message(ternd_factory):
    t = ternd_factory(shards=2, limits={"connections": 64})
    acked, rounds = {}, 4
    rng = random.Random(seed())
    for _ in range(rounds):
        t.start()
        stop, errors = threading.Event(), []
        threads = [threading.Thread(target=sender, args=(t.port, acked, stop, errors)) for _ in range(12)]
        for th in threads:
            th.start()
        time.sleep(rng.uniform(0.4, 1.2))
        t.kill9()  # in the middle of DATA, group commits and replies
        stop.set()
        for th in threads:
            th.join()
    t.start()  # recovery repairs torn tails left by the last kill
    log = t.log()
    # One summary per start; repairs (torn tails after a kill) add lines of their own.
    assert len(re.findall(r"spool recovery: \d+ segment\(s\)", log)) == rounds + 1
    msgs = json.loads(subprocess.check_output([TERN_SPOOL, "--json", "list", "--content", t.spool]))
    by_id = {m["id"]: m for m in msgs}
    assert len(acked) > 100, f"the load hardly ran: {len(acked)} messages acknowledged"
    missing = [tok for tok, qid in acked.items() if qid not in by_id]
    assert not missing, f"{len(missing)} acknowledged message(s) lost, e.g. {missing[:3]}"
    for tok, qid in acked.items():
        c = by_id[qid]["content"]
        assert f"X-Token: {tok}\r\n" in c and c.endswith(f"end {tok}\r\n"), qid
    # Messages that never got their 250 (killed between fsync and reply) may be present,
    # but only whole: every message in the spool is complete.
    for m in msgs:
        c = m["content"]
        tok = c.split("X-Token: ")[1].split("\r\n")[0]
        assert c.endswith(f"end {tok}\r\n"), m["id"]
    ids = [m["id"] for m in msgs]
    assert len(ids) == len(set(ids)), "queue ids must be unique across restarts"
    assert t.stop() == 0
    chk = t.spool_check()
    assert chk.returncode == 0, chk.stdout + chk.stderr


def send_one(port, size):
    """One message on a fresh connection; returns the final reply line(s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        banner = recv_reply(s, quiet=0.05)
        if not banner.startswith(b"220"):
            return banner
        s.sendall(b"EHLO full.test\r\n")
        recv_reply(s, quiet=0.05)
        s.sendall(b"MAIL FROM:<a@example.org>\r\n")
        r = recv_reply(s, quiet=0.05)
        if not r.startswith(b"250"):
            return r
        s.sendall(b"RCPT TO:<b@example.net>\r\nDATA\r\n")
        r = b""
        while r.count(b"\r\n") < 2:
            r += s.recv(4096)
        body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (size // 1000) + b".\r\n"
        s.sendall(body)
        return recv_reply(s, quiet=0.2)


def test_enospc_gives_451_then_refuses_then_recovers(ternd_factory, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        t = ternd_factory(spool=mnt / "spool", extra="").start()
        # Leave little room: the first segment's 1 MiB... is 64 MiB by default, so fill by size.
        filler = mnt / "filler"
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        filler.write_bytes(b"\0" * max(0, free - 300_000))
        replies = [send_one(t.port, 100_000) for _ in range(8)]
        ok = [r for r in replies if b"250 2.0.0 Ok: queued as" in r]
        assert any(b"451 4.3.0" in r for r in replies), replies
        assert t.wait_log("No space left on device"), t.log()[-3000:]
        # Unhealthy: new sessions are refused up front (haproxy's check sees it too).
        r = send_one(t.port, 1000)
        assert r.startswith(b"421 4.3.0") or b"452 4.3.1" in r, r
        filler.unlink()
        deadline, r = time.time() + 5, b""
        while time.time() < deadline:
            r = send_one(t.port, 1000)
            if b"250 2.0.0 Ok: queued as" in r:
                break
            time.sleep(0.2)
        assert b"250 2.0.0 Ok: queued as" in r, r
        assert t.wait_log("is writable again"), t.log()[-3000:]
        assert t.stop() == 0
        chk = t.spool_check()
        assert chk.returncode == 0, chk.stdout
        assert len(t.spool_list()) == len(ok) + 1
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
