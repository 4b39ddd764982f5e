"""Fixtures for the integration tests: run the real ternd binary on free loopback ports
in a temp directory, talk to it with real clients, inspect its spool with tern-spool."""
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TERND = os.environ.get("TERND", str(ROOT / "build/src/ternd"))
BUILD = Path(os.environ.get("TERN_BUILD", str(ROOT / "build")))
TERN_SPOOL = str(BUILD / "tools/tern-spool")
TERN_LOAD = str(BUILD / "tools/tern-load")
SANITIZED = os.environ.get("TERN_VARIANT") == "asan"


def free_port(host="127.0.0.1"):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def toml_list(xs):
    return "[" + ", ".join(f'"{x}"' for x in xs) + "]"


class Ternd:
    """One ternd process with its own config, spool and log in a temp directory."""

    def __init__(self, tmp: Path, shards=1, listens=None, networks=("127.0.0.0/8", "::1"),
                 domains=(), limits=None, spool=None, extra="", argv_prefix=(), env=None):
        self.tmp = tmp
        # argv_prefix runs ternd under something, e.g. ["ip", "netns", "exec", NS] (which
        # execs: the pid stays ternd's, so signals still reach it). env: None inherits.
        self.argv_prefix = list(argv_prefix)
        self.env = env
        self.port = free_port()
        self.spool = str(spool or tmp / "spool")
        self.listens = listens if listens is not None else [{"address": f"127.0.0.1:{self.port}"}]
        lines = [f'hostname = "relay.test"', f"shards = {shards}", "[spool]", f'dir = "{self.spool}"']
        for l in self.listens:
            lines.append("[[listen]]")
            for k, v in l.items():
                if isinstance(v, bool):
                    lines.append(f"{k} = {'true' if v else 'false'}")
                elif isinstance(v, (list, tuple)):
                    lines.append(f"{k} = {toml_list(v)}")
                elif isinstance(v, int):
                    lines.append(f"{k} = {v}")
                else:
                    lines.append(f'{k} = "{v}"')
        lines += ["[relay]", f"networks = {toml_list(networks)}", f"domains = {toml_list(domains)}"]
        if limits:
            lines.append("[limits]")
            lines += [f"{k} = {v}" for k, v in limits.items()]
        self.config = tmp / "tern.toml"
        self.config.write_text("\n".join(lines) + "\n" + extra)
        self.logpath = tmp / "ternd.log"
        self.proc = None

    def start(self, timeout=15):
        self.logf = open(self.logpath, "ab")
        self.proc = subprocess.Popen(self.argv_prefix + [TERND, "--config", str(self.config)],
                                     stdout=self.logf, stderr=self.logf, cwd=self.tmp, env=self.env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ternd exited {self.proc.returncode}:\n{self.log()}")
            if " started in " in self.log():
                # The last start's line; restarts append to the same log.
                if self.log().count(" started in ") >= self.starts + 1:
                    self.starts += 1
                    return self
            time.sleep(0.02)
        raise RuntimeError("ternd did not start:\n" + self.log())

    starts = 0

    def log(self):
        return self.logpath.read_text(errors="replace") if self.logpath.exists() else ""

    def wait_log(self, text, timeout=5):
        """Shards flush their log lines once per loop iteration, so a line can land just
        after the client saw the effect: wait for it (bounded) rather than race it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in self.log():
                return True
            time.sleep(0.02)
        return False

    def stop(self, timeout=20):
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
            raise AssertionError("ternd did not stop on SIGTERM:\n" + self.log())
        self.logf.close()
        return rc

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.logf.close()

    def spool_list(self, all=False):
        args = [TERN_SPOOL, "--json", "list", self.spool] + (["--all"] if all else [])
        return json.loads(subprocess.check_output(args))

    def spool_dump(self, qid):
        return json.loads(subprocess.check_output([TERN_SPOOL, "--json", "dump", self.spool, qid]))

    def spool_check(self):
        return subprocess.run([TERN_SPOOL, "check", self.spool], capture_output=True, text=True)


def wait_for(pred, timeout=15, step=0.05):
    """Poll pred() until it is truthy or timeout seconds passed; its last value."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


@pytest.fixture
def ternd_factory(tmp_path):
    started = []

    def make(**kw):
        # Each instance its own directory: config, log and (default) spool never collide.
        d = tmp_path / f"ternd{len(started)}"
        d.mkdir()
        t = Ternd(d, **kw)
        started.append(t)
        return t

    yield make
    for t in started:
        if t.proc and t.proc.poll() is None:
            rc = t.stop()
            assert rc == 0, f"ternd exited {rc} on SIGTERM (sanitizer report?):\n{t.log()[-4000:]}"


@pytest.fixture
def ternd(ternd_factory):
    return ternd_factory().start()


def smtp_dialogue(port, lines, host="127.0.0.1", prefix=b"", timeout=5):
    """Send raw bytes, return everything the server said until it closes or goes quiet."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        if prefix:
            s.sendall(prefix)
        out = b""
        s.settimeout(timeout)
        out += recv_reply(s)
        for l in lines:
            s.sendall(l)
            out += recv_reply(s)
        return out


def recv_reply(s, quiet=0.3):
    """Read until a complete final reply line arrived and the server is quiet."""
    buf = b""
    s.settimeout(quiet if buf else 5)
    while True:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            return buf
        if not chunk:
            return buf
        buf += chunk
        s.settimeout(quiet)


def read_until_closed(s, timeout=10):
    """Everything the server sends until it closes the connection."""
    s.settimeout(timeout)
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            return data
        data += chunk


TERN_SINK = str(BUILD / "tools/tern-sink")


class Sink:
    """One tern-sink process (tools/tern_sink.cc) on a loopback port 0; the port is read
    from its `tern-sink: listening on ADDR` line. Its stderr (the counters) is kept."""

    def __init__(self, tmp: Path, args=(), listen="127.0.0.1:0"):
        self.tmp = tmp
        self.args = [TERN_SINK, "--listen", listen] + list(args)
        self.errpath = tmp / "tern-sink.err"
        self.proc = None
        self.port = None
        self.host = None
        self.env = None  # None: the test's environment

    def start(self, timeout=10):
        self.errf = open(self.errpath, "ab")
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=self.errf, cwd=self.tmp, env=self.env)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("tern-sink: listening on "):
            self.proc.wait(timeout)
            raise RuntimeError(f"tern-sink did not start: {line!r}\n{self.err()}")
        addr = line.split("listening on ", 1)[1].strip()
        host, port = addr.rsplit(":", 1)
        self.host, self.port = host.strip("[]"), int(port)
        return self

    def stdout_lines(self):
        """What the sink printed after the listening line (--log), once it has exited."""
        return self.proc.stdout.read().decode(errors="replace").splitlines()

    def err(self):
        return self.errpath.read_text(errors="replace") if self.errpath.exists() else ""

    def counters(self, text=None):
        """The last counters line as a dict (`tern-sink: WHAT: k=v ...`)."""
        lines = [l for l in (text or self.err()).splitlines() if l.startswith("tern-sink: ") and "connections=" in l]
        if not lines:
            return {}
        return dict(kv.split("=", 1) for kv in lines[-1].split() if "=" in kv)

    def stop(self, timeout=20):
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("tern-sink did not stop on SIGTERM:\n" + self.err())


@pytest.fixture
def sink_factory(tmp_path):
    started = []

    def make(*args, listen="127.0.0.1:0", start=True):
        d = tmp_path / f"sink{len(started)}"
        d.mkdir()
        s = Sink(d, args, listen)
        started.append(s)
        return s.start() if start else s

    yield make
    for s in started:
        if s.proc and s.proc.poll() is None:
            rc = s.stop()
            assert rc == 0, f"tern-sink exited {rc} on SIGTERM (sanitizer report?):\n{s.err()[-4000:]}"
