"""Power loss: a 250 means the message survives a power cut, not only a kill -9.

The spool lives on tern-plfs (tests/fuse), which keeps everything not fsynced in memory
and throws it away on a "drop", as a power cut would. Senders run concurrently; ternd is
killed with -9 and reaped; the unsynced data is dropped; ternd restarts on what is left,
and every message that got a 250 must be there with its exact content. The same run with
`[spool] fsync = false` must lose acknowledged messages, and the test asserts that it
does: it shows that the drop really takes away what a power cut would.

Replay a run with TERN_SEED=N (printed as seed=N)."""
import hashlib
import json
import os
import random
import re
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import TERND, TERN_SPOOL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuse"))
from plfs import plfs  # noqa: E402,F401  (fixture)
# The file system's own rules: this test is only as good as they are, so they run here
# too (tools/test.sh runs tests/integration only).
import test_plfs  # noqa: E402
globals().update({k: v for k, v in vars(test_plfs).items() if k.startswith("test_")})


def seed():
    s = int(os.environ.get("TERN_SEED") or random.SystemRandom().randrange(1, 2**31))
    print(f"seed={s} (replay with TERN_SEED={s})")
    return s


def message(token, rng):
    """A message whose every byte follows from its token: verifiable after recovery.
    Sizes vary (records of different lengths); some lines start with a dot (stuffed by
    smtplib, unstuffed by ternd)."""
    lines, h = [], hashlib.sha256(token.encode()).hexdigest()
    for i in range(rng.choice([1, 4, 20, 60, 200])):
        h = hashlib.sha256(h.encode()).hexdigest()
        lines.append(("." if i % 17 == 3 else "") + h + h[:12])
    return (f"Subject: {token}\r\nX-Token: {token}\r\n\r\n" + "\r\n".join(lines)
            + f"\r\nend {token}\r\n")


def sender(name, port, rng, acked, stop):
    """Send one message after another; record token -> (queue id, content) on each 250."""
    n = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=5) as s:
                s.ehlo("powerloss.test")
                while not stop.is_set():
                    token = f"{name}-{n}"
                    n += 1
                    msg = message(token, rng)
                    if s.mail("a@example.org")[0] != 250 or s.rcpt("b@example.net")[0] != 250:
                        s.rset()
                        continue
                    code, resp = s.data(msg)
                    if code == 250:
                        m = re.match(rb"2\.0\.0 Ok: queued as (\S+)", resp)
                        assert m, resp
                        acked[token] = (m.group(1).decode(), msg)
        except (smtplib.SMTPException, OSError):
            time.sleep(0.02)


def with_spool_key(t, line):
    """Add a key to the [spool] table of a Ternd's config (the fixture has no parameter)."""
    text = t.config.read_text()
    t.config.write_text(text.replace(f'dir = "{t.spool}"\n', f'dir = "{t.spool}"\n{line}\n', 1))


def powerloss_run(plfs, ternd_factory, fsync, rounds=3, threads=8, installed=True):
    """Rounds of: load, kill -9, power cut, restart. The first cut drops everything not
    synced; later ones keep a random prefix of the unsynced appends (torn records for
    recovery to cut). Returns (ternd, acked, spool messages by id, FS stats)."""
    rng = random.Random(seed())
    spool = plfs.mnt / "spool"
    if installed:
        # The spool directory of an installed system is on disk before ternd first
        # starts: ternd creates segments/ and quarantine/ but does not fsync their parent
        # (test_first_start_on_an_empty_disk), so create them here, durably.
        for d in (spool, spool / "segments", spool / "quarantine"):
            d.mkdir()
        plfs.sync()
    t = ternd_factory(shards=2, spool=spool, limits={"connections": 64})
    # The smallest segments: each shard starts dozens under load, and a new segment is
    # durable only with its directory fsynced, which the cuts then check.
    with_spool_key(t, "segment_size = 1048576")
    if not fsync:
        with_spool_key(t, "fsync = false")
        chk = subprocess.run([TERND, "--check-config", str(t.config)], capture_output=True, text=True)
        if "spool.fsync: unknown key" in chk.stdout + chk.stderr:
            pytest.skip("needs [spool] fsync key")
        assert chk.returncode == 0, chk.stdout + chk.stderr
    acked = {}
    for r in range(rounds):
        t.start()
        stop = threading.Event()
        senders = [threading.Thread(target=sender, args=(f"r{r}t{i}", t.port, random.Random(rng.random()), acked, stop))
                   for i in range(threads)]
        for th in senders:
            th.start()
        time.sleep(rng.uniform(0.8, 1.6))
        t.kill9()      # returns once the process is reaped: no write of it is still in flight
        if r == 0:
            plfs.drop()  # the power cut: what was not fsynced is gone
        else:
            plfs.drop_torn(rng.randrange(2**63))  # and some unsynced appends, torn
        after_cut = plfs.stats()
        stop.set()
        for th in senders:
            th.join()
        # Reaped means done: a write or fsync of the dead ternd that landed after the cut
        # would make this test prove less than it claims.
        late = {k: plfs.stats()[k] - after_cut[k] for k in ("writes", "fsyncs", "fdatasyncs", "fsyncdirs")}
        assert not any(late.values()), f"file system calls after ternd was reaped: {late}"
    stats = plfs.stats()
    t.start()  # recovery on what survived
    msgs = json.loads(subprocess.check_output([TERN_SPOOL, "--json", "list", "--all", "--content", t.spool]))
    return t, acked, {m["id"]: m for m in msgs}, stats


def lost_messages(acked, by_id):
    lost, wrong = [], []
    for token, (qid, msg) in acked.items():
        m = by_id.get(qid)
        if m is None:
            lost.append(token)
        elif not (m["content"].endswith(msg) and m["content"].startswith("Received: ")
                  and all(l.startswith(("Received: ", "\t", " "))
                          for l in m["content"][:-len(msg)].split("\r\n")[:-1])):
            wrong.append(token)  # present but not byte for byte what was sent
    return lost, wrong


def test_powerloss_never_loses_an_acknowledged_message(plfs, ternd_factory):
    t, acked, by_id, stats = powerloss_run(plfs, ternd_factory, fsync=True)
    lost, wrong = lost_messages(acked, by_id)
    print(f"fsync=true: {len(acked)} acknowledged, {len(by_id)} in the spool after 3 power cuts, "
          f"{len(lost)} lost; file system: {stats}")
    assert len(acked) > 100, f"the load hardly ran: {len(acked)} messages acknowledged"
    assert stats["drops"] == 3 and stats["fdatasyncs"] > 0, stats
    assert not lost, f"{len(lost)} acknowledged message(s) lost in a power cut, e.g. {lost[:3]}"
    assert not wrong, f"{len(wrong)} acknowledged message(s) changed, e.g. {wrong[:3]}"
    # Unacknowledged messages may survive (fsynced, killed before the reply), but whole.
    for m in by_id.values():
        tok = m["content"].split("X-Token: ")[1].split("\r\n")[0]
        assert m["content"].endswith(f"end {tok}\r\n"), m["id"]
    # dump agrees with list for a sample.
    for token, (qid, msg) in list(acked.items())[:: max(1, len(acked) // 5)]:
        assert t.spool_dump(qid)["content"].endswith(msg), qid
    assert t.stop() == 0
    chk = t.spool_check()
    assert chk.returncode == 0, chk.stdout + chk.stderr


def test_powerloss_without_fsync_loses_acknowledged_messages(plfs, ternd_factory):
    # The control: with fdatasync off, 250s are sent for data that only the page cache
    # holds, and a power cut must take them. If this passes, the positive test proves
    # something; if the drop kept unsynced data, this test would fail.
    t, acked, by_id, stats = powerloss_run(plfs, ternd_factory, fsync=False)
    lost, wrong = lost_messages(acked, by_id)
    print(f"fsync=false: {len(acked)} acknowledged, {len(by_id)} in the spool after 3 power cuts, "
          f"{len(lost)} lost; file system: {stats}")
    assert len(acked) > 100, f"the load hardly ran: {len(acked)} messages acknowledged"
    assert stats["dropped_bytes"] > 0, stats
    assert lost, f"all {len(acked)} acknowledged messages survived without fsync: the drop drops nothing"
    assert t.stop() == 0


def test_first_start_on_an_empty_disk(plfs, ternd_factory):
    # Regression: ternd created <spool>, segments/ and quarantine/ without fsyncing their
    # parents, and a power cut after the first start took the whole spool (2,498-4,877 of
    # 2,498-4,877 acknowledged messages lost per run on tern-plfs).
    t, acked, by_id, stats = powerloss_run(plfs, ternd_factory, fsync=True, rounds=1, installed=False)
    lost, _ = lost_messages(acked, by_id)
    print(f"first start: {len(acked)} acknowledged, {len(lost)} lost; file system: {stats}")
    assert len(acked) > 100, f"the load hardly ran: {len(acked)} messages acknowledged"
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged message(s) lost: the spool directories were not durable"
