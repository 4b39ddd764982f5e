"""Mount, drive and unmount tern-plfs, the power-loss file system (tests/fuse/plfs.cc).

    with Plfs(tmp_path / "mnt") as fs:
        ...write, fsync...
        fs.drop()      # power cut: everything not fsynced is gone
        fs.stats()     # {'fdatasyncs': ..., 'dropped_bytes': ..., ...}
        fs.fail_writes(True)   # every change fails with EIO until fail_writes(False)
"""
import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("TERN_BUILD", str(ROOT / "build")))
PLFS = os.environ.get("TERN_PLFS", str(BUILD / "tests/fuse/tern-plfs"))
CONTROL = ".plfs-control"


def skip_without_fuse():
    """Skip only when the kernel side is truly missing; a missing binary is a failure."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: this kernel or container has no FUSE")


def mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


class Plfs:
    def __init__(self, mnt: Path):
        self.mnt = Path(mnt)
        self.proc = None

    def mount(self, timeout=10):
        assert os.path.exists(PLFS), f"{PLFS} is not built (ninja -C build)"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.log = open(str(self.mnt) + ".log", "ab")
        self.proc = subprocess.Popen([PLFS, "-f", str(self.mnt)], stdout=self.log, stderr=self.log)
        deadline = time.time() + timeout
        while not mounted(self.mnt):
            if self.proc.poll() is not None:
                raise RuntimeError(f"tern-plfs exited {self.proc.returncode}: "
                                   + Path(str(self.mnt) + ".log").read_text(errors="replace"))
            if time.time() > deadline:
                raise RuntimeError("tern-plfs did not mount")
            time.sleep(0.01)
        return self

    def control(self, cmd):
        with open(self.mnt / CONTROL, "w") as f:
            f.write(cmd)

    def drop(self):
        """Power cut: every file back to its last fsynced content and size, every
        directory back to its last fsynced entries."""
        self.control("drop")

    def drop_torn(self, seed):
        """A power cut after a partial writeback: of each file's unsynced appends a
        prefix of random length (from seed) survives, cut at any byte; each directory
        keeps all or none of its unsynced entry changes. Synced data survives."""
        self.control(f"drop-torn {seed}")

    def sync(self):
        """Everything durable, as if synced and every directory fsynced."""
        self.control("sync")

    def fail_writes(self, on=True):
        """A failing disk: while on, every change (write, fsync, create, mkdir, unlink,
        rename, truncate, fallocate) fails with EIO and changes nothing; reads still work."""
        self.control("fail-writes on" if on else "fail-writes off")

    def stats(self):
        text = (self.mnt / CONTROL).read_text()
        return {k: int(v) for k, v in (l.split("=") for l in text.split())}

    def unmount(self):
        if not self.proc:
            return
        if mounted(self.mnt) and subprocess.run(["umount", str(self.mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(self.mnt)])
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        self.proc = None

    def __enter__(self):
        return self.mount()

    def __exit__(self, *exc):
        self.unmount()


@pytest.fixture
def plfs(tmp_path):
    skip_without_fuse()
    fs = Plfs(tmp_path / "plfs").mount()
    yield fs
    fs.unmount()


def fsync_path(p):
    """fsync a file or a directory by name."""
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
