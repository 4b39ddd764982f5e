"""tern-plfs itself: what survives a drop and what does not. The power-loss test of the
spool (tests/integration/test_powerloss.py) is only as good as these rules, so that test
imports and runs these too."""
import ctypes
import fcntl
import mmap
import os
import subprocess

import pytest

from plfs import fsync_path, plfs  # noqa: F401  (plfs is a fixture)


def write_file(path, data, sync_file=False, sync_dir=False, flags=os.O_CREAT | os.O_WRONLY):
    fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, data)
        if sync_file:
            os.fsync(fd)
    finally:
        os.close(fd)
    if sync_dir:
        fsync_path(os.path.dirname(path))


def durable_empty_dir(fs, name="d"):
    d = fs.mnt / name
    d.mkdir()
    fsync_path(fs.mnt)
    return d


def test_unsynced_write_is_dropped(plfs):
    d = durable_empty_dir(plfs)
    write_file(d / "f", b"", sync_file=True, sync_dir=True)  # an empty file, durably named
    write_file(d / "f", b"lost on power cut")
    assert (d / "f").read_bytes() == b"lost on power cut"
    plfs.drop()
    assert (d / "f").read_bytes() == b""
    s = plfs.stats()
    assert s["drops"] == 1 and s["dropped_bytes"] == len(b"lost on power cut"), s


def test_fsynced_write_is_kept_and_later_writes_are_not(plfs):
    d = durable_empty_dir(plfs)
    write_file(d / "f", b"A" * 10000, sync_file=True, sync_dir=True)
    fd = os.open(d / "f", os.O_WRONLY)
    os.pwrite(fd, b"B" * 100, 5000)       # overwrite in place, unsynced
    os.writev(fd, [b"C" * 3000, b"D" * 3000])  # and at the file position (0), unsynced
    os.close(fd)
    assert (d / "f").read_bytes() == b"C" * 3000 + b"D" * 3000 + b"A" * 4000
    fd = os.open(d / "f", os.O_WRONLY)
    os.pwrite(fd, b"E" * 5000, 10000)     # append, unsynced
    os.close(fd)
    assert (d / "f").stat().st_size == 15000
    plfs.drop()
    assert (d / "f").read_bytes() == b"A" * 10000


def test_fdatasync_makes_data_and_size_durable(plfs):
    d = durable_empty_dir(plfs)
    write_file(d / "f", b"", sync_file=True, sync_dir=True)
    fd = os.open(d / "f", os.O_WRONLY)
    os.pwrite(fd, b"x" * 5000, 0)
    os.fdatasync(fd)
    os.pwrite(fd, b"y" * 5000, 5000)
    os.close(fd)
    plfs.drop()
    assert (d / "f").read_bytes() == b"x" * 5000


def test_new_file_without_dir_fsync_vanishes_even_if_the_file_was_fsynced(plfs):
    d = durable_empty_dir(plfs)
    write_file(d / "kept", b"data", sync_file=True, sync_dir=True)
    write_file(d / "lost", b"data", sync_file=True)  # no directory fsync after this one
    plfs.drop()
    assert sorted(os.listdir(d)) == ["kept"]
    assert (d / "kept").read_bytes() == b"data"


def test_new_file_with_dir_fsync_but_no_file_fsync_is_empty(plfs):
    d = durable_empty_dir(plfs)
    write_file(d / "f", b"data", sync_dir=True)
    plfs.drop()
    assert (d / "f").read_bytes() == b""


def test_new_directory_needs_its_parent_fsynced(plfs):
    # The directory's own fsync makes its entries durable, not its name in the parent.
    sub = plfs.mnt / "sub"
    sub.mkdir()
    write_file(sub / "f", b"data", sync_file=True, sync_dir=True)
    plfs.drop()
    assert not sub.exists()
    sub.mkdir()
    fsync_path(plfs.mnt)
    write_file(sub / "f", b"data", sync_file=True, sync_dir=True)
    plfs.drop()
    assert (sub / "f").read_bytes() == b"data"


def test_unlink_rename_and_truncate_are_undone_without_fsync(plfs):
    d = durable_empty_dir(plfs)
    for n in ("a", "b", "c"):
        write_file(d / n, n.encode() * 100, sync_file=True)
    fsync_path(d)
    os.unlink(d / "a")
    os.rename(d / "b", d / "b2")
    os.truncate(d / "c", 10)
    assert sorted(os.listdir(d)) == ["b2", "c"]
    plfs.drop()
    assert sorted(os.listdir(d)) == ["a", "b", "c"]
    assert (d / "a").read_bytes() == b"a" * 100
    assert (d / "b").read_bytes() == b"b" * 100
    assert (d / "c").read_bytes() == b"c" * 100
    # And the same made durable: fsync the directory and the truncated file.
    os.unlink(d / "a")
    os.rename(d / "b", d / "b2")
    fd = os.open(d / "c", os.O_WRONLY)
    os.ftruncate(fd, 10)
    os.fsync(fd)
    os.close(fd)
    fsync_path(d)
    plfs.drop()
    assert sorted(os.listdir(d)) == ["b2", "c"]
    assert (d / "c").read_bytes() == b"c" * 10


def test_a_drop_is_seen_through_the_page_cache_and_mmap(plfs):
    # Recovery maps segments: a reader that had the unsynced data cached must not see it
    # after the drop once it opens the file again.
    d = durable_empty_dir(plfs)
    write_file(d / "f", b"s" * 8192, sync_file=True, sync_dir=True)
    fd = os.open(d / "f", os.O_RDWR)
    os.pwrite(fd, b"u" * 8192, 8192)
    with mmap.mmap(fd, 16384, prot=mmap.PROT_READ) as m:
        assert m[8192:8200] == b"uuuuuuuu"
    os.close(fd)
    assert (d / "f").read_bytes() == b"s" * 8192 + b"u" * 8192
    plfs.drop()
    assert (d / "f").stat().st_size == 8192
    fd = os.open(d / "f", os.O_RDONLY)
    with mmap.mmap(fd, 8192, prot=mmap.PROT_READ) as m:
        assert m[:] == b"s" * 8192
    os.close(fd)
    assert (d / "f").read_bytes() == b"s" * 8192


def test_what_the_spool_writer_uses(plfs):
    d = durable_empty_dir(plfs)
    write_file(d / "seg", b"hdr", sync_file=True, sync_dir=True, flags=os.O_CREAT | os.O_EXCL | os.O_RDWR)
    with pytest.raises(FileExistsError):
        os.open(d / "seg", os.O_CREAT | os.O_EXCL | os.O_RDWR)
    fd = os.open(d / "seg", os.O_RDWR)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    FALLOC_FL_KEEP_SIZE = 1
    assert libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 1 << 20) == 0, os.strerror(ctypes.get_errno())
    assert os.fstat(fd).st_size == 3  # KEEP_SIZE: the reservation is invisible
    os.pwrite(fd, b"rec1", 3)
    os.fdatasync(fd)
    os.pwrite(fd, b"rec2", 7)
    os.close(fd)
    plfs.drop()
    assert (d / "seg").read_bytes() == b"hdrrec1"


def test_flock_is_exclusive_across_open_files(plfs):
    # ternd is to take an flock on <spool>/lock; the kernel keeps FUSE flocks locally.
    p = plfs.mnt / "lock"
    p.touch()
    a, b = open(p), open(p)
    fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(BlockingIOError):
        fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # And from another process, as a second ternd on the same spool would try.
    assert subprocess.run(["flock", "-n", str(p), "true"]).returncode == 1
    a.close()
    assert subprocess.run(["flock", "-n", str(p), "true"]).returncode == 0
    fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    b.close()


def test_sync_makes_everything_durable(plfs):
    (plfs.mnt / "x" / "y").mkdir(parents=True)
    (plfs.mnt / "x" / "y" / "f").write_bytes(b"z" * 100)
    plfs.sync()
    plfs.drop()
    assert (plfs.mnt / "x" / "y" / "f").read_bytes() == b"z" * 100


def test_drop_torn_keeps_a_random_prefix_of_unsynced_appends(plfs):
    d = durable_empty_dir(plfs)
    write_file(d / "f", b"A" * 100, sync_file=True, sync_dir=True)
    kept = set()
    for seed in range(12):
        fd = os.open(d / "f", os.O_RDWR)
        size = os.fstat(fd).st_size
        os.pwrite(fd, b"x" * 10, 0)              # an unsynced overwrite: always lost
        os.pwrite(fd, b"B" * 9000, size)         # unsynced appends: a prefix survives
        os.close(fd)
        plfs.drop_torn(seed)
        data = (d / "f").read_bytes()
        assert data[:100] == b"A" * 100 and data[100:size] == b"B" * (size - 100)
        assert set(data[size:]) <= {ord("B")} and len(data) <= size + 9000
        kept.add(len(data) - size)
        plfs.drop()  # what survived a torn drop is durable: a plain drop keeps it
        assert (d / "f").read_bytes() == data
    assert len(kept) > 6, kept  # cut at many different places, none of them fixed


def test_drop_torn_keeps_or_reverts_each_directory_whole(plfs):
    outcomes = set()
    for seed in range(16):
        d = durable_empty_dir(plfs, f"d{seed}")
        for n in ("a", "b"):
            write_file(d / n, b"x", sync_file=True)
        plfs.drop_torn(seed)
        names = sorted(os.listdir(d))
        assert names in ([], ["a", "b"]), names
        outcomes.add(len(names))
    assert outcomes == {0, 2}


def test_fail_writes_refuses_every_change_and_keeps_reads(plfs):
    import errno
    d = durable_empty_dir(plfs)
    write_file(d / "f", b"before", sync_file=True, sync_dir=True)
    fd = os.open(d / "f", os.O_RDWR)  # opened before the disk failed
    try:
        plfs.fail_writes(True)
        assert plfs.stats()["fail_writes"] == 1

        def eio(fn, *args):
            with pytest.raises(OSError) as e:
                fn(*args)
            assert e.value.errno == errno.EIO, (fn, e.value)
        eio(os.pwrite, fd, b"x", 0)
        eio(os.fsync, fd)
        eio(os.fdatasync, fd)
        eio(os.posix_fallocate, fd, 0, 1 << 20)
        eio(os.ftruncate, fd, 0)
        eio(os.open, d / "new", os.O_CREAT | os.O_WRONLY, 0o600)
        eio(os.open, d / "f", os.O_WRONLY | os.O_TRUNC)
        eio(os.mkdir, d / "sub")
        eio(os.rename, d / "f", d / "g")
        eio(os.unlink, d / "f")
        eio(fsync_path, d)
        # Reads, lookups and listings still work, and nothing changed.
        assert (d / "f").read_bytes() == b"before"
        assert os.pread(fd, 100, 0) == b"before"
        assert os.listdir(d) == ["f"]
        assert plfs.stats()["failed_ops"] >= 11
        plfs.fail_writes(False)
        assert plfs.stats()["fail_writes"] == 0
        os.pwrite(fd, b"after!", 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    plfs.drop()
    assert (d / "f").read_bytes() == b"after!"
