#!/usr/bin/python3
"""A stand-in for ternd with [ha], to test test_ha.py itself before ternd's HA lands.

    TERND=tests/integration/fake_ternd_ha.py python3 -m pytest tests/integration/test_ha.py

It is NOT ternd and proves nothing about ternd: it reads the same config, runs keepalived
for the VRRP part (from the [ha] section: priority, interval, preempt, GARP refresh), serves
just enough SMTP on the listen address (IP_FREEBIND) to spool a message with an fsync, and
models issue 7's health rules: a failed spool write, or a file `stall-shard-N` in
$TERN_FAULT_STALL_DIR older than heartbeat_timeout, makes the node unhealthy, which
keepalived sees through a tracked file (weight 0: fault, i.e. resign at once; else the
priority drops by health_priority_drop). Transitions are logged as ternd will log them:
`ha: VRID 51 BACKUP -> MASTER (reason keepalived)`. It lets the harness (namespaces,
fixtures, probe, plfs fail-writes, stall files) be checked end to end; a test that passes
here and fails on ternd points at ternd.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ha_lab import interval_seconds, keepalived_conf  # noqa: E402


def main():
    args = sys.argv[1:]
    if args[:1] == ["--check-config"]:
        tomllib.loads(Path(args[1]).read_text())
        print(f"{args[1]}: configuration OK")
        return 0
    cfg = tomllib.loads(Path(args[args.index("--config") + 1]).read_text())
    ha = cfg["ha"]
    spool = Path(cfg["spool"]["dir"])
    try:
        spool.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    work = Path(tempfile.mkdtemp(prefix="fake-ternd-"))
    track = work / "health"
    track.write_text("0\n")
    drop = int(ha.get("health_priority_drop", 0))
    hb = interval_seconds(ha.get("heartbeat_timeout", "1s"))
    conf = keepalived_conf(f"fake{os.getpid()}", ha["priority"], ha["advert_interval"], vrid=ha["vrid"],
                           vips=ha["virtual_addresses"], preempt=ha.get("preempt", True),
                           garp_repeat=ha.get("garp_burst", 5),
                           garp_refresh=interval_seconds(ha.get("garp_refresh", "60s")),
                           unicast_peers=ha.get("unicast_peers", ()),
                           interface=ha.get("interface", "eth0"))
    conf = conf.replace("global_defs {", "vrrp_track_file health {\n  file %s\n  weight %d\n}\nglobal_defs {"
                        % (track, -drop if drop else 0), 1)
    conf = conf.rstrip().rstrip("}") + "  track_file {\n    health\n  }\n}\n"
    (work / "k.conf").write_text(conf)
    ka = subprocess.Popen(["keepalived", "-n", "-l", "-P", "-G", "-f", str(work / "k.conf"),
                           "-p", str(work / "k.pid"), "-r", str(work / "v.pid"),
                           "-c", str(work / "c.pid"), "-b", str(work / "b.pid"), "-i", f"f{os.getpid()}"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    vrid = ha["vrid"]
    state = ["INIT"]

    def relay_log():
        for line in ka.stdout:
            m = re.search(r"Entering (\w+) STATE", line)
            if m:
                new = "BACKUP" if m.group(1) == "FAULT" else m.group(1)
                if new != state[0]:
                    print(f"ha: VRID {vrid} {state[0]} -> {new} (reason keepalived)", file=sys.stderr, flush=True)
                    state[0] = new
    threading.Thread(target=relay_log, daemon=True).start()

    spool_bad = [False]

    def health():
        while True:
            stuck = False
            d = os.environ.get("TERN_FAULT_STALL_DIR")
            if d and os.path.isdir(d):
                for f in os.listdir(d):
                    if f.startswith("stall-shard-"):
                        try:
                            stuck |= time.time() - os.stat(os.path.join(d, f)).st_mtime > hb
                        except FileNotFoundError:
                            pass
            bad = "1" if (stuck or spool_bad[0]) else "0"
            if track.read_text().strip() != bad:
                track.write_text(bad + "\n")
            if spool_bad[0]:  # retry: healthy again once a write succeeds
                spool_bad[0] = not write_spool(b"probe\n", "health-probe")
            time.sleep(0.05)

    def write_spool(data, name):
        try:
            fd = os.open(spool / name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        except OSError:
            return False
    threading.Thread(target=health, daemon=True).start()

    host, port = cfg["listen"][0]["address"].rsplit(":", 1)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND
    ls.bind((host, int(port)))
    ls.listen(1024)
    seq = [0]

    def session(c):
        try:
            f = c.makefile("rwb")
            f.write(b"220 relay.test fake\r\n"); f.flush()
            data = None
            while True:
                line = f.readline()
                if not line:
                    return
                cmd = line[:4].upper()
                if cmd == b"DATA":
                    f.write(b"354 go\r\n"); f.flush()
                    body = b""
                    while True:
                        l = f.readline()
                        if not l or l == b".\r\n":
                            break
                        body += l
                    seq[0] += 1
                    ok = write_spool(body, f"msg-{os.getpid()}-{seq[0]}")
                    if not ok:
                        spool_bad[0] = True
                    f.write(b"250 ok\r\n" if ok else b"451 spool write failed\r\n")
                elif cmd == b"QUIT":
                    f.write(b"221 bye\r\n"); f.flush()
                    return
                else:
                    f.write(b"250 ok\r\n")
                f.flush()
        except OSError:
            pass
        finally:
            c.close()

    def accept():
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=session, args=(c,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    signal.signal(signal.SIGINT, lambda *a: done.set())
    print("ternd (fake, keepalived inside) started in 1 ms", file=sys.stderr, flush=True)
    while not done.wait(0.1):
        if ka.poll() is not None:
            print(f"fake ternd: keepalived exited {ka.returncode}", file=sys.stderr, flush=True)
            return 1
    # SIGTERM: stop accepting, then priority 0 (keepalived's own stop), then exit.
    ls.close()
    ka.send_signal(signal.SIGTERM)
    ka.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
