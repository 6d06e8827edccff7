"""The FUSE re-export (api/fusemount.py) with a real virtiofsd and a real kernel mount.

One mount, served by a ``pyvirtiofs mount SHARE MOUNTPOINT`` subprocess, is shared by
most tests (each works in its own directory); the life-cycle tests start their own. Every
mount is waited for with a bounded poll of ``os.path.ismount`` and always taken down in
teardown (SIGTERM, then ``fusermount3 -u``, then ``umount -l``). Ordinary programs — tar,
git, sqlite3, coreutils as another user — run against the mount; results are compared
with what the host sees in the shared folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import REPO

pyfuse3 = pytest.importorskip("pyfuse3", reason="the 'fuse' extra (pyfuse3, trio) is needed")

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
MOUNT_TIMEOUT = 30.0

pytestmark = [
    pytest.mark.daemon,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts with allow_other: needs root"),
]


# -- fixtures --------------------------------------------------------------------------------


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    """Bounded poll: fail with the server's log if it dies or the deadline passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            text = log.read_text() if log is not None else ""
            pytest.fail(f"mount server exited ({proc.returncode}) before {what}:\n{text}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _force_unmount(mountpoint: Path) -> None:
    for cmd in (["fusermount3", "-u", "-q", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        if not os.path.ismount(mountpoint):
            return
        subprocess.run(cmd, check=False, capture_output=True, timeout=30)


class Server:
    """A ``pyvirtiofs mount SHARE MOUNTPOINT`` subprocess."""

    def __init__(self, base: Path) -> None:
        self.share = base / "share"
        self.mnt = base / "mnt"
        self.log = base / "server.log"
        for d in (self.share, self.mnt):
            d.mkdir()
            d.chmod(0o755)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pyvirtiofs", "mount", str(self.share), str(self.mnt)],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(REPO)})
        _wait_for(lambda: os.path.ismount(self.mnt), MOUNT_TIMEOUT, "the mount",
                  self.proc, self.log)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal the server and wait for it; always leaves nothing mounted."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=30)
        finally:
            _force_unmount(self.mnt)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


@contextlib.contextmanager
def _tmpbase() -> Iterator[Path]:
    # Not under pytest's tmp_path: its parents are 0700 and the other user must get in.
    base = Path(tempfile.mkdtemp(prefix="pyvirtiofs-fuse-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        _force_unmount(base / "mnt")
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def _served() -> Iterator[Server]:
    with _tmpbase() as base:
        server = Server(base)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with _served() as s:
        yield s


@pytest.fixture
def work(server: Server, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """A fresh directory for one test: (path through the mount, same path on the host)."""
    name = request.node.name.replace("[", "_").replace("]", "_")
    (server.mnt / name).mkdir()
    return server.mnt / name, server.share / name


def _run(cmd: list[str], cwd: Path | None = None, env: dict | None = None,
         input: bytes | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, input=input, capture_output=True,
                            timeout=60)
    assert result.returncode == 0, (cmd, result.stdout, result.stderr)
    return result


def _nobody(script: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a shell script as uid/gid 65534 with no supplementary groups."""
    return subprocess.run([*AS_NOBODY, "sh", "-c", script], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def _make_tree(root: Path) -> None:
    """A directory tree with most things tar records: sizes around page and request
    boundaries, modes, nested and empty directories, symlinks, hard links, a fifo,
    nanosecond mtimes, a non-UTF-8 name."""
    root.mkdir()
    sizes = [0, 1, 4095, 4096, 4097, 65536, (1 << 20) + 3, 3 * (1 << 20) + 17]
    for i, size in enumerate(sizes):
        d = root / f"d{i % 3}" / f"sub{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"file{i}.bin"
        p.write_bytes(os.urandom(size))
        p.chmod([0o644, 0o600, 0o755, 0o640][i % 4])
        os.utime(p, ns=(1_600_000_000_123_456_789 + i, 1_600_000_000_987_654_321 + i))
    (root / "empty").mkdir(mode=0o750)
    (root / "link").symlink_to("d0/sub0/file0.bin")
    (root / "dangling").symlink_to("nowhere/at/all")
    os.link(root / "d1/sub1/file1.bin", root / "hard")
    os.mkfifo(root / "fifo", 0o620)
    (root / os.fsdecode(b"caf\xe9-latin1")).write_bytes(b"x" * 10)
    (root / ("n" * 255)).write_text("long name")


def _tar_create(src: Path, out: Path) -> bytes:
    # pax keeps nanosecond mtimes; atime/ctime are not reproducible, so drop them.
    _run(["tar", "--format=pax", "--pax-option=delete=atime,delete=ctime", "--sort=name",
          "--numeric-owner", "-C", str(src), "-cf", str(out), "."])
    return out.read_bytes()


# -- ordinary programs -------------------------------------------------------------------------


def test_tar_in_and_out_is_byte_exact(server: Server, work: tuple[Path, Path]) -> None:
    mnt, host = work
    scratch = Path(tempfile.mkdtemp(prefix="pyvirtiofs-tar-"))
    try:
        _make_tree(scratch / "src")
        original = _tar_create(scratch / "src", scratch / "a.tar")
        _run(["tar", "-C", str(mnt), "-xpf", str(scratch / "a.tar")])  # in, through the mount
        assert _tar_create(mnt, scratch / "b.tar") == original  # out, through the mount
        assert _tar_create(host, scratch / "c.tar") == original  # what landed on the host
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_git_init_add_commit(work: tuple[Path, Path]) -> None:
    mnt, host = work
    env = {**os.environ, "HOME": str(mnt), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "Tester", "GIT_AUTHOR_EMAIL": "tester@example.org",
           "GIT_COMMITTER_NAME": "Tester", "GIT_COMMITTER_EMAIL": "tester@example.org"}
    repo = mnt / "repo"
    repo.mkdir()
    for i in range(40):
        (repo / f"dir{i % 4}").mkdir(exist_ok=True)
        (repo / f"dir{i % 4}" / f"f{i}.txt").write_text(f"line {i}\n" * (i + 1))
    _run(["git", "init", "-q"], cwd=repo, env=env)
    _run(["git", "add", "-A"], cwd=repo, env=env)
    _run(["git", "commit", "-q", "-m", "first"], cwd=repo, env=env)
    (repo / "dir0" / "f0.txt").write_text("changed\n")
    _run(["git", "mv", "dir1/f1.txt", "dir1/moved.txt"], cwd=repo, env=env)
    _run(["git", "commit", "-q", "-a", "-m", "second"], cwd=repo, env=env)
    assert _run(["git", "status", "--porcelain"], cwd=repo, env=env).stdout == b""
    log = _run(["git", "log", "--format=%s"], cwd=repo, env=env).stdout.split()
    assert log == [b"second", b"first"]
    _run(["git", "fsck", "--strict"], cwd=repo, env=env)
    # The host folder holds a valid repository too.
    files = _run(["git", "ls-files"], cwd=host / "repo", env=env).stdout.split()
    assert len(files) == 40 and b"dir1/moved.txt" in files


def test_sqlite_10000_rows(work: tuple[Path, Path]) -> None:
    mnt, host = work
    db = sqlite3.connect(mnt / "test.db")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, payload BLOB)")
    with db:
        db.executemany("INSERT INTO t VALUES (?, ?, ?)",
                       ((i, f"row {i}", bytes([i % 256]) * (i % 100)) for i in range(10_000)))
    db.close()
    db = sqlite3.connect(mnt / "test.db")
    rows = db.execute("SELECT id, name, payload FROM t ORDER BY id").fetchall()
    assert len(rows) == 10_000
    assert all(r == (i, f"row {i}", bytes([i % 256]) * (i % 100)) for i, r in enumerate(rows))
    # WAL mode maps its -shm file shared and writable: mmap through the page cache.
    assert db.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    with db:
        db.execute("UPDATE t SET name = name || '!' WHERE id % 2 = 0")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    host_db = sqlite3.connect(host / "test.db")
    assert host_db.execute("SELECT count(*), sum(id) FROM t").fetchone() == (10_000, 49_995_000)
    assert host_db.execute("SELECT name FROM t WHERE id = 42").fetchone() == ("row 42!",)
    host_db.close()


def test_ls_and_cp_large_directory(work: tuple[Path, Path]) -> None:
    """Listings span many kernel READDIRPLUS calls (the buffered remainder is resumed and
    rewinds drop it); cp -a copies within the mount."""
    mnt, host = work
    names = {f"entry-{i:04d}-{'x' * (i % 50)}" for i in range(600)}
    for name in names:
        (host / name).write_bytes(name.encode())
    assert set(os.listdir(mnt)) == names
    listing = _run(["ls", "-la", str(mnt)]).stdout.decode().splitlines()
    assert len(listing) == 1 + 2 + len(names)  # total, . and .., entries
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:  # the same open directory, rewound: both listings complete
        assert set(os.listdir(fd)) == names
        assert set(os.listdir(fd)) == names
    finally:
        os.close(fd)
    os.mkdir(mnt / "copy")
    _run(["cp", "-a", *[str(mnt / n) for n in sorted(names)[:40]], str(mnt / "copy")])
    assert sorted(os.listdir(host / "copy")) == sorted(names)[:40]


def test_large_file_copy_and_concurrent_io(work: tuple[Path, Path]) -> None:
    mnt, host = work
    big = os.urandom(5 * (1 << 20) + 4321)
    (host / "big").write_bytes(big)
    _run(["cp", str(mnt / "big"), str(mnt / "big2")])
    assert hashlib.sha256((host / "big2").read_bytes()).digest() == hashlib.sha256(big).digest()

    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            data = os.urandom(300_000 + i)
            (mnt / f"c{i}").write_bytes(data)
            for _ in range(3):
                assert (mnt / f"c{i}").read_bytes() == data
                assert (mnt / "big").read_bytes()[i * 1000:(i + 1) * 1000] == big[
                    i * 1000:(i + 1) * 1000]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


# -- credentials and permissions ----------------------------------------------------------


def test_other_user_owns_what_it_creates(work: tuple[Path, Path]) -> None:
    mnt, host = work
    os.chmod(mnt, 0o1777)  # like /tmp: everyone may create, only owners may delete
    r = _nobody(f"umask 022 && echo hi > {mnt}/mine && mkdir {mnt}/mydir && "
                f"ln -s mine {mnt}/mylink && mkfifo {mnt}/myfifo && stat -c '%u:%g' {mnt}/mine")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{NOBODY}:{NOBODY}"
    for name in ("mine", "mydir", "mylink", "myfifo"):
        st = os.lstat(host / name)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), name
    assert stat.S_IMODE(os.stat(host / "mine").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(host / "mydir").st_mode) == 0o755


def test_other_user_is_refused_like_on_ext4(work: tuple[Path, Path]) -> None:
    mnt, host = work
    os.chmod(mnt, 0o1777)
    secret = mnt / "secret"
    secret.mkdir(mode=0o700)
    (secret / "data").write_text("root only")
    (mnt / "rootfile").write_text("root's")
    (mnt / "readonly").write_text("r")
    os.chmod(mnt / "readonly", 0o644)

    r = _nobody(f"cat {secret}/data")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = _nobody(f"ls {secret}")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = _nobody(f"touch {secret}/new")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = _nobody(f"echo x >> {mnt}/readonly")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = _nobody(f"rm -f {mnt}/rootfile")  # sticky directory: not the owner
    assert r.returncode != 0 and "Operation not permitted" in r.stderr
    r = _nobody(f"mv {mnt}/rootfile {mnt}/stolen")
    assert r.returncode != 0 and "Operation not permitted" in r.stderr
    r = _nobody(f"chmod 777 {mnt}/rootfile")
    assert r.returncode != 0 and "Operation not permitted" in r.stderr
    r = _nobody(f"touch {mnt}/own && chown 0 {mnt}/own")
    assert r.returncode != 0 and "Operation not permitted" in r.stderr
    assert os.stat(host / "own").st_uid == NOBODY
    assert (host / "rootfile").read_text() == "root's"
    assert not (host / "secret" / "new").exists()
    # And root still may do everything.
    (secret / "more").write_text("x")
    os.unlink(mnt / "own")


def test_set_id_bits(work: tuple[Path, Path]) -> None:
    mnt, host = work
    os.chmod(mnt, 0o777)
    shared = mnt / "group"
    shared.mkdir()
    os.chown(shared, 0, NOBODY)
    os.chmod(shared, 0o2775)  # set-gid directory: new entries inherit its group
    r = _nobody(f"touch {shared}/f && mkdir {shared}/d && "
                f"echo data > {mnt}/prog && chmod 4755 {mnt}/prog && "
                f"echo more >> {mnt}/prog && stat -c %a {mnt}/prog")
    assert r.returncode == 0, r.stderr
    assert os.stat(host / "group" / "f").st_gid == NOBODY
    assert os.stat(host / "group" / "d").st_mode & stat.S_ISGID
    # An unprivileged write cleared the set-uid bit, as on ext4.
    assert r.stdout.strip() == "755"
    assert stat.S_IMODE(os.stat(host / "prog").st_mode) == 0o755
    r = _nobody(f"chmod 2755 {mnt}/prog && truncate -s 1 {mnt}/prog && stat -c %a {mnt}/prog")
    assert r.returncode == 0 and r.stdout.strip() == "755", r.stderr
    # chmod g+s by an owner outside the file's group: silently dropped.
    (mnt / "notmine").write_text("x")
    os.chown(mnt / "notmine", NOBODY, 0)
    r = _nobody(f"chmod 2755 {mnt}/notmine && stat -c %a {mnt}/notmine")
    assert r.returncode == 0 and r.stdout.strip() == "755", r.stderr
    # Root writes keep them (CAP_FSETID); chown clears them.
    os.chmod(mnt / "prog", 0o4755)
    with open(mnt / "prog", "ab") as f:
        f.write(b"root")
    assert stat.S_IMODE(os.stat(mnt / "prog").st_mode) == 0o4755
    os.chown(mnt / "prog", 0, 0)
    assert stat.S_IMODE(os.stat(mnt / "prog").st_mode) == 0o755


# -- POSIX semantics ------------------------------------------------------------------------


def test_mmap_read_and_write(work: tuple[Path, Path]) -> None:
    mnt, host = work
    data = os.urandom(3 * mmap.PAGESIZE + 123)
    (host / "ro").write_bytes(data)
    with open(mnt / "ro", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert mm[:] == data
    with open(mnt / "rw", "wb") as f:
        f.truncate(4 * mmap.PAGESIZE)
    with open(mnt / "rw", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        mm[0:5] = b"hello"
        mm[3 * mmap.PAGESIZE:3 * mmap.PAGESIZE + 5] = b"world"
        mm.flush()
    content = (host / "rw").read_bytes()
    assert content[:5] == b"hello" and content[3 * mmap.PAGESIZE:][:5] == b"world"
    assert len(content) == 4 * mmap.PAGESIZE
    assert (mnt / "rw").read_bytes() == content


def test_links_fifos_and_rename_over(work: tuple[Path, Path]) -> None:
    mnt, host = work
    (mnt / "a").write_text("A")
    os.link(mnt / "a", mnt / "b")
    sa, sb = os.stat(mnt / "a"), os.stat(mnt / "b")
    assert sa.st_ino == sb.st_ino == os.stat(host / "a").st_ino and sa.st_nlink == 2
    os.symlink("a", mnt / "s")
    assert os.readlink(mnt / "s") == "a" and (mnt / "s").read_text() == "A"
    assert os.readlink(host / "s") == "a"

    os.mkfifo(mnt / "fifo")
    assert stat.S_ISFIFO(os.stat(host / "fifo").st_mode)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append((mnt / "fifo").read_bytes()))
    reader.start()
    with open(mnt / "fifo", "wb") as w:
        w.write(b"through the pipe")
    reader.join(10)
    assert got == [b"through the pipe"]

    (mnt / "new").write_text("NEW")
    with open(mnt / "a") as old:  # rename over an existing (and open) file
        os.rename(mnt / "new", mnt / "a")
        assert old.read() == "A"
    assert (mnt / "a").read_text() == "NEW" and (host / "a").read_text() == "NEW"
    assert not (mnt / "new").exists() and (mnt / "b").read_text() == "A"
    assert os.stat(mnt / "b").st_nlink == 1
    os.mkdir(mnt / "d1")
    os.mkdir(mnt / "d2")
    (mnt / "d1" / "inside").write_text("in")
    os.rename(mnt / "d1", mnt / "d2")  # over an empty directory
    assert (mnt / "d2" / "inside").read_text() == "in" and not (host / "d1").exists()
    os.mkdir(mnt / "d3")
    (mnt / "d3" / "x").write_text("x")
    with pytest.raises(OSError) as exc:
        os.rename(mnt / "d2", mnt / "d3")
    assert exc.value.errno in (errno.ENOTEMPTY, errno.EEXIST)

    with open(mnt / "b", "r+") as f:  # unlinked while open: still readable and writable
        os.unlink(mnt / "b")
        f.write("Z")
        f.seek(0)
        assert f.read() == "Z" and os.fstat(f.fileno()).st_nlink == 0
    assert not (host / "b").exists()


def test_open_flags(work: tuple[Path, Path]) -> None:
    mnt, host = work
    p = mnt / "f"
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.write(fd, b"0123456789")
    os.close(fd)
    with pytest.raises(FileExistsError):
        os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"AB")
    os.close(fd)
    assert (host / "f").read_bytes() == b"0123456789AB"
    fd = os.open(p, os.O_RDWR | os.O_TRUNC)
    assert os.fstat(fd).st_size == 0
    os.write(fd, b"xy")
    os.close(fd)
    assert (host / "f").read_bytes() == b"xy" and p.read_bytes() == b"xy"
    with pytest.raises(IsADirectoryError):
        os.open(mnt, os.O_WRONLY)
    with pytest.raises(FileNotFoundError):
        os.open(mnt / "missing", os.O_RDONLY)
    with pytest.raises(NotADirectoryError):
        os.listdir(p)
    with pytest.raises(OSError) as exc:
        os.open(mnt / ("n" * 256), os.O_CREAT | os.O_WRONLY)
    assert exc.value.errno == errno.ENAMETOOLONG


def test_nanosecond_timestamps_and_inode_numbers(work: tuple[Path, Path]) -> None:
    mnt, host = work
    p = mnt / "t"
    p.write_text("t")
    os.utime(p, ns=(1_234_567_890_123_456_789, 1_700_000_000_000_000_001))
    st, hst = os.stat(p), os.stat(host / "t")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_234_567_890_123_456_789,
                                                1_700_000_000_000_000_001)
    assert (hst.st_atime_ns, hst.st_mtime_ns) == (st.st_atime_ns, st.st_mtime_ns)
    assert st.st_ino == hst.st_ino and st.st_ctime_ns == hst.st_ctime_ns
    before = time.time_ns()
    os.utime(p)  # "now"
    assert os.stat(p).st_mtime_ns >= before - 10_000_000


def test_extended_attributes(work: tuple[Path, Path]) -> None:
    mnt, host = work
    p = mnt / "x"
    p.write_text("x")
    os.chmod(p, 0o644)
    os.setxattr(p, "user.k", b"v1")
    assert os.getxattr(p, "user.k") == b"v1" and os.getxattr(host / "x", "user.k") == b"v1"
    assert "user.k" in os.listxattr(p)
    with pytest.raises(FileExistsError):
        os.setxattr(p, "user.k", b"v2", os.XATTR_CREATE)
    with pytest.raises(OSError) as exc:
        os.setxattr(p, "user.none", b"v", os.XATTR_REPLACE)
    assert exc.value.errno == errno.ENODATA
    os.removexattr(p, "user.k")
    assert "user.k" not in os.listxattr(host / "x")
    # Another user may not write root's file's attributes. (The system Python: ours may
    # live under /root, where that user cannot go.)
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is not None:
        r = subprocess.run([*AS_NOBODY, python, "-c",
                            f"import os; os.setxattr({str(p)!r}, 'user.k', b'no')"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "Permission denied" in r.stderr


def test_statvfs_reports_host_limits(server: Server) -> None:
    st = os.statvfs(server.mnt)
    host = os.statvfs(server.share)
    assert st.f_namemax == host.f_namemax == 255
    assert os.pathconf(server.mnt, "PC_NAME_MAX") == 255
    assert os.pathconf(server.mnt, "PC_PATH_MAX") == 4096
    assert (st.f_bsize, st.f_blocks, st.f_files) == (host.f_bsize, host.f_blocks, host.f_files)


# -- life cycle --------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(sig: int) -> None:
    with _tmpbase() as base:
        s = Server(base)
        try:
            fd = os.open(s.mnt / "open-at-exit", os.O_CREAT | os.O_WRONLY)
            os.write(fd, b"kept")
            s.proc.send_signal(sig)
            assert s.proc.wait(timeout=30) == 0, s.log.read_text()
            assert not os.path.ismount(s.mnt)
            with contextlib.suppress(OSError):
                os.close(fd)
            assert (s.share / "open-at-exit").read_bytes() == b"kept"
        finally:
            s.stop()


def test_external_unmount_ends_the_server() -> None:
    with _tmpbase() as base:
        s = Server(base)
        try:
            (s.mnt / "x").write_text("x")
            _run(["fusermount3", "-u", str(s.mnt)])
            assert s.proc.wait(timeout=30) == 0, s.log.read_text()
            assert not os.path.ismount(s.mnt) and (s.share / "x").read_text() == "x"
        finally:
            s.stop()


def test_cli_background_mount_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from pyvirtiofs.api.cli import main

    with _tmpbase() as base:
        share, mnt = base / "share", base / "mnt"
        share.mkdir()
        mnt.mkdir()
        assert main(["mount", str(base / "nope"), str(mnt)]) == 1
        assert "no such folder" in capsys.readouterr().err
        assert main(["mount", str(share), str(base / "nope")]) == 1
        assert "mount point is not a directory" in capsys.readouterr().err
        assert main(["mount", "tcp://127.0.0.1:9", str(mnt)]) == 1
        assert "remote" in capsys.readouterr().err
        r = subprocess.run([sys.executable, "-m", "pyvirtiofs", "mount", "-b", str(share),
                            str(mnt)],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        assert r.returncode == 0, r.stderr
        try:
            assert os.path.ismount(mnt)  # mounted when the command returned
            (mnt / "bg").write_text("bg")
            assert (share / "bg").read_text() == "bg"
        finally:
            _force_unmount(mnt)
        assert not os.path.ismount(mnt)


def test_in_process_mount_gives_back_every_node() -> None:
    """mount(fs, foreground=False) serves from a thread; the kernel's FORGETs reach the
    daemon (its per-inode descriptors go away) and unmounting releases the rest."""
    from pyvirtiofs.api.integrations.fusemount import mount
    from pyvirtiofs.api.local import connect

    with _tmpbase() as base:
        share, mnt = base / "share", base / "mnt"
        share.mkdir()
        mnt.mkdir()
        for i in range(300):
            (share / f"f{i}").write_text(str(i))
        with connect(share) as fs:
            pid = getattr(fs, "daemon_pid", None)

            def fds() -> int:
                return len(os.listdir(f"/proc/{pid}/fd"))

            baseline = fds() if pid else 0
            handle = mount(fs, str(mnt), foreground=False)
            assert handle is not None and os.path.ismount(mnt)
            try:
                assert sorted(os.listdir(mnt)) == sorted(f"f{i}" for i in range(300))
                assert sum(int((mnt / f"f{i}").read_text()) for i in range(300)) == 44850
                held = open(mnt / "f1")
                if pid:
                    assert fds() >= baseline + 300
                    try:
                        with open("/proc/sys/vm/drop_caches", "w") as f:
                            f.write("2")  # the kernel evicts inodes and sends FORGET
                    except OSError:
                        pass  # read-only /proc/sys (a container): only the unmount is checked
                    else:
                        _wait_for(lambda: fds() < baseline + 100, 10,
                                  "FORGETs to reach the daemon")
            finally:
                handle.unmount()
            assert not os.path.ismount(mnt)
            with contextlib.suppress(OSError):
                held.close()
            if pid:
                _wait_for(lambda: fds() <= baseline, 10, "every node to be given back")
            assert fs.read_bytes("f7") == b"7"  # the share itself lives on


# -- the trio ↔ device bridge, without a kernel ----------------------------------------------


@pytest.mark.parametrize("answer", [True, False])
def test_device_bridge_wakes_and_times_out(answer: bool) -> None:
    """A trio task parked on a device request is woken by its reply, or by the device's
    deadline when the reply never comes (a test backend holds it back)."""
    import trio

    from pyvirtiofs.api.integrations import fusemount
    from pyvirtiofs.codec import fuse_requests as rq
    from pyvirtiofs.codec.fuse_abi import FUSE_ROOT_ID, Opcode
    from tests.actors.test_hostile_device import _set, make_fs

    with make_fs(request_timeout=0.5) as r:
        if not answer:
            r.backend.arm(Opcode.GETATTR, _set(hold=True))

        async def scenario() -> object:
            device = fusemount._Device(r.fs.device_client, trio.lowlevel.current_trio_token())
            try:
                with trio.fail_after(10):
                    out = await device.call(rq.getattr(FUSE_ROOT_ID), ctx=(0, 0, 1))
                    return out.attr.mode
            except pyfuse3.FUSEError as exc:
                return exc.errno

        t0 = time.monotonic()
        result = trio.run(scenario)
        if answer:
            assert stat.S_ISDIR(result)
        else:
            assert result == errno.ETIMEDOUT and time.monotonic() - t0 < 5
            r.backend.release_held()
        r.assert_no_leaks()
