"""Spool damage against the real ternd and tern-spool: bit flips in each field of a record
(length, CRC, type, content; a middle record and the last one), a segment cut in the
middle, garbage appended. In every case every other message of the segment survives a
restart, `tern-spool check` reports the damage once (exit 1) and, after ternd's recovery
repaired it, not again as new damage (exit 0). Plus: bodies that look like records never
become messages, the spool lock refuses a second ternd, and tern-spool's --json forms."""
import json
import os
import smtplib
import subprocess

import pytest

from conftest import TERN_SPOOL

HEADER = 20  # record header: crc, length, type, version, zero, nonce


def send(t, n, body=lambda i: f"Subject: m{i}\r\n\r\nbody {i}\r\n" + "filler line\r\n" * 20):
    ids = []
    with smtplib.SMTP("127.0.0.1", t.port, local_hostname="damage.test") as c:
        for i in range(n):
            c.ehlo_or_helo_if_needed()
            c.mail("a@example.org")
            c.rcpt("b@example.net")
            code, resp = c.data(body(i).encode() if isinstance(body(i), str) else body(i))
            assert code == 250, resp
            ids.append(resp.decode().split()[-1])
    return ids


def located(t, ids):
    """(segment path, offset) of each queued message, from tern-spool dump."""
    out = []
    for qid in ids:
        d = t.spool_dump(qid)
        out.append((d["segment"], d["offset"]))
    return out


def check(t):
    return subprocess.run([TERN_SPOOL, "check", t.spool], capture_output=True, text=True)


def queued(t):
    return [m["id"] for m in t.spool_list()]


def flip(path, at, mask):
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ mask]))


def damage_then_restart(t, damage, lost):
    """Send five messages, stop, damage, check (new damage), restart (repair), check
    (nothing new) and compare the queue: everything but `lost` survives."""
    t.start()
    ids = send(t, 5)
    assert t.stop() == 0
    where = located(t, ids)
    seg = where[0][0]
    assert all(w[0] == seg for w in where)
    damage(seg, [w[1] for w in where], os.path.getsize(seg))
    first = check(t)
    assert first.returncode == 1, first.stdout + first.stderr
    t.start()
    assert t.stop() == 0
    assert queued(t) == [q for i, q in enumerate(ids) if i not in lost]
    after = check(t)
    assert after.returncode == 0, after.stdout + after.stderr
    # And once more through a restart: still nothing new, nothing lost.
    t.start()
    assert t.stop() == 0
    assert check(t).returncode == 0
    assert "spool recovery: " in t.log()
    return ids


@pytest.mark.parametrize("field,at,mask", [
    ("crc", 1, 0x10), ("length", 4, 0x01), ("length-high", 7, 0x40), ("type", 8, 0x06),
    ("nonce", 15, 0x80), ("content", HEADER + 100, 0x01),
])
@pytest.mark.parametrize("victim", [2, 4])  # a middle record, the last record
def test_bit_flip_keeps_every_other_message(ternd_factory, field, at, mask, victim):
    t = ternd_factory()
    damage_then_restart(t, lambda seg, offs, size: flip(seg, offs[victim] + at, mask), lost={victim})
    # The damaged record's bytes are kept: in the segment (listed in the ledger) or in
    # quarantine/ (a torn tail is copied before it is cut).
    qdir = os.path.join(t.spool, "quarantine")
    assert any(n.endswith(".bad") for n in os.listdir(qdir))


def test_cut_in_the_middle_keeps_what_came_before(ternd_factory):
    t = ternd_factory()

    def cut(seg, offs, size):
        os.truncate(seg, offs[2] + 30)

    damage_then_restart(t, cut, lost={2, 3, 4})


def test_appended_garbage_is_reported_once(ternd_factory):
    t = ternd_factory()

    def garbage(seg, offs, size):
        with open(seg, "ab") as f:
            f.write(b"\x01" * 5000 + b"not a record")

    damage_then_restart(t, garbage, lost=set())


def test_record_lookalike_bodies_never_become_messages(ternd_factory):
    """Bodies full of record-like text (the segment magic, headers with plausible fields)
    and a damaged carrier so that recovery has to resync through them: no phantom."""
    t = ternd_factory()
    fake = (b"\x41\x41\x41\x41\x7f\x01\x01\x01\x02\x02\x01\x01TERNSEG2TERNSEG1" * 200).decode("latin-1")
    t.start()
    ids = send(t, 3, body=lambda i: f"Subject: f{i}\r\n\r\n" + (fake + "\r\n") * 20)
    assert t.stop() == 0
    seg, off = located(t, [ids[1]])[0]
    flip(seg, off + 1, 0x01)  # the carrier's CRC: recovery resyncs across its body
    t.start()
    assert t.stop() == 0
    assert queued(t) == [ids[0], ids[2]]
    listed = json.loads(subprocess.check_output([TERN_SPOOL, "--json", "list", "--all", t.spool]))
    assert [m["id"] for m in listed] == [ids[0], ids[2]]


def test_second_ternd_on_the_same_spool_is_refused(ternd_factory):
    a = ternd_factory().start()
    ids = send(a, 2)
    b = ternd_factory(spool=a.spool)
    with pytest.raises(RuntimeError) as e:
        b.start()
    assert b.proc.returncode != 0
    assert f"spool {a.spool} is in use by another ternd (pid {a.proc.pid})" in str(e.value)
    # The first keeps working and its segment is intact.
    ids += send(a, 1)
    assert queued(a) == ids
    r = check(a)
    assert r.returncode == 0, r.stdout
    # tern-spool repair refuses a live spool.
    r = subprocess.run([TERN_SPOOL, "repair", a.spool], capture_output=True, text=True)
    assert r.returncode != 0
    assert f"is in use by another ternd (pid {a.proc.pid})" in r.stderr
    assert a.stop() == 0
    r = subprocess.run([TERN_SPOOL, "repair", a.spool], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_json_flag_after_subcommand_and_utf8(ternd):
    body = "Subject: caf\u00e9 \u2713\r\n\r\nna\u00efve \U0001F600\r\n".encode() + b"bad \xff\xfe byte\r\n"
    ids = send(ternd, 1, body=lambda i: body)
    before = subprocess.check_output([TERN_SPOOL, "--json", "list", ternd.spool])
    after = subprocess.check_output([TERN_SPOOL, "list", "--json", ternd.spool])
    assert before == after
    assert [m["id"] for m in json.loads(after)] == ids
    raw = subprocess.check_output([TERN_SPOOL, "dump", "--json", ternd.spool, ids[0]])
    raw.decode("utf-8")  # the output is valid UTF-8
    assert "café ✓".encode() in raw  # UTF-8 passes through as UTF-8, not \u escapes
    assert "\U0001F600".encode() in raw
    m = json.loads(raw)
    assert "naïve 😀" in m["content"]
    assert "bad \u00ff\u00fe byte" in m["content"]  # invalid bytes: \u00XX of the byte
    assert b"\\u00ff\\u00fe" in raw
    chk = subprocess.run([TERN_SPOOL, "check", "--json", ternd.spool], capture_output=True, text=True)
    assert chk.returncode == 0
    assert json.loads(chk.stdout)["problems"] == []


def test_stop_trims_the_segment_preallocation(ternd):
    """The segment is preallocated (fallocate KEEP_SIZE, 64 MiB): at stop ternd cuts it to
    its real end, or the blocks would leak unseen by ls."""
    ids = send(ternd, 3)
    seg = located(ternd, ids)[0][0]
    assert ternd.stop() == 0
    st = os.stat(seg)
    assert st.st_blocks * 512 <= (st.st_size + 4095) // 4096 * 4096 + 4096, (st.st_blocks, st.st_size)


def test_check_config_refuses_a_message_size_the_spool_cannot_read(tmp_path):
    """A 1 GiB message_size plus envelope and Received: header exceeds the spool reader's
    1 GiB record bound: --check-config refuses it with FILE:LINE: key: problem."""
    from conftest import TERND
    cfg = tmp_path / "t.toml"
    cfg.write_text('[[listen]]\naddress = "127.0.0.1:2525"\n[limits]\nmessage_size = 1073741824\n')
    r = subprocess.run([TERND, "--check-config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith(f"{cfg}:4: limits.message_size: a message of 1073741824 bytes"), r.stderr
    cfg.write_text('[[listen]]\naddress = "127.0.0.1:2525"\n[limits]\nmessage_size = 1000000000\n')
    r = subprocess.run([TERND, "--check-config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
